"""Reward modelling: a scalar head on the transformer, read at each reply's last token, trained
on preference pairs with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin)
(plus optional reward centring); validated on the held-out pairs by pairwise accuracy (ties count
as wrong), mean margin and the rewards' mean and spread."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from hybridlm.data.instructions import held_out_split
from hybridlm.data.pair_rows import EncodedPair, PairSource, encode_pairs, side_row
from hybridlm.data.preferences import BUILTIN_PREFS, PAIRS_HELD_OUT_PERIOD, read_preferences
from hybridlm.device import autocast
from hybridlm.fileio import sha256_file
from hybridlm.model import HybridLM
from hybridlm.tokenizer import TextTokenizer
from hybridlm.train.objectives.base import Evaluator, Objective, Rows, SourceSet, StepContext
from hybridlm.train.validation import EVAL_BATCH, pair_scores

if TYPE_CHECKING:
    from hybridlm.train.config import RunConfig


def bradley_terry_loss(chosen_B: torch.Tensor, rejected_B: torch.Tensor, margin: float = 0.0,
                       center: float = 0.0) -> torch.Tensor:
    """Mean -log sigmoid(r_c - r_r - margin), plus center * mean((r_c + r_r)^2) when centring."""
    loss = -F.logsigmoid(chosen_B - rejected_B - margin).mean()
    return loss + center * ((chosen_B + rejected_B) ** 2).mean() if center else loss


def reward_figures(chosen_N: torch.Tensor, rejected_N: torch.Tensor, margin: float = 0.0,
                   center: float = 0.0) -> dict:
    """Validation figures of a reward model on pairs: a tie is not a win."""
    both = torch.cat([chosen_N, rejected_N])
    return {"loss": float(bradley_terry_loss(chosen_N, rejected_N, margin, center)),
            "accuracy": float((chosen_N > rejected_N).float().mean()),
            "margin": float((chosen_N - rejected_N).mean()),
            "reward_mean": float(both.mean()), "reward_std": float(both.std()) if len(both) > 1 else 0.0,
            "pairs": len(chosen_N)}


def pair_rewards(model: HybridLM, pairs: list[EncodedPair], seq_len: int, pad_id: int, dtype: str) -> torch.Tensor:
    """Rewards (N, 2) of (chosen, rejected) for each pair, in eval mode."""
    return pair_scores(model, pairs, seq_len, pad_id, dtype, lambda m, ids, _, last: m(ids, reward_at_B=last))


@torch.no_grad()
def reply_rewards(model: HybridLM, prompts: list[list[int]], replies: list[list[int]], seq_len: int, pad_id: int,
                  dtype: str) -> torch.Tensor:
    """The reward (N,) of each reply token list after its rendered prompt, read at its last token."""
    device = next(model.parameters()).device
    found = []
    for start in range(0, len(prompts), EVAL_BATCH):
        rows = [side_row(p, r, seq_len, pad_id) for p, r in
                zip(prompts[start : start + EVAL_BATCH], replies[start : start + EVAL_BATCH])]
        ids = torch.from_numpy(np.stack([row[0] for row in rows])).to(device)
        last = torch.tensor([row[2] for row in rows], device=device)
        with autocast(dtype, device):
            found.append(model(ids, reward_at_B=last).double().cpu())
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.float64)


def preference_sources(cfg: RunConfig, tokenizer: TextTokenizer,
                       evaluator: Callable[[str, list[EncodedPair], list[EncodedPair]], tuple]) -> SourceSet:
    """Rows and evaluators of every preference source: pairs encoded once, held out by
    PAIRS_HELD_OUT_PERIOD; `evaluator(spec, train, held)` returns (row source, evaluator)."""
    found = SourceSet()
    for spec, weight in cfg.data.weights().items():
        prefs = read_preferences(spec, cfg.data.unshared_pairs)
        held, train = held_out_split(encode_pairs(tokenizer, prefs.pairs), PAIRS_HELD_OUT_PERIOD)
        found.rows[spec], found.evaluators[spec] = evaluator(spec, train, held or train)
        found.lineage.append({"spec": spec, "weight": weight, "pairs": len(prefs.pairs), "held_out": len(held),
                              "skipped_lines": prefs.skipped_lines,
                              "sha256": None if spec == BUILTIN_PREFS else sha256_file(Path(spec))})
    return found


class PairObjective(Objective):
    """What rm and dpo share: preference files as sources, one pair as the unit of the loss."""

    reads_prepared = False

    def check_source(self, spec: str, cfg: RunConfig) -> None:
        read_preferences(spec, cfg.data.unshared_pairs)

    def units(self, rows: Rows) -> int:
        return rows[0].shape[0]


class RewardModelling(PairObjective):
    name = "rm"
    head = "reward"
    merged_metrics = ("loss", "accuracy", "margin", "reward_mean", "reward_std")

    def sources(self, cfg: RunConfig, tokenizer: TextTokenizer) -> SourceSet:
        pad, seq_len = tokenizer.special_ids["pad"], cfg.data.seq_len

        def evaluator(spec: str, train: list[EncodedPair], held: list[EncodedPair]) -> tuple[PairSource, Evaluator]:
            def evaluate(model: HybridLM, dtype: str) -> dict:
                rewards = pair_rewards(model, held, seq_len, pad, dtype)
                return reward_figures(rewards[:, 0], rewards[:, 1], cfg.rm.margin, cfg.rm.center_rewards)
            return PairSource(train, pad), evaluate

        return preference_sources(cfg, tokenizer, evaluator)

    def loss(self, model: Callable, rows: Rows, ctx: StepContext) -> torch.Tensor:
        ids_B2T, _, last_B2 = rows[:3]
        rewards_B2 = model(ids_B2T.flatten(0, 1), reward_at_B=last_B2.flatten()).view(-1, 2)
        return bradley_terry_loss(rewards_B2[:, 0], rewards_B2[:, 1], ctx.cfg.rm.margin, ctx.cfg.rm.center_rewards)
