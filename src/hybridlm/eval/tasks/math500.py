"""MATH-500 (math/MATH-500/test.jsonl, 500 problems) as lm-evaluation-harness's `minerva_math500`
task (version 3.1) scores it.

The prompt is "Problem:\\n{problem}\\n\\nSolution:"; shots are lm-eval's four fixed Minerva
examples in order (its YAML asks for 4: pass --shots 4 for its setting), each followed by its
worked solution. Greedy generation runs until "Problem:". The gold answer is the last
\\boxed{...} of the reference solution; the model's is what follows "Final Answer: The final
answer is" (the format the shots teach). Both are normalised by the rules of Minerva's appendix D
(Lewkowycz et al., 2022), then:

- exact_match: equal strings, or LaTeX that sympy parses into expressions whose difference
  simplifies to 0 (5 s limit per pair);
- math_verify: Hugging Face's math-verify comparing the whole reply with the whole solution.

Both need the `eval` extra (sympy with antlr4 4.11 for parse_latex, math-verify).
"""

from __future__ import annotations

import re
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hybridlm.errors import UserError
from hybridlm.eval.tasks.base import TARGET_DELIMITER, EvalOptions, data_file, fewshot_prefix, limited
from hybridlm.eval.tasks.metrics import summarise
from hybridlm.eval.tasks.multiple_choice import read_jsonl

if TYPE_CHECKING:
    from collections.abc import Iterator

    from hybridlm.eval.scoring import Scorer

TEST = "math/MATH-500/test.jsonl"
UNTIL = ["Problem:"]
INVALID = "[invalidanswer]"
FINAL_ANSWER = re.compile(r"Final Answer: The final answer is(.*?). I hope it is correct.")
EQUIVALENCE_SECONDS = 5

MINERVA_SHOTS = (
    ("Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.",
     "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, and $5 - x "
     "\\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives $x<5$. Therefore, "
     "the domain of the expression is $\\boxed{[2,5)}$.\nFinal Answer: The final answer is $[2,5)$. I hope it is correct."),
    ("If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} \\mathbf{B}).$",
     "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) = \\boxed{24}.$\n"
     "Final Answer: The final answer is $24$. I hope it is correct."),
    ("Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many times must "
     "Terrell lift them in order to lift the same total weight?",
     "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of weight.  If "
     "he lifts two 15-pound weights instead for $n$ times, he will lift a total of $2\\cdot15\\cdot n=30n$ pounds of "
     "weight.  Equating this to 480 pounds, we can solve for $n$:\n\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad "
     "n&=480/30=\\boxed{16}\n\\end{align*}\nFinal Answer: The final answer is $16$. I hope it is correct."),
    ("If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a solution $(x, y)$ "
     "where $x$ and $y$ are both nonzero,\nfind $\\frac{a}{b},$ assuming $b$ is nonzero.",
     "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we also know "
     "that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\nFinal Answer: "
     "The final answer is $-\\frac{2}{3}$. I hope it is correct."),
)
"""The Minerva prompt's four worked examples, as lm-eval's minerva_math tasks give them."""

# Minerva, appendix D: text replacements, then unit words and TeX spacing removed.
SUBSTITUTIONS = (("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""), ("mbox", "text"),
                 (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"))
REMOVED = ("square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots", "sue",
           "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges",
           "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2",
           "\\text{}^3", "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!", "{,}", '"',
           "\\dots")
UNWRAPPED = (r"(\\text\{)(.*?)(\})", r"(\\textbf\{)(.*?)(\})", r"(\\overline\{)(.*?)(\})", r"(\\boxed\{)(.*)(\})")
TEX_COMMAND = re.compile(r"(\\[a-zA-Z]+)")


def last_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...} (or "\\boxed x", or \\fbox{...}), braces balanced."""
    if "\\boxed " in text:
        return text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for end in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if text[end] == "}" and depth == 0:
            boxed = text[start : end + 1]
            return boxed[len("\\boxed{") : -1] if boxed.startswith("\\boxed{") else None
    return None


def _drop_unit(text: str, unit: str) -> str:
    """A unit word glued to its neighbours, outside TeX command names ("ft" must not break \\left)."""
    parts = TEX_COMMAND.split(text)
    return "".join(part if i % 2 else part.replace(unit, "") for i, part in enumerate(parts))


def normalize_final_answer(answer: str) -> str:
    """Minerva's normalisation of a final answer (the rules lm-eval's minerva_math applies)."""
    answer = answer.split("=")[-1]
    for unit in REMOVED:
        if unit.isalpha():
            answer = re.sub(rf"(?<!\\)\b{unit}\b", "", answer)
    for before, after in SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for unit in REMOVED:
        answer = _drop_unit(answer, unit) if unit.isalpha() else answer.replace(unit, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    for pattern in UNWRAPPED:
        answer = re.sub(pattern, "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)  # \fracab -> \frac{a}{b}
    answer = re.sub(r"(sqrt)(\[[^\]]*\])(\w)", "\\1\\2{\\3}", answer)  # \sqrt[3]a -> \sqrt[3]{a}
    answer = re.sub(r"(sqrt)(?!\[)([^{])", "sqrt{\\2}", answer)  # \sqrta -> \sqrt{a}
    answer = answer.replace("$", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+", answer):  # 100,000 -> 100000, but not the tuple 0,1
        answer = answer.replace(",", "")
    return answer


def gold_answer(solution: str) -> str:
    boxed = last_boxed(solution)
    if boxed is None:
        raise ValueError("the solution has no \\boxed{} answer")
    return normalize_final_answer(boxed)


def reply_answer(reply: str) -> str:
    found = FINAL_ANSWER.search(reply + "I hope it is correct.")
    return normalize_final_answer(found.group(1).strip() if found else INVALID)


@contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """SIGALRM-bounded (sympy's simplify can run for minutes); unbounded off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def equivalent(a: str, b: str) -> bool:
    """Normalised answers equal as strings or as sympy expressions (False when either won't parse)."""
    if a and a == b:
        return True
    import sympy
    from sympy.parsing.latex import parse_latex

    try:
        with _time_limit(EQUIVALENCE_SECONDS):
            return sympy.simplify(parse_latex(a) - parse_latex(b)) == 0
    except Exception:  # noqa: BLE001 - unparsable, incomparable or timed out: not shown equal
        return False


def verified(reply: str, solution: str) -> bool:
    from math_verify import parse, verify

    return bool(verify(gold=parse(solution), target=parse(reply)))


@dataclass
class Math500Task:
    prompts: list[str]
    solutions: list[str]
    answers: list[str]
    max_new_tokens: int

    def score(self, scorer: Scorer) -> dict:
        replies = scorer.generate_until(self.prompts, self.max_new_tokens, UNTIL)
        metrics, stderr = summarise({
            "exact_match": [float(equivalent(reply_answer(r), a)) for r, a in zip(replies, self.answers)],
            "math_verify": [float(verified(r, s)) for r, s in zip(replies, self.solutions)],
        })
        return {"metrics": metrics, "n": len(replies), "stderr": stderr}


def _require_math() -> None:
    try:
        import math_verify  # noqa: F401
        from sympy.parsing.latex import parse_latex

        parse_latex("1")
    except Exception as exc:  # noqa: BLE001 - ImportError, or sympy's own error for a missing/odd antlr4
        raise UserError(f"minerva_math500 needs sympy, antlr4 4.11 and math-verify ({exc}); "
                        "pip install 'hybridlm[eval]'") from None


def prepare(options: EvalOptions) -> Math500Task:
    _require_math()
    if options.shots > len(MINERVA_SHOTS):
        raise UserError(f"--shots {options.shots} is more than the {len(MINERVA_SHOTS)} fixed Minerva examples "
                        f"minerva_math500 draws from; use --shots {len(MINERVA_SHOTS)} or fewer")
    path = data_file(options, TEST)
    problems, solutions, answers = [], [], []
    for number, record in enumerate(limited(read_jsonl(path), options.limit), start=1):
        try:
            answers.append(gold_answer(record["solution"]))
            problems.append(record["problem"])
            solutions.append(record["solution"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: item {number} is not a MATH problem ({type(exc).__name__}: {exc})") from None
    prefix = fewshot_prefix([f"Problem:\n{p}\n\nSolution:{TARGET_DELIMITER}{s}" for p, s in MINERVA_SHOTS[: options.shots]])
    prompts = [f"{prefix}Problem:\n{problem}\n\nSolution:" for problem in problems]
    return Math500Task(prompts, solutions, answers, options.max_new_tokens)
