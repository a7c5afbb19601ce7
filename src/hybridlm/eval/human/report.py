"""`hybridlm eval human report`: what the raters said, per criterion.

Pairwise: A's win rate = (A's wins + half the ties) / ratings, with a 95% percentile-bootstrap
interval (2,000 resamples of the ratings, seed 0, so a report is reproducible); B's is 1 minus it.
Rating: each run's mean 1-5 score with a 95% normal interval (mean +- 1.96 standard errors), and
the difference B - A. Every rater's verdict on a card counts once.
"""

from __future__ import annotations

import random

from hybridlm.eval.human.store import CRITERIA, Study
from hybridlm.eval.tasks.metrics import mean, mean_stderr

BOOTSTRAP_RESAMPLES = 2000
Z95 = 1.959964


def percentile_interval(values: list[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of the resampled means."""
    rng = random.Random(seed)
    means = sorted(mean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def _normal_interval(values: list[float]) -> tuple[float, float] | None:
    error = mean_stderr(values)
    return None if error is None else (mean(values) - Z95 * error, mean(values) + Z95 * error)


def pairwise_summary(outcomes: list[float]) -> dict:
    """outcomes: 1 (A won), 0 (B won), 0.5 (tie)."""
    if not outcomes:
        return {"ratings": 0}
    low, high = percentile_interval(outcomes)
    return {"ratings": len(outcomes), "a_wins": outcomes.count(1.0), "b_wins": outcomes.count(0.0),
            "ties": outcomes.count(0.5), "a_win_rate": mean(outcomes), "a_win_rate_ci95": [low, high]}


def rating_summary(scores: dict[str, list[float]]) -> dict:
    summary: dict = {"ratings": sum(len(v) for v in scores.values())}
    for side, values in scores.items():
        if values:
            summary[side] = {"n": len(values), "mean": mean(values), "ci95": _normal_interval(values)}
    if scores["a"] and scores["b"]:
        summary["b_minus_a"] = mean(scores["b"]) - mean(scores["a"])
    return summary


def report(study: Study) -> dict:
    ratings = study.ratings()
    criteria = {}
    for criterion in CRITERIA:
        chosen = [r for r in ratings if r.criterion == criterion]
        if study.mode == "pairwise":
            outcomes = []
            for r in chosen:
                winner = {"first": r.card.first_side, "second": "b" if r.card.first_side == "a" else "a"}.get(r.value)
                outcomes.append(0.5 if winner is None else float(winner == "a"))
            criteria[criterion] = pairwise_summary(outcomes)
        else:
            scores: dict[str, list[float]] = {"a": [], "b": []}
            for r in chosen:
                scores[r.card.first_side].append(float(r.value))
            criteria[criterion] = rating_summary(scores)
    return {"study": str(study.path), "mode": study.mode, "a": study.label_a, "b": study.label_b,
            "cards": len(study.cards()), "raters": sorted({r.rater for r in ratings}), "criteria": criteria}


def format_report(document: dict) -> str:
    lines = [f"{document['study']} ({document['mode']}, {document['cards']} cards, "
             f"{len(document['raters'])} raters)", f"A = {document['a']}", f"B = {document['b']}"]
    for criterion, summary in document["criteria"].items():
        if not summary["ratings"]:
            lines.append(f"{criterion:<12} no ratings yet")
        elif document["mode"] == "pairwise":
            low, high = summary["a_win_rate_ci95"]
            lines.append(f"{criterion:<12} A win rate {summary['a_win_rate']:.3f} (95% CI {low:.3f}-{high:.3f}); "
                         f"A {summary['a_wins']}, B {summary['b_wins']}, ties {summary['ties']}")
        else:
            parts = []
            for side in ("a", "b"):
                if side in summary:
                    ci = summary[side]["ci95"]
                    spread = f" (95% CI {ci[0]:.2f}-{ci[1]:.2f})" if ci else ""
                    parts.append(f"{side.upper()} {summary[side]['mean']:.2f}{spread}, n={summary[side]['n']}")
            lines.append(f"{criterion:<12} " + "; ".join(parts))
    return "\n".join(lines)
