"""Training configuration and the resolved run config (model + training) built from TOML."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from hybridlm.config import ModelConfig, preset
from hybridlm.errors import UserError
from hybridlm.settings import apply_overrides, build, checked_kwargs, load_toml
from hybridlm.train.distributed import PARALLEL

DTYPES = ("auto", "bf16", "fp32")
OBJECTIVES = ("clm", "mlm", "sft")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass(kw_only=True)
class TrainConfig:
    """How to train: data, run directory, optimisation and bookkeeping."""

    data: str = ""
    """Prepared data directory (from `hybridlm prepare`); shorthand for a mixture of one source."""
    mixture: dict = dataclasses.field(default_factory=dict)
    """{source: weight}: prepared directories (clm) or instruction files / stdlib-docs:qa (sft)."""
    objective: str = "clm"
    """clm (next-token prediction on text), mlm (masked tokens, bidirectional attention) or sft
    (instruction tuning: loss on assistant replies)."""
    init_from: str = ""
    """A finished run directory whose weights this run starts from (optimizer state starts fresh)."""
    init_optimizer: bool = False
    """Also start from the AdamW moments of init_from's last checkpoint (default: fresh)."""
    tokenizer: str = ""
    """tokenizer.json to use; default: the first prepared source's, or that of init_from."""
    out: str = "runs/run"
    """Run directory to write."""
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 8
    """Sequences per micro-batch, over all ranks together (each of N ranks takes batch_size / N)."""
    batch_size_start: int = 0
    """Progressive training: start with this many sequences and grow linearly to batch_size over
    batch_ramp_steps; 0 = no ramp."""
    batch_ramp_steps: int = 0
    seq_len_start: int = 0
    """Progressive training: start with sequences of this length and grow linearly to seq_len over
    seq_len_warmup_steps; 0 = no warmup."""
    seq_len_warmup_steps: int = 0
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    seq_len: int = 256
    """Tokens per training sequence (at most model.max_seq_len)."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine decay, as a fraction of lr."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    schedule: str = "cosine"
    """After warmup: cosine or linear decay to lr * min_lr_ratio, or constant."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices and embeddings (not on norms and biases)."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    dtype: str = "auto"
    """auto (bf16 where the hardware has it), bf16 (autocast, fp32 master weights) or fp32."""
    eval_every: int = 100
    """Evaluate on the validation split every N steps (and at the end); 0 = only at the end."""
    eval_tokens: int = 65536
    """Validation tokens per evaluation."""
    checkpoint_every: int = 100
    """Write a checkpoint every N steps (and at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    log_every: int = 10
    """Write a training record to metrics.jsonl every N steps."""
    max_bad_steps: int = 5
    """Steps with a non-finite loss or gradient are skipped; this many in a row stop the run."""
    parallel: str = "ddp"
    """Under torchrun: ddp (DistributedDataParallel) or fsdp (FSDP2 fully_shard)."""
    compile: bool = False
    """torch.compile the model for training steps: 1.15-1.19x per step on `small` at batch 8 x 1024 and
    32 x 256, but no gain on the quickstart's settings (docs/benchmarks.md); off by default."""
    seed: int = 1337

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_tokens", "checkpoint_every",
                     "keep_checkpoints", "log_every", "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise UserError(f"train.{name} must be > 0 (got {getattr(self, name)})")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise UserError("train.lr must be > 0 and train.min_lr_ratio in [0, 1]")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise UserError("train.warmup_steps, eval_every, grad_clip and weight_decay must be >= 0")
        if self.objective not in OBJECTIVES:
            raise UserError(f"train.objective must be one of {', '.join(OBJECTIVES)} (got {self.objective!r})")
        if self.schedule not in SCHEDULES:
            raise UserError(f"train.schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})")
        if not isinstance(self.mixture, dict) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in self.mixture.values()
        ) or (self.mixture and sum(self.mixture.values()) <= 0):
            raise UserError("train.mixture must map sources to weights >= 0 that sum to a positive number, "
                            'e.g. {"data/a" = 0.7, "data/b" = 0.3}')
        for start, length, span in (("batch_size_start", "batch_size", "batch_ramp_steps"),
                                    ("seq_len_start", "seq_len", "seq_len_warmup_steps")):
            if getattr(self, start) and not (0 < getattr(self, start) <= getattr(self, length)
                                             and getattr(self, span) > 0):
                raise UserError(f"train.{start} must be in [1, train.{length}] with train.{span} > 0 "
                                f"(got {getattr(self, start)} and {getattr(self, span)}); 0 turns it off")
        if self.parallel not in PARALLEL:
            raise UserError(f"train.parallel must be one of {', '.join(PARALLEL)} (got {self.parallel!r})")
        if self.dtype not in DTYPES:
            raise UserError(f"train.dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig
    train: TrainConfig

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "train": dataclasses.asdict(self.train)}


def load_run_config(path: Path | None, overrides: list[str]) -> RunConfig:
    """Read a TOML config (sections [model] and [train]), apply overrides, validate."""
    doc = apply_overrides(load_toml(path) if path else {}, overrides)
    unknown = sorted(set(doc) - {"model", "train"})
    if unknown:
        raise UserError(f"unknown config section(s) {', '.join(unknown)}; known sections: model, train")
    return run_config_from_dict(doc)


def run_config_from_dict(doc: dict) -> RunConfig:
    """[model] takes any ModelConfig field plus `preset` (fields then override the preset)."""
    model_kwargs = checked_kwargs(ModelConfig, dict(doc.get("model", {})), "model", extra={"preset": str})
    preset_name = model_kwargs.pop("preset", None)
    model = preset(preset_name, **model_kwargs) if preset_name else ModelConfig(**model_kwargs)
    train = build(TrainConfig, dict(doc.get("train", {})), "train")
    if train.seq_len > model.max_seq_len:
        raise UserError(f"train.seq_len ({train.seq_len}) exceeds model.max_seq_len ({model.max_seq_len})")
    return RunConfig(model=model, train=train)
