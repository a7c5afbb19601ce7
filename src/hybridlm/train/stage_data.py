"""What a training run reads: its sources, their mixture, the tokenizer, and validation.

Causal-LM (`clm`) sources are directories made by `hybridlm prepare` (all with one tokenizer);
instruction-tuning (`sft`) sources are instruction files or `stdlib-docs:qa`, rendered with the
chat template. The conversations data/instructions.py's held_out_split picks are kept for validation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hybridlm.data.instructions import BUILTIN_QA, held_out_split, read_conversations
from hybridlm.data.loader import TokenStream, eval_windows
from hybridlm.data.masking import mask_tokens
from hybridlm.data.mixture import ExampleSource, Mixture, WindowSource, padded_row
from hybridlm.data.prepare import load_meta
from hybridlm.device import autocast
from hybridlm.errors import UserError
from hybridlm.eval.masked import masked_hits
from hybridlm.eval.perplexity import evaluate_split
from hybridlm.fileio import sha256_file
from hybridlm.model import HybridLM
from hybridlm.model.loss import IGNORE_INDEX
from hybridlm.tokenizer import TextTokenizer
from hybridlm.tokenizer.chat import render_chat
from hybridlm.train.args import TrainConfig

EVAL_BATCH = 16


@dataclass
class StageData:
    mixture: Mixture
    tokenizer: TextTokenizer
    evaluate: Callable[[HybridLM, str], dict]
    lineage: list[dict]  # one record per source: spec, weight, hashes


def source_weights(tcfg: TrainConfig) -> dict[str, float]:
    weights = dict(tcfg.mixture) or ({tcfg.data: 1.0} if tcfg.data else {})
    if not weights:
        raise UserError("no training data: set train.data (a `hybridlm prepare` directory) or train.mixture")
    return weights


def stage_tokenizer(tcfg: TrainConfig) -> TextTokenizer:
    """train.tokenizer, else the first prepared source's, else the tokenizer of train.init_from."""
    if tcfg.tokenizer:
        return TextTokenizer.load(Path(tcfg.tokenizer))
    if tcfg.objective != "sft":
        first = Path(next(iter(source_weights(tcfg))))
        load_meta(first)  # says "not a prepared data directory" rather than "no tokenizer"
        return TextTokenizer.load(first / "tokenizer.json")
    if tcfg.init_from:
        return TextTokenizer.load(Path(tcfg.init_from) / "tokenizer.json")
    raise UserError("an sft run needs a tokenizer: set train.tokenizer or train.init_from")


def check_sources(tcfg: TrainConfig) -> None:
    """Fail now if a source is missing or malformed: what a recipe checks for every stage before it
    trains any (built-in question/answer pairs are generated, not read, so they are not checked)."""
    for spec in source_weights(tcfg):
        if tcfg.objective != "sft":
            load_meta(Path(spec))
        elif spec != BUILTIN_QA:
            read_conversations(spec)


def build_stage_data(tcfg: TrainConfig, tokenizer: TextTokenizer) -> StageData:
    weights = source_weights(tcfg)
    build = _sft_sources if tcfg.objective == "sft" else _clm_sources
    sources, evaluators, lineage = build(tcfg, weights, tokenizer)
    mixture = Mixture(sources, weights, tcfg.seed)

    def evaluate(model: HybridLM, dtype: str) -> dict:
        per_source = {name: fn(model, dtype) for name, fn in evaluators.items()}
        total = sum(weights.values())
        merged = {k: sum(weights[n] * r[k] for n, r in per_source.items()) / total
                  for k in next(iter(per_source.values())) if k in ("loss", "bpb", "accuracy")}
        return {**merged, "by_source": per_source}

    return StageData(mixture, tokenizer, evaluate, lineage)


def _clm_sources(tcfg: TrainConfig, weights: dict[str, float], tokenizer: TextTokenizer):
    sources, evaluators, lineage = {}, {}, []
    for spec, weight in weights.items():
        meta = load_meta(Path(spec))
        if meta["tokenizer_sha256"] != tokenizer.sha256():
            raise UserError(f"{spec} was prepared with another tokenizer than this run's; prepare every source "
                            "with the same tokenizer.json")
        sources[spec] = WindowSource(Path(spec), "train", tcfg.seq_len)
        evaluators[spec] = (_masked_evaluator if tcfg.objective == "mlm" else _split_evaluator)(Path(spec), tcfg,
                                                                                               tokenizer)
        lineage.append({"spec": spec, "weight": weight, "meta_sha256": sha256_file(Path(spec) / "meta.json"),
                        "sources": meta["sources"]})
    return sources, evaluators, lineage


def _split_evaluator(data_dir: Path, tcfg: TrainConfig, tokenizer: TextTokenizer):
    return lambda model, dtype: evaluate_split(model, data_dir, tcfg.seq_len, tcfg.eval_tokens, dtype)


def mask_rows(x_BT: torch.Tensor, first_row: int, seed: int, tokenizer: TextTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """RoBERTa masking of rows numbered first_row..: each row's pattern comes from (seed, row), so it
    is new for every row drawn (dynamic masking) and the same for any split over ranks."""
    specials = sorted(set(tokenizer.special_ids.values()))
    rows = [mask_tokens(x_BT[i : i + 1], torch.Generator().manual_seed(seed * 1_000_003 + first_row + i),
                        mask_id=tokenizer.special_ids["mask"], vocab_size=tokenizer.vocab_size, never_mask=specials)
            for i in range(x_BT.shape[0])]
    inputs, targets = zip(*rows)
    return torch.cat(inputs), torch.cat(targets)


def _masked_evaluator(data_dir: Path, tcfg: TrainConfig, tokenizer: TextTokenizer):
    """Masked-LM validation: loss and masked-token accuracy on validation windows, masked with a fixed
    seed so every evaluation scores the same positions."""
    whole = [w[: tcfg.seq_len] for w in eval_windows(TokenStream(data_dir, "val"), tcfg.seq_len, tcfg.eval_tokens)
             if len(w) > tcfg.seq_len]
    if not whole:
        raise UserError(f"{data_dir} has fewer than {tcfg.seq_len + 1} validation tokens; lower train.seq_len")
    x_BT, y_BT = mask_rows(torch.stack(whole).long(), 0, tcfg.seed, tokenizer)

    @torch.no_grad()
    def evaluate(model: HybridLM, dtype: str) -> dict:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        nats, correct, counted = 0.0, 0, 0
        for i in range(0, len(x_BT), EVAL_BATCH):
            x, y = x_BT[i : i + EVAL_BATCH].to(device), y_BT[i : i + EVAL_BATCH].to(device)
            with autocast(dtype, device):
                logits_BTV = model(x, causal=False)  # one forward for both the loss and the accuracy
            scored = y != IGNORE_INDEX
            nats += float(F.cross_entropy(logits_BTV[scored].float(), y[scored], reduction="sum"))
            hits, count = masked_hits(logits_BTV, y)
            correct, counted = correct + hits, counted + count
        model.train(was_training)
        return {"loss": nats / max(counted, 1), "accuracy": correct / max(counted, 1), "tokens": counted}

    return evaluate


def _sft_sources(tcfg: TrainConfig, weights: dict[str, float], tokenizer: TextTokenizer):
    sources, evaluators, lineage = {}, {}, []
    pad = tokenizer.special_ids["pad"]
    for spec, weight in weights.items():
        rendered = [render_chat(tokenizer, c) for c in read_conversations(spec)]
        held_out, train = held_out_split(rendered)
        sources[spec] = ExampleSource(train, pad)
        evaluators[spec] = _held_out_evaluator(held_out or train, tcfg.seq_len, pad)
        lineage.append({"spec": spec, "weight": weight, "examples": len(rendered), "held_out": len(held_out),
                        "sha256": None if spec == BUILTIN_QA else sha256_file(Path(spec))})
    return sources, evaluators, lineage


def _held_out_evaluator(examples: list, seq_len: int, pad: int):
    rows = [padded_row(ids, trained, seq_len, pad) for ids, trained in examples]

    @torch.no_grad()
    def evaluate(model: HybridLM, dtype: str) -> dict:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        nats, tokens = 0.0, 0
        for i in range(0, len(rows), EVAL_BATCH):
            x, y = (torch.from_numpy(np.stack(p)).to(device) for p in zip(*rows[i : i + EVAL_BATCH]))
            count = int((y != IGNORE_INDEX).sum())
            with autocast(dtype, device):
                nats += float(model(x, targets_BT=y)) * count
            tokens += count
        model.train(was_training)
        return {"loss": nats / max(tokens, 1), "tokens": tokens}

    return evaluate
