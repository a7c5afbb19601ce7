"""Run directories for the export tests: one config per family of options the exported modelling
code must get right (positions, norms, FFN, grouped-query attention, global slots, tied heads)."""

from __future__ import annotations

from pathlib import Path

import torch

from hybridlm.config import ModelConfig
from hybridlm.fileio import atomic_write_json
from hybridlm.model import HybridLM
from hybridlm.run import save_final
from hybridlm.tokenizer import TextTokenizer
from hybridlm.train.config import DataConfig, RunConfig, TrainConfig

REMOTE_CONFIGS = {
    "learned-gqa-global": {"n_layer": 3, "n_head": 4, "n_kv_head": 2, "layer_pattern": "DSS", "window": 4,
                           "stride": 3, "n_global": 2, "position": "learned"},
    "sinusoidal-layernorm-gelu-untied": {"n_layer": 2, "n_head": 2, "layer_pattern": "SD", "window": 5, "stride": 4,
                                         "n_global": 0, "position": "sinusoidal", "norm": "layernorm", "ffn": "gelu",
                                         "bias": True, "tie_embeddings": False},
    "moe-top2-shared-bias": {"n_layer": 2, "n_head": 2, "layer_pattern": "DS", "window": 4, "stride": 3,
                                 "n_global": 1, "ffn": "moe", "moe_pattern": "MM", "n_experts": 4, "top_k": 2,
                                 "n_shared_experts": 1, "moe_balance": "bias"},
    "rope-mqa-sparse-only": {"n_layer": 2, "n_head": 4, "n_kv_head": 1, "layer_pattern": "SS", "window": 3,
                             "stride": 5, "n_global": 3, "position": "rope", "rope_theta": 500.0},
}
"""Besides the trained tiny run (RoPE, RMSNorm, SwiGLU, one dense and one sparse layer)."""


def make_run(root: Path, cfg: ModelConfig, tokenizer_path: Path) -> Path:
    """A run directory holding a randomly initialised model, every tensor (norms, biases, global
    slots included) moved away from its initial value so that a wrong mapping shows."""
    torch.manual_seed(0)
    model = HybridLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    run = root / "run"
    run.mkdir(parents=True)
    config = RunConfig(model=cfg, train=TrainConfig(out=str(run)), data=DataConfig(seq_len=cfg.max_seq_len))
    atomic_write_json(run / "config.json", config.to_dict())
    TextTokenizer.load(tokenizer_path).save(run / "tokenizer.json")
    save_final(run, model)
    return run


def family_run(name: str, tiny_run: Path, root: Path, **fields) -> Path:
    """The run of family `name` (tiny_run's tokenizer, a 64-token context; `fields` replaced) under `root`."""
    tokenizer = TextTokenizer.load(tiny_run / "tokenizer.json")
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, max_seq_len=64, **{**REMOTE_CONFIGS[name], **fields})
    return make_run(root, cfg, tiny_run / "tokenizer.json")
