"""Fixtures shared by the serving tests: an untrained "chatty" run whose replies run to max_tokens."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from hybridlm.config import ModelConfig
from hybridlm.fileio import atomic_write_json
from hybridlm.model import HybridLM
from hybridlm.run import load_run, save_final
from hybridlm.train.args import RunConfig, TrainConfig

CHATTY_CONTEXT = 8192
"""Long enough that one reply at max_tokens keeps a batch slot for seconds on a CPU (a few ms per
token), so a test can hold the slot, fill the queue or leave mid-stream without racing the model."""


@pytest.fixture(scope="session")
def chatty_run(tiny_run, tmp_path_factory) -> Path:
    """A run directory with random weights (tiny_run's tokenizer) whose replies run to max_tokens,
    so requests overlap for long: the logits of the special tokens (eos, <|end|>) are held at 0
    while the others spread around it. Dense + sparse layers with a short window and stride, so
    sparse caches roll; weights pushed off the initial ones and an untied head, so greedy
    replies depend on the context instead of repeating one token."""
    torch.manual_seed(0)
    tokenizer = load_run(tiny_run).tokenizer
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=3, n_head=4, n_kv_head=2,
                      d_model=64, max_seq_len=CHATTY_CONTEXT, layer_pattern="DSS", window=8, stride=5, n_global=2,
                      tie_embeddings=False)
    model = HybridLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        model.lm_head.weight[list(tokenizer.special_ids.values())] = 0.0
    out = tmp_path_factory.mktemp("chatty") / "chatty"
    out.mkdir()
    atomic_write_json(out / "config.json", RunConfig(model=cfg, train=TrainConfig(out=str(out))).to_dict())
    shutil.copy(tiny_run / "tokenizer.json", out / "tokenizer.json")
    save_final(out, model)
    return out
