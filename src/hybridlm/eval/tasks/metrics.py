"""Task metrics and their standard errors, defined as lm-evaluation-harness defines them.

- acc: the choice with the highest log-likelihood is the gold one (first index wins ties);
  acc_norm: the same after dividing each log-likelihood by the length of the choice text in
  characters (the choice without the " " target delimiter): lm-eval 0.4's acc_norm is len(str),
  not bytes; acc_bytes divides by the choice's UTF-8 bytes instead (lm-eval's acc_bytes). The
  two differ only on non-ASCII choices;
- perplexity (LAMBADA): exp of minus the mean per-item log-likelihood of the target;
- bleu: sacrebleu corpus BLEU (0-100); rouge_l: mean rouge-score ROUGE-L F-measure (0-1);
  meteor: mean NLTK METEOR over items, exact and stem matches only (see meteor());
  exact_match: mean of prediction == reference after stripping surrounding whitespace;
- mcc (Matthews correlation), f1 (of class 1) and f1_macro: over the (gold, argmax) pairs of a
  whole task, as lm-eval's corpus-level metrics; pearson and spearman for scores (STS-B).

Standard errors: a mean of per-item scores gets the sample standard deviation over sqrt(n)
(lm-eval's mean_stderr); corpus-level metrics (perplexity, BLEU) get a bootstrap, as lm-eval
does, here with a fixed seed and BOOTSTRAP_ITERS resamples so results are deterministic.
"""

from __future__ import annotations

import importlib.util
import math
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

from hybridlm.errors import UserError

T = TypeVar("T")
BOOTSTRAP_ITERS = 200
BOOTSTRAP_SEED = 0


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def sample_stddev(values: Sequence[float]) -> float | None:
    """Standard deviation with the n - 1 denominator; None when n < 2 (undefined)."""
    if len(values) < 2:
        return None
    mu = mean(values)
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - 1))


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of a mean: sample standard deviation / sqrt(n)."""
    stddev = sample_stddev(values)
    return None if stddev is None else stddev / math.sqrt(len(values))


def bootstrap_stderr(metric: Callable[[list[T]], float], items: Sequence[T], iters: int = BOOTSTRAP_ITERS,
                     seed: int = BOOTSTRAP_SEED) -> float | None:
    """Standard deviation of `metric` over resamples (with replacement) of the items."""
    if len(items) < 2:
        return None
    rng = random.Random(seed)
    return sample_stddev([metric(rng.choices(items, k=len(items))) for _ in range(iters)])


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (numpy.argmax's rule)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def choice_hits(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """acc, acc_norm and acc_bytes of one multiple-choice item from its per-choice log-likelihoods."""
    per_char = [ll / max(len(c), 1) for ll, c in zip(lls, choices)]
    per_byte = [ll / max(len(c.encode("utf-8")), 1) for ll, c in zip(lls, choices)]
    return {"acc": float(argmax(lls) == gold), "acc_norm": float(argmax(per_char) == gold),
            "acc_bytes": float(argmax(per_byte) == gold)}


def matthews(pairs: Sequence[tuple[int, int]]) -> float:
    """Matthews correlation of (gold, predicted) binary labels (sklearn's matthews_corrcoef, which
    lm-eval's mcc calls; 0 when a row or column of the confusion matrix is empty)."""
    tp = sum(g == 1 and p == 1 for g, p in pairs)
    tn = sum(g == 0 and p == 0 for g, p in pairs)
    fp = sum(g == 0 and p == 1 for g, p in pairs)
    fn = sum(g == 1 and p == 0 for g, p in pairs)
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def f1_binary(pairs: Sequence[tuple[int, int]], positive: int = 1) -> float:
    """F1 of the positive class over (gold, predicted) pairs (sklearn's f1_score, lm-eval's f1; 0
    when nothing is predicted or gold positive)."""
    tp = sum(g == positive and p == positive for g, p in pairs)
    predicted = sum(p == positive for _, p in pairs)
    actual = sum(g == positive for g, _ in pairs)
    return 2 * tp / (predicted + actual) if predicted + actual else 0.0


def f1_macro(pairs: Sequence[tuple[int, int]], labels: Sequence[int]) -> float:
    """The mean over `labels` of each class's F1 (SuperGLUE CB's macro-F1)."""
    return mean([f1_binary(pairs, label) for label in labels])


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    mx, my = mean(x), mean(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    spread = math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    return cov / spread if spread else 0.0


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties given their average rank (as scipy.stats.rankdata)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of the ranks (ties averaged)."""
    return pearson(_ranks(x), _ranks(y))


def perplexity(lls: Sequence[float]) -> float:
    return math.exp(min(-mean(lls), 700.0))


def require_eval_extra() -> None:
    """Fail before any reply is generated when the [eval] extra (sacrebleu, rouge-score) is missing."""
    for module, message in (("sacrebleu", "BLEU needs sacrebleu"), ("rouge_score", "ROUGE-L needs rouge-score")):
        if importlib.util.find_spec(module) is None:
            raise UserError(f"{message}: pip install 'hybridlm[eval]'")


def bleu(predictions: list[str], references: list[str]) -> float:
    """sacrebleu corpus BLEU (default 13a tokenisation, one reference per prediction)."""
    try:
        import sacrebleu
    except ImportError:
        raise UserError("BLEU needs sacrebleu: pip install 'hybridlm[eval]'") from None
    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """Per-item ROUGE-L F-measure (rouge-score, no stemming)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise UserError("ROUGE-L needs rouge-score: pip install 'hybridlm[eval]'") from None
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


class _NoSynonyms:
    """WordNet's place in NLTK's METEOR when its data is not installed (it cannot be downloaded at
    run time here): no synsets, so the synonym stage matches nothing and exact and stem matches remain."""

    @staticmethod
    def synsets(word: str) -> list:
        return []


def meteor(predictions: list[str], references: list[str]) -> list[float]:
    """Per-item METEOR (NLTK's meteor_score: alpha 0.9, beta 3, gamma 0.5), on lower-cased
    whitespace tokens, with exact and Porter-stem matching and no WordNet synonyms (so it never
    depends on data fetched from the web; scores can be lower than with synonyms)."""
    try:
        from nltk.translate.meteor_score import meteor_score
    except ImportError:
        raise UserError("METEOR needs nltk (it comes with rouge-score): pip install 'hybridlm[eval]'") from None
    return [meteor_score([ref.split()], pred.split(), wordnet=_NoSynonyms()) if pred.split() and ref.split() else 0.0
            for pred, ref in zip(predictions, references)]


def exact_match(predictions: list[str], references: list[str]) -> list[float]:
    return [float(pred.strip() == ref.strip()) for pred, ref in zip(predictions, references)]


def summarise(per_item: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Means of per-item scores and their standard errors (those that are defined)."""
    metrics = {name: mean(values) for name, values in per_item.items()}
    stderr = {name: s for name, values in per_item.items() if (s := mean_stderr(values)) is not None}
    return metrics, stderr
