"""LAMBADA (original test set, 5,153 passages): predict the last word of a passage.

As lm-eval's lambada_standard: the target is " " + the last space-separated word, the context
the rest of the line; acc = greedy decoding from the context yields exactly the target's tokens,
perplexity = exp(-mean log-likelihood of the target). The file is lower-cased and tokenized (not
OpenAI's detokenized lambada_openai). There is no training split, so shots come from the
development passages, as lm-eval draws them from lambada_standard's validation split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hybridlm.errors import UserError
from hybridlm.eval.tasks.base import (
    TARGET_DELIMITER,
    EvalOptions,
    data_file,
    draw_shots,
    fewshot_prefix,
    limited,
)
from hybridlm.eval.tasks.metrics import bootstrap_stderr, mean_stderr, perplexity

if TYPE_CHECKING:
    from hybridlm.eval.scoring import Scorer

FILE = "lambada/lambada_test_plain_text.txt"
DEV_FILE = "lambada/lambada_development_plain_text.txt"


def read_lambada(path: Path) -> list[tuple[str, str]]:
    """(context, target) per passage; the target carries its leading space."""
    passages = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        words = line.strip().split(" ")
        if len(words) < 2:
            raise UserError(f"{path}: line {number} has no context before its last word")
        passages.append((" ".join(words[:-1]), " " + words[-1]))
    return passages


@dataclass
class LambadaTask:
    requests: list[tuple[str, str]]

    def score(self, scorer: Scorer) -> dict:
        results = scorer.loglikelihood(self.requests)
        lls = [ll for ll, _ in results]
        hits = [float(greedy) for _, greedy in results]
        stderr = {"acc": mean_stderr(hits), "perplexity": bootstrap_stderr(perplexity, lls)}
        return {"metrics": {"acc": sum(hits) / len(hits), "perplexity": perplexity(lls)}, "n": len(lls),
                "stderr": {k: v for k, v in stderr.items() if v is not None and math.isfinite(v)}}


def prepare(options: EvalOptions) -> LambadaTask:
    chosen = limited(read_lambada(data_file(options, FILE)), options.limit)
    pool = read_lambada(data_file(options, DEV_FILE)) if options.shots else []
    shots = draw_shots("lambada", len(chosen), len(pool), options.shots, options.seed, from_items=False)
    requests = [(fewshot_prefix([pool[j][0] + TARGET_DELIMITER + pool[j][1] for j in picks]) + context, target)
                for (context, target), picks in zip(chosen, shots)]
    return LambadaTask(requests)
