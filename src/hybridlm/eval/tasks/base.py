"""What every task shares: its options, where data files are found, and few-shot prompting.

A task is prepared before the model is loaded (files read, items limited, shots drawn, prompts
built), so bad input - a missing file, too many shots - fails fast with one line; the prepared
task is then scored with a Scorer and returns `{"metrics", "n", "stderr"}`.

Few-shot prompting follows lm-evaluation-harness: one random.Random(seed) per task draws each
item's shots in item order from the task's training split, or, when the task has none, from its
own items (drawing k + 1 and dropping the item itself); each shot is the example's prompt, the
target delimiter " " and its answer, and shots are joined (and followed) by "\\n\\n".
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import hybridlm
from hybridlm.errors import UserError

if TYPE_CHECKING:
    from hybridlm.eval.scoring import Scorer

T = TypeVar("T")
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
DEFAULT_SEED = 1234  # lm-eval's default few-shot seed
DEFAULT_DATA_DIR = Path(hybridlm.__file__).resolve().parents[3] / "shared" / "data"
"""`shared/data` beside the checkout (src/hybridlm/__init__.py -> checkout -> its parent)."""


@dataclass(frozen=True, kw_only=True)
class EvalOptions:
    data_dir: Path = DEFAULT_DATA_DIR
    shots: int = 0
    limit: int | None = None
    """Score only the first `limit` items of each task (lines of text for wikitext2)."""
    seed: int = DEFAULT_SEED
    stride: int | None = None
    """Sliding-window stride of the perplexity tasks (default: the model's context)."""
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        if self.shots < 0:
            raise UserError(f"--shots must be >= 0 (got {self.shots})")
        if self.limit is not None and self.limit <= 0:
            raise UserError(f"--limit must be > 0 (got {self.limit})")
        if self.stride is not None and self.stride <= 0:
            raise UserError(f"--stride must be > 0 (got {self.stride})")
        if self.max_new_tokens <= 0:
            raise UserError(f"--max-new-tokens must be > 0 (got {self.max_new_tokens})")


class PreparedTask(Protocol):
    def score(self, scorer: Scorer) -> dict:
        """{"metrics": {name: value}, "n": items scored, "stderr": {name: standard error}}."""
        ...


TaskFactory = Callable[[EvalOptions], PreparedTask]


def data_file(options: EvalOptions, relative: str) -> Path:
    """A file under the data directory, or a UserError naming the path and the way to change it."""
    path = Path(options.data_dir) / relative
    if not path.is_file():
        raise UserError(f"data file not found: {path}; point --data-dir at a copy of shared/data "
                        f"(the directory that holds {relative})")
    return path


def limited(items: list[T], limit: int | None) -> list[T]:
    return items if limit is None else items[:limit]


def draw_shots(task: str, n_items: int, pool_size: int, shots: int, seed: int, from_items: bool) -> list[list[int]]:
    """Per item, the pool indices of its shots. With `from_items` the pool is the task's own items
    (item i is pool entry i) and an item is never its own shot."""
    if shots == 0:
        return [[] for _ in range(n_items)]
    available = pool_size - 1 if from_items else pool_size
    if shots > available:
        raise UserError(f"--shots {shots} is more than the {max(available, 0)} examples {task} can draw "
                        f"shots from; use --shots {max(available, 0)} or fewer")
    rng = random.Random(seed)
    drawn = []
    for i in range(n_items):
        picks = rng.sample(range(pool_size), shots + 1 if from_items else shots)
        drawn.append([j for j in picks if not (from_items and j == i)][:shots])
    return drawn


def fewshot_prefix(shots: Sequence[str]) -> str:
    """Labelled examples, each followed by the few-shot delimiter (lm-eval's layout)."""
    return "".join(shot + FEWSHOT_DELIMITER for shot in shots)
