"""Direct preference optimisation: the policy learns from preference pairs against a fixed
reference policy (default: train.init_from, the SFT parent) without a reward model. Losses as TRL
defines them: sigmoid -log sigmoid(beta * delta), with label smoothing eps conservative DPO
-(1 - eps) log sigmoid(beta * delta) - eps log sigmoid(-beta * delta), and ipo
(delta / tokens - 1 / (2 beta))^2 on per-token averaged log-ratios, where delta = (log pi(c) -
log ref(c)) - (log pi(r) - log ref(r)). The reference log-probabilities come from the on-disk
cache (train/reference_logps.py), so only the policy is in memory. Metrics carry TRL's names."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from hybridlm.data.pair_rows import EncodedPair, PairSource, pair_row
from hybridlm.device import default_device, resolve_dtype
from hybridlm.errors import UserError
from hybridlm.model import HybridLM
from hybridlm.model.loss import IGNORE_INDEX
from hybridlm.tokenizer import TextTokenizer
from hybridlm.train.objectives.base import Evaluator, Rows, SourceSet, StepContext
from hybridlm.train.objectives.rm import PairObjective, preference_sources
from hybridlm.train.reference_logps import pair_logps, reference_logps

if TYPE_CHECKING:
    from hybridlm.train.config import DPOConfig, RunConfig

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")


def dpo_losses(policy_N2: torch.Tensor, reference_N2: torch.Tensor, tokens_N2: torch.Tensor,
               cfg: DPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair loss (N,), implicit rewards beta * (log pi - log ref) (N, 2)) of summed reply
    log-probabilities; tokens_N2 counts each reply's scored tokens (ipo averages over them)."""
    ratios_N2 = policy_N2 - reference_N2
    if cfg.loss == "ipo":
        averaged_N2 = ratios_N2 / tokens_N2.clamp(min=1)
        losses_N = (averaged_N2[:, 0] - averaged_N2[:, 1] - 1 / (2 * cfg.beta)) ** 2
    else:
        delta_N = cfg.beta * (ratios_N2[:, 0] - ratios_N2[:, 1])
        eps = cfg.label_smoothing
        losses_N = -(1 - eps) * F.logsigmoid(delta_N) - eps * F.logsigmoid(-delta_N)
    return losses_N, cfg.beta * ratios_N2.detach()


def dpo_figures(policy_N2: torch.Tensor, reference_N2: torch.Tensor, tokens_N2: torch.Tensor, cfg: DPOConfig) -> dict:
    losses_N, rewards_N2 = dpo_losses(policy_N2, reference_N2, tokens_N2, cfg)
    return {"loss": float(losses_N.mean()), "rewards/chosen": float(rewards_N2[:, 0].mean()),
            "rewards/rejected": float(rewards_N2[:, 1].mean()),
            "rewards/accuracies": float((rewards_N2[:, 0] > rewards_N2[:, 1]).float().mean()),
            "rewards/margins": float((rewards_N2[:, 0] - rewards_N2[:, 1]).mean()),
            "logps/chosen": float(policy_N2[:, 0].mean()), "logps/rejected": float(policy_N2[:, 1].mean()),
            "pairs": len(losses_N)}


def reply_tokens(pairs: list[EncodedPair], seq_len: int) -> torch.Tensor:
    """Scored tokens (N, 2) of each reply as rows of seq_len hold them."""
    return torch.stack([torch.from_numpy((pair_row(p, seq_len, 0)[1] != IGNORE_INDEX).sum(-1)) for p in pairs])


class DirectPreference(PairObjective):
    name = "dpo"
    merged_metrics = METRICS

    def sources(self, cfg: RunConfig, tokenizer: TextTokenizer) -> SourceSet:
        reference = Path(cfg.dpo.reference or cfg.train.init_from)
        if not str(reference) or str(reference) == ".":
            raise UserError("a dpo run needs a reference policy: set train.init_from (the SFT run) or dpo.reference")
        pad, seq_len, dtype = tokenizer.special_ids["pad"], cfg.data.seq_len, cfg.train.dtype
        caches = []

        def evaluator(spec: str, train: list[EncodedPair], held: list[EncodedPair]) -> tuple[PairSource, Evaluator]:
            resolved = resolve_dtype(dtype, default_device())
            ref_N2, record = reference_logps(reference, tokenizer, train + held, seq_len, resolved,
                                             cfg.dpo.reference_cache)
            caches.append({"spec": spec, **record})
            ref_train, ref_held = ref_N2[: len(train)].numpy(), ref_N2[len(train) :]
            tokens_held = reply_tokens(held, seq_len)

            def evaluate(model: HybridLM, dtype: str) -> dict:
                policy = pair_logps(model, held, seq_len, pad, dtype)
                return dpo_figures(policy, ref_held, tokens_held, cfg.dpo)
            return PairSource(train, pad, ref_train), evaluate

        found = preference_sources(cfg, tokenizer, evaluator)
        for record, cache in zip(found.lineage, caches):
            record.update(reference=str(reference), reference_logps=cache)
        return found

    def loss(self, model: Callable, rows: Rows, ctx: StepContext) -> torch.Tensor:
        ids_B2T, targets_B2T, _, reference_B2 = rows
        logp_NT = model(ids_B2T.flatten(0, 1), targets_BT=targets_B2T.flatten(0, 1), per_token=True)
        policy_B2 = logp_NT.sum(-1).view(-1, 2).double()
        tokens_B2 = (targets_B2T != IGNORE_INDEX).sum(-1)
        return dpo_losses(policy_B2, reference_B2, tokens_B2, ctx.cfg.dpo)[0].mean()
