"""Reward functions the RL tests name as `rl.reward_function` (module:function on the Python path)."""


def e_share(prompts: list[str], completions: list[str]) -> list[float]:
    """The share of the completion's letters that are 'e': verifiable, smooth, and movable by a tiny policy."""
    found = []
    for text in completions:
        letters = [c for c in text.lower() if c.isalpha()]
        found.append(letters.count("e") / len(letters) if letters else 0.0)
    return found


def one_value(prompts: list[str], completions: list[str]) -> list[float]:
    return [1.0]


not_callable = 3
