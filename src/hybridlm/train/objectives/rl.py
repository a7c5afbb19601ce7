"""Online reinforcement learning (GRPO / RLOO): the policy samples G completions of each prompt
through our own batched decoder, a reward model and/or a Python function scores them, each
completion's advantage is its reward relative to its group, and the policy follows the clipped
surrogate -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) per completion token, plus beta
times the k3 estimate of KL(policy || reference), averaged over the completion tokens of the batch
(TRL's "dapo" normalisation). One generated batch serves rl.updates_per_batch optimizer steps.

Prompts are the conversations of instruction sources up to their last reply; the reward function
receives the last user message of each and the completion text. Validation replies greedily to
held-out prompts and reports their mean reward.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from hybridlm.data.instructions import BUILTIN_QA, held_out_split, read_conversations
from hybridlm.data.pair_rows import side_row
from hybridlm.device import autocast, default_device, resolve_dtype
from hybridlm.errors import UserError
from hybridlm.fileio import sha256_file
from hybridlm.inference.decode import generate_samples
from hybridlm.inference.sampling import SamplingParams
from hybridlm.model import HybridLM
from hybridlm.model.converters.lora import adapters_disabled, has_lora
from hybridlm.model.loss import IGNORE_INDEX
from hybridlm.run import load_run
from hybridlm.settings import import_callable
from hybridlm.tokenizer import TextTokenizer
from hybridlm.tokenizer.chat import render_chat
from hybridlm.train.objectives.rm import reply_rewards
from hybridlm.train.objectives.base import Evaluator, Objective, Rows, SourceSet, StepContext, record

if TYPE_CHECKING:
    from hybridlm.train.config import RLConfig, RunConfig

EVAL_PROMPTS = 32
"""Held-out prompts validation replies to (greedy)."""


def group_advantages(rewards_PG: torch.Tensor, kind: str) -> torch.Tensor:
    """Advantages (P, G): grpo (r - mean) / (std + 1e-4), std unbiased as TRL's; rloo r minus the
    mean of the group's other rewards."""
    mean_P1 = rewards_PG.mean(dim=1, keepdim=True)
    if kind == "rloo":
        G = rewards_PG.shape[1]
        return (rewards_PG - mean_P1) * G / (G - 1)
    return (rewards_PG - mean_P1) / (rewards_PG.std(dim=1, keepdim=True) + 1e-4)


def k3_kl(policy_logp: torch.Tensor, reference_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): exp(d) - d - 1 with d = ref - policy (>= 0)."""
    d = reference_logp - policy_logp
    return torch.exp(d) - d - 1


def clipped_policy_loss(logp_NT: torch.Tensor, old_NT: torch.Tensor, advantages_N: torch.Tensor,
                        clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, per-token clipped flag): the PPO surrogate of each completion token."""
    ratio = torch.exp(logp_NT - old_NT)
    A = advantages_N[:, None]
    loss = -torch.minimum(ratio * A, ratio.clamp(1 - clip, 1 + clip) * A)
    clipped = ((ratio < 1 - clip) & (A < 0)) | ((ratio > 1 + clip) & (A > 0))
    return loss, clipped


class RewardJudge:
    """The weighted sum of a reward model's score and a reward function's value."""

    def __init__(self, cfg: RLConfig, tokenizer: TextTokenizer, seq_len: int) -> None:
        self.cfg, self.seq_len, self.pad = cfg, seq_len, tokenizer.special_ids["pad"]
        self.function = import_callable(cfg.reward_function, "rl.reward_function") if cfg.reward_function else None
        if self.function is not None:
            self._check_values(self.function(["a prompt", "another"], ["a reply", "another reply"]), 2)
        self.model = None
        if cfg.reward_model:
            run = load_run(Path(cfg.reward_model))
            if run.model.cfg.head != "reward":
                raise UserError(f"rl.reward_model {cfg.reward_model} is not a reward model (model.head = "
                                f"{run.model.cfg.head!r}); train one with train.objective = \"rm\"")
            if run.tokenizer.sha256() != tokenizer.sha256():
                raise UserError(f"rl.reward_model {cfg.reward_model} uses another tokenizer than this run")
            self.model = run.model.to(default_device())

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]], prompt_texts: list[str], completions: list[list[int]],
                 texts: list[str], dtype: str) -> torch.Tensor:
        total = torch.zeros(len(completions), dtype=torch.float64)
        if self.model is not None:
            total += self.cfg.reward_model_weight * self._scores(prompts, completions, dtype)
        if self.function is not None:
            values = self._check_values(self.function(prompt_texts, texts), len(texts))
            total += self.cfg.reward_function_weight * torch.tensor(values, dtype=torch.float64)
        return total

    def _check_values(self, values: object, expected: int) -> list[float]:
        """The function's values as floats; anything but one number per completion is refused (it is
        called once on two probe completions before training starts)."""
        if not isinstance(values, (list, tuple)) or len(values) != expected:
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else f"a {type(values).__name__}"
            raise UserError(f"rl.reward_function {self.cfg.reward_function} returned {got} for {expected} "
                            "completions; return a list with one float per completion")
        try:
            return [float(v) for v in values]
        except (TypeError, ValueError):
            raise UserError(f"rl.reward_function {self.cfg.reward_function} returned a value that is not a "
                            "number; return floats") from None

    def _scores(self, prompts: list[list[int]], completions: list[list[int]], dtype: str) -> torch.Tensor:
        return reply_rewards(self.model, prompts, completions, self.seq_len, self.pad, dtype)  # eval mode: load_run


class PromptSource:
    """Rows of one prompt each: (ids (T,) left-truncated to leave room for the completion, then
    right-padded; meta (3,) = [length, source number, prompt index])."""

    def __init__(self, prompts: list[list[int]], number: int, room: int, pad_id: int) -> None:
        self.prompts, self.number, self.room, self.pad_id = prompts, number, room, pad_id

    def draw(self, rng: np.random.Generator, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        index = int(rng.integers(0, len(self.prompts)))
        ids = self.prompts[index][-(seq_len - self.room) :]
        row = np.full(seq_len, self.pad_id, dtype=np.int64)
        row[: len(ids)] = ids
        return row, np.array([len(ids), self.number, index], dtype=np.int64)


def split_prompts(spec: str, tokenizer: TextTokenizer) -> tuple[list, list]:
    """(held-out, training) (prompt ids, last user text) of an instruction source's conversations."""
    prompts = []
    for conversation in read_conversations(spec):
        last_reply = max(i for i, m in enumerate(conversation) if m.role == "assistant")
        before = conversation[:last_reply]
        users = [m.content for m in before if m.role == "user"]
        prompts.append((render_chat(tokenizer, before, add_generation_prompt=True)[0], users[-1] if users else ""))
    return held_out_split(prompts)


class OnlineRL(Objective):
    name = "rl"
    reads_prepared = False
    merged_metrics = ("reward", "completion_length")

    def check_source(self, spec: str, cfg: RunConfig) -> None:
        if spec != BUILTIN_QA:
            read_conversations(spec)

    def sources(self, cfg: RunConfig, tokenizer: TextTokenizer) -> SourceSet:
        judge = RewardJudge(cfg.rl, tokenizer, cfg.data.seq_len)
        found = SourceSet(state={"judge": judge, "texts": [], "samples": []})
        pad, room = tokenizer.special_ids["pad"], cfg.rl.max_new_tokens
        for number, (spec, weight) in enumerate(cfg.data.weights().items()):
            held, train = split_prompts(spec, tokenizer)
            found.rows[spec] = PromptSource([ids for ids, _ in train], number, room, pad)
            found.state["texts"].append([text for _, text in train])
            found.evaluators[spec] = self._evaluator(held[:EVAL_PROMPTS] or train[:EVAL_PROMPTS], cfg, tokenizer, judge)
            found.lineage.append({"spec": spec, "weight": weight, "prompts": len(train) + len(held),
                                  "held_out": len(held), "reward_model": cfg.rl.reward_model or None,
                                  "reward_function": cfg.rl.reward_function or None,
                                  "sha256": None if spec == BUILTIN_QA else sha256_file(Path(spec))})
        if cfg.rl.beta and not cfg.lora.r:
            found.state["reference"] = load_run(Path(cfg.train.init_from)).model.to(default_device())
        return found

    def _evaluator(self, prompts: list, cfg: RunConfig, tokenizer: TextTokenizer, judge: RewardJudge) -> Evaluator:
        end = tokenizer.special_ids["end"]
        room = cfg.rl.max_new_tokens

        def evaluate(model: HybridLM, dtype: str) -> dict:
            greedy = SamplingParams(max_new_tokens=room, temperature=0.0)
            was_training = model.training
            model.eval()
            ids = [p[-(cfg.data.seq_len - room) :] for p, _ in prompts]
            with autocast(dtype, next(model.parameters()).device):
                replies = [generate_samples(model, p, greedy, n=1, eos_id=end)[0] for p in ids]
            model.train(was_training)
            texts = [tokenizer.decode([t for t in r if t != end]) for r in replies]
            rewards = judge(ids, [t for _, t in prompts], replies, texts, dtype)
            return {"reward": float(rewards.mean()), "completion_length": float(np.mean([len(r) for r in replies])),
                    "prompts": len(prompts)}

        return evaluate

    def batch(self, rows: Rows, first_row: int, ctx: StepContext) -> Rows:
        """Fresh samples at the first step of every rl.updates_per_batch, micro-batch by micro-batch;
        the same ones, in the same order, at the steps after."""
        state = ctx.state
        if state.get("step") != ctx.step:
            state["step"], state["micro"] = ctx.step, 0
        micro = state["micro"]
        state["micro"] += 1
        if ctx.step % ctx.cfg.rl.updates_per_batch == 0:
            if micro == 0:
                state["samples"].clear()
            state["samples"].append(self._generate(rows, first_row, ctx))
        return state["samples"][micro]

    def _generate(self, rows: Rows, first_row: int, ctx: StepContext) -> Rows:
        cfg, tokenizer, model = ctx.cfg, ctx.tokenizer, ctx.model
        dtype, device = resolve_dtype(cfg.train.dtype, default_device()), next(model.parameters()).device
        end, pad, G = tokenizer.special_ids["end"], tokenizer.special_ids["pad"], cfg.rl.group_size
        prompt_rows, meta = rows
        prompts = [prompt_rows[i, : int(meta[i, 0])].tolist() for i in range(len(meta))]
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        completions = []
        with autocast(dtype, device):
            for i, prompt in enumerate(prompts):
                params = SamplingParams(max_new_tokens=cfg.rl.max_new_tokens, temperature=cfg.rl.temperature,
                                        seed=(cfg.train.seed * 1_000_003 + first_row + i) * G)
                completions += generate_samples(model, prompt, params, n=G, eos_id=end)
        generation_s = time.perf_counter() - started
        repeated = [p for p in prompts for _ in range(G)]
        texts = [tokenizer.decode([t for t in c if t != end]) for c in completions]
        prompt_texts = [ctx.state["texts"][int(meta[i, 1])][int(meta[i, 2])] for i in range(len(meta)) for _ in range(G)]
        rewards = ctx.state["judge"](repeated, prompt_texts, completions, texts, dtype)
        advantages = group_advantages(rewards.view(-1, G), cfg.rl.advantage).flatten().float().to(device)
        ids, targets = (t.to(device) for t in self._sequences(repeated, completions, cfg.data.seq_len, pad))
        with torch.no_grad(), autocast(dtype, device):
            old = model(ids, targets_BT=targets, per_token=True)
            reference = self._reference_logps(ctx, ids, targets) if cfg.rl.beta else old
        model.train(was_training)
        record(ctx.state, reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
               completion_length=float(np.mean([len(c) for c in completions])),
               generated_tokens=sum(len(c) for c in completions), generation_s=generation_s)
        return ids, targets, old.detach(), reference.detach(), advantages

    @staticmethod
    def _sequences(prompts: list[list[int]], completions: list[list[int]], seq_len: int, pad: int):
        rows = [side_row(p, c, seq_len, pad) for p, c in zip(prompts, completions)]
        return (torch.from_numpy(np.stack([r[0] for r in rows])), torch.from_numpy(np.stack([r[1] for r in rows])))

    @staticmethod
    def _reference_logps(ctx: StepContext, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if has_lora(ctx.model):
            with adapters_disabled(ctx.model):
                return ctx.model(ids, targets_BT=targets, per_token=True)
        return ctx.state["reference"](ids, targets_BT=targets, per_token=True)

    def units(self, rows: Rows) -> int:
        return int((rows[1] != IGNORE_INDEX).sum())

    def loss(self, model: Callable, rows: Rows, ctx: StepContext) -> torch.Tensor:
        ids, targets, old, reference, advantages = rows
        mask = targets != IGNORE_INDEX
        logp = model(ids, targets_BT=targets, per_token=True)
        per_token, clipped = clipped_policy_loss(logp, old, advantages, ctx.cfg.rl.clip)
        count = mask.sum().clamp(min=1)
        record(ctx.state, clip_fraction=float((clipped & mask).sum() / count))
        if ctx.cfg.rl.beta:
            kl = k3_kl(logp, reference)
            per_token = per_token + ctx.cfg.rl.beta * kl
            record(ctx.state, kl=float((kl.detach() * mask).sum() / count))
        return (per_token * mask).sum() / count
