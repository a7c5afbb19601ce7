"""Text streaming on top of token ids: incremental decoding that honours stop strings.

Text is released only once it can no longer turn into a stop string or an unfinished UTF-8
character, so a streamed reply never shows text that the final reply would not contain.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from hybridlm.tokenizer import TextTokenizer


def stream_text(tokenizer: TextTokenizer, ids: Iterable[int], stop: tuple[str, ...] = ()) -> Iterator[str]:
    """Yield text pieces of the decoded ids; end at (and drop) the first stop string."""
    generated: list[int] = []
    emitted = 0
    for token in ids:
        generated.append(token)
        text = tokenizer.decode(generated)
        hit = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        if hit >= 0:
            if hit > emitted:
                yield text[emitted:hit]
            return
        safe = len(text) - _held_back(text, stop)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    text = tokenizer.decode(generated)
    if len(text) > emitted:
        yield text[emitted:]


def _held_back(text: str, stop: tuple[str, ...]) -> int:
    """How many trailing characters might still become a stop string or a whole character."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold
