"""The run config: [model] plus one section per concern of training, from TOML and overrides.

```toml
[model]        # ModelConfig fields, or preset = "small" plus fields that override it
[train]        # the run itself: out, objective, steps, init_from, dtype, seed, ...
[data]         # what batches hold: path or mixture, tokenizer, seq_len, batch_size, grad_accum
[optim]        # AdamW: lr, weight_decay, beta1, beta2, grad_clip
[schedule]     # learning rate over steps: warmup_steps, decay, min_lr_ratio
[progressive]  # growing batches: seq_len_start + seq_len_warmup_steps, batch_size_start + batch_ramp_steps
[eval]         # validation: every, tokens
[checkpoint]   # every, keep
[parallel]     # strategy under torchrun: ddp or fsdp
[lora]         # LoRA adapters: r, alpha, dropout, targets
[rm] [dpo] [rl]  # settings of the rm, dpo and rl objectives (only in a run of that objective)
```

Overrides on the command line name the section: `optim.lr=3e-4 data.seq_len=512`. Why sections
(as serve/config.py has): each validates its own fields in `__post_init__` with a message that
names the fix, the field docstrings are what `hybridlm train --help-config` prints, and a
reader finds a setting next to the others of its kind. The resolved config is saved in the run
directory as config.json in the same shape.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from hybridlm.config import PRESETS, ModelConfig, preset
from hybridlm.errors import UserError
from hybridlm.settings import (
    apply_overrides,
    build,
    check_positive,
    checked_kwargs,
    describe_fields,
    load_toml,
    toml_value,
)

DTYPES = ("auto", "bf16", "fp32")
DECAYS = ("cosine", "linear", "constant")
PARALLEL = ("ddp", "fsdp", "tp", "pp")
PP_SCHEDULES = ("gpipe", "1f1b")


def _one_of(section: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{section}.{name} must be one of {', '.join(choices)} (got {value!r})")


@dataclass(kw_only=True)
class TrainConfig:
    """The run itself: where it goes, what it learns, for how long, from where."""

    out: str = "runs/run"
    """Run directory to write."""
    objective: str = "clm"
    """clm (next-token prediction on text), mlm (masked tokens, bidirectional attention), sft
    (instruction tuning: loss on assistant replies), rm (a reward model on preference pairs) or
    dpo (direct preference optimisation against a reference policy) or rl (online reinforcement
    learning from a reward model and/or a reward function)."""
    steps: int = 200
    """Optimizer steps."""
    init_from: str = ""
    """A finished run directory whose weights this run starts from (optimizer state starts fresh)."""
    init_optimizer: bool = False
    """Also start from the AdamW moments of init_from's last checkpoint (default: fresh)."""
    dtype: str = "auto"
    """auto (bf16 where the hardware has it), bf16 (autocast, fp32 master weights) or fp32."""
    compile: bool = False
    """torch.compile the model for training steps. Off by default: with our fused C++ glue (AVX-512
    BF16 CPUs) the eager `small` step measured 1.05x faster than the compiled one at 8 x 1024 and
    32 x 256, and compiling took 19-43 s (docs/benchmarks.md); elsewhere it may still pay."""
    seed: int = 1337
    """Seeds the weights, the mixture's row order and masking."""
    log_every: int = 10
    """Write a training record to metrics.jsonl every N steps."""
    max_bad_steps: int = 5
    """Steps with a non-finite loss or gradient are skipped; this many in a row stop the run."""
    tracking: str = ""
    """"mlflow" logs the config, metrics, lineage and report plots to MLflow (the [mlops] extra); "" is off."""
    tracking_uri: str = ""
    """MLflow tracking URI (sqlite:///FILE.db, http://HOST:5000, ...); "" is MLflow's default."""
    experiment: str = "hybridlm"
    """MLflow experiment the run is logged under."""

    def __post_init__(self) -> None:
        from hybridlm.train.objectives import OBJECTIVES  # the registry of objectives, by name

        check_positive("train", steps=self.steps, log_every=self.log_every, max_bad_steps=self.max_bad_steps)
        _one_of("train", "objective", self.objective, tuple(OBJECTIVES))
        _one_of("train", "dtype", self.dtype, DTYPES)
        _one_of("train", "tracking", self.tracking, ("", "mlflow"))


@dataclass(kw_only=True)
class DataConfig:
    """What every batch holds and where it comes from."""

    path: str = ""
    """Prepared data directory (from `hybridlm prepare`); shorthand for a mixture of one source."""
    mixture: dict = field(default_factory=dict)
    """{source: weight}: prepared directories (clm, mlm), instruction files / stdlib-docs:qa (sft), or
    preference files / stdlib-docs:prefs (rm, dpo)."""
    tokenizer: str = ""
    """tokenizer.json to use; default: the first prepared source's, or that of train.init_from."""
    seq_len: int = 256
    """Tokens per training sequence (at most model.max_seq_len)."""
    batch_size: int = 8
    """Sequences per micro-batch, over all ranks together (each of N ranks takes batch_size / N)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    unshared_pairs: str = "error"
    """hh-rlhf pairs whose two dialogues do not share a prompt: error (refuse the file, naming the
    lines) or skip (leave them out; lineage.json lists their lines)."""

    def __post_init__(self) -> None:
        check_positive("data", seq_len=self.seq_len, batch_size=self.batch_size, grad_accum=self.grad_accum)
        _one_of("data", "unshared_pairs", self.unshared_pairs, ("error", "skip"))
        weights = self.mixture.values() if isinstance(self.mixture, dict) else [None]
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights) or (
            self.mixture and sum(weights) <= 0
        ):
            raise UserError("data.mixture must map sources to weights >= 0 that sum to a positive number, "
                            'e.g. {"data/a" = 0.7, "data/b" = 0.3}')

    def weights(self) -> dict[str, float]:
        """{source: weight}: the mixture, or data.path alone."""
        weights = dict(self.mixture) or ({self.path: 1.0} if self.path else {})
        if not weights:
            raise UserError("no training data: set data.path (a `hybridlm prepare` directory) or data.mixture")
        return weights


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW and gradient clipping."""

    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices and embeddings (not on norms and biases)."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.95
    """AdamW's second-moment decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""

    def __post_init__(self) -> None:
        check_positive("optim", lr=self.lr)
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise UserError("optim.weight_decay and optim.grad_clip must be >= 0")


@dataclass(kw_only=True)
class ScheduleConfig:
    """The learning rate over the run's steps."""

    warmup_steps: int = 20
    """Linear warmup steps."""
    decay: str = "cosine"
    """After warmup: cosine or linear decay to lr * min_lr_ratio, or constant."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the decay, as a fraction of optim.lr."""

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise UserError("schedule.warmup_steps must be >= 0 and schedule.min_lr_ratio in [0, 1]")
        _one_of("schedule", "decay", self.decay, DECAYS)


@dataclass(kw_only=True)
class ProgressiveConfig:
    """Progressive training: short sequences and/or few rows first, grown linearly; 0 turns each off."""

    seq_len_start: int = 0
    """Start with sequences of this length and grow linearly to data.seq_len over seq_len_warmup_steps."""
    seq_len_warmup_steps: int = 0
    """Steps over which sequences grow to data.seq_len."""
    batch_size_start: int = 0
    """Start with this many sequences and grow linearly to data.batch_size over batch_ramp_steps."""
    batch_ramp_steps: int = 0
    """Steps over which batches grow to data.batch_size."""

    def check(self, data: DataConfig) -> None:
        for start, full, span in (("batch_size_start", "batch_size", "batch_ramp_steps"),
                                  ("seq_len_start", "seq_len", "seq_len_warmup_steps")):
            begin = getattr(self, start)
            if begin and not (0 < begin <= getattr(data, full) and getattr(self, span) > 0):
                raise UserError(f"progressive.{start} must be in [1, data.{full}] with progressive.{span} > 0 "
                                f"(got {begin} and {getattr(self, span)}); 0 turns it off")


@dataclass(kw_only=True)
class EvalConfig:
    """Validation during training."""

    every: int = 100
    """Evaluate on the validation data every N steps (and at the end); 0 = only at the end."""
    tokens: int = 65536
    """Validation tokens per evaluation."""

    def __post_init__(self) -> None:
        check_positive("eval", tokens=self.tokens)
        if self.every < 0:
            raise UserError(f"eval.every must be >= 0 (got {self.every})")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Checkpoints: what a killed run resumes from."""

    every: int = 100
    """Write a checkpoint every N steps (and at the end)."""
    keep: int = 2
    """How many recent checkpoints to keep."""

    def __post_init__(self) -> None:
        check_positive("checkpoint", every=self.every, keep=self.keep)


@dataclass(kw_only=True)
class ParallelConfig:
    """Scale-out under torchrun (one process otherwise)."""

    strategy: str = "ddp"
    """ddp (DistributedDataParallel), fsdp (FSDP2 fully_shard), tp (tensor parallelism: every
    block split across all the processes, column-wise q/k/v and FFN in, row-wise out), or pp
    (pipeline parallelism: each process one stage of consecutive blocks)."""
    tp_degree: int = 0
    """With strategy = "tp": processes that split each block; 0 means all of them. Fewer make a
    (dp, tp) mesh: each group of tp_degree consecutive ranks splits the blocks, and FSDP2 shards
    the model across the groups, which read different rows."""
    pp_degree: int = 0
    """With strategy = "pp": pipeline stages; 0 means one per process. Fewer make a (pp, dp) mesh:
    each stage runs on world / pp_degree consecutive ranks, which read different rows and shard the
    model with FSDP2."""
    pp_schedule: str = "gpipe"
    """With strategy = "pp": gpipe (all forwards, then all backwards) or 1f1b (interleaved)."""
    pp_microbatches: int = 4
    """With strategy = "pp": micro-batches each batch is cut into (at least the number of stages)."""

    def __post_init__(self) -> None:
        _one_of("parallel", "strategy", self.strategy, PARALLEL)
        _one_of("parallel", "pp_schedule", self.pp_schedule, PP_SCHEDULES)
        if self.strategy != "pp" and (self.pp_schedule != "gpipe" or self.pp_microbatches != 4):
            raise UserError("parallel.pp_schedule and parallel.pp_microbatches apply to parallel.strategy = \"pp\"; "
                            "set it or leave them unset")
        if self.tp_degree < 0 or (self.tp_degree and self.strategy != "tp"):
            raise UserError(f"parallel.tp_degree ({self.tp_degree}) applies to parallel.strategy = \"tp\" and must "
                            "be >= 0 (0: all processes)")
        if self.pp_degree < 0 or (self.pp_degree and self.strategy != "pp"):
            raise UserError(f"parallel.pp_degree ({self.pp_degree}) applies to parallel.strategy = \"pp\" and must "
                            "be >= 0 (0: one stage per process)")
        if self.pp_microbatches < 1:
            raise UserError(f"parallel.pp_microbatches must be >= 1 (got {self.pp_microbatches})")


@dataclass(kw_only=True)
class RewardConfig:
    """Reward modelling (train.objective = "rm"): loss -log sigmoid(r_chosen - r_rejected - margin)."""

    margin: float = 0.0
    """A pair counts as won only by this much reward; 0 is the plain Bradley-Terry loss."""
    center_rewards: float = 0.0
    """Weight of mean((r_chosen + r_rejected)^2) added to the loss (TRL's center_rewards_coefficient):
    keeps rewards centred on 0; 0 is off."""

    def __post_init__(self) -> None:
        if self.margin < 0 or self.center_rewards < 0:
            raise UserError("rm.margin and rm.center_rewards must be >= 0")


DPO_LOSSES = ("sigmoid", "ipo")


@dataclass(kw_only=True)
class DPOConfig:
    """Direct preference optimisation (train.objective = "dpo") against cached reference log-probs."""

    beta: float = 0.1
    """Strength of the pull towards the reference (sigmoid: temperature of the implicit reward; ipo: tau)."""
    loss: str = "sigmoid"
    """sigmoid (DPO) or ipo (identity preference optimisation, per-token averaged log-ratios as in TRL)."""
    label_smoothing: float = 0.0
    """Conservative DPO: the assumed share of flipped labels, in [0, 0.5); sigmoid only."""
    reference: str = ""
    """Run directory of the reference policy; default train.init_from (the SFT parent)."""
    reference_cache: str = ""
    """Directory of the cached reference log-probabilities; default $HYBRIDLM_CACHE/reference-logps
    (HYBRIDLM_CACHE defaults to ~/.cache/hybridlm)."""

    def __post_init__(self) -> None:
        check_positive("dpo", beta=self.beta)
        _one_of("dpo", "loss", self.loss, DPO_LOSSES)
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"dpo.label_smoothing must be in [0, 0.5) (got {self.label_smoothing})")
        if self.label_smoothing and self.loss != "sigmoid":
            raise UserError("dpo.label_smoothing (conservative DPO) applies to dpo.loss = \"sigmoid\" only")


@dataclass(kw_only=True)
class LoRAConfig:
    """LoRA adapters (peft) on a stage: only they train and are saved; the base stays train.init_from."""

    r: int = 0
    """Adapter rank; 0 trains every weight instead (no LoRA)."""
    alpha: float = 16.0
    """Scale of the adapters' output: alpha / r times B @ A."""
    dropout: float = 0.0
    """Dropout on the adapters' input while training."""
    targets: list = field(default_factory=lambda: ["attn.qkv", "attn.proj"])
    """Linear layers to adapt, by name or dotted name end (attn.qkv, attn.proj, ffn.up, ffn.down, lm_head)."""

    def __post_init__(self) -> None:
        if self.r < 0 or not 0 <= self.dropout < 1:
            raise UserError(f"lora.r must be >= 0 and lora.dropout in [0, 1) (got {self.r}, {self.dropout})")
        if not isinstance(self.targets, list) or not self.targets or not all(isinstance(t, str) for t in self.targets):
            raise UserError('lora.targets must be a non-empty list of layer names, e.g. ["attn.qkv", "attn.proj"]')
        changed = [f.name for f in dataclasses.fields(self) if f.name != "r" and getattr(self, f.name) != (
            f.default_factory() if f.default is dataclasses.MISSING else f.default)]
        if changed and not self.r:
            raise UserError(f"lora.{changed[0]} is set but lora.r is 0 (LoRA off); set lora.r to the adapter rank")


ADVANTAGES = ("grpo", "rloo")


@dataclass(kw_only=True)
class RLConfig:
    """Online RL (train.objective = "rl"): samples from the policy, group-normalised advantages."""

    group_size: int = 4
    """Samples G per prompt; each one's advantage is relative to its group."""
    max_new_tokens: int = 32
    """Tokens sampled per completion at most (it ends earlier at the end-of-turn marker)."""
    temperature: float = 1.0
    """Sampling temperature of the completions."""
    advantage: str = "grpo"
    """grpo: (r - group mean) / (group std + 1e-4); rloo: r - the mean of the other G - 1 rewards."""
    updates_per_batch: int = 1
    """Optimizer steps on each generated batch; from the second on, the policy has moved and the clip acts."""
    clip: float = 0.2
    """PPO clip: the probability ratio's advantage counts only within [1 - clip, 1 + clip]."""
    beta: float = 0.0
    """Weight of the KL penalty to the reference (k3 estimator): train.init_from, or under LoRA the base
    with its adapters off; 0 keeps no reference."""
    reward_model: str = ""
    """A reward-model run (train.objective = "rm") that scores each completion."""
    reward_function: str = ""
    """module:function on the Python path, called as f(prompts, completions) -> list[float]."""
    reward_model_weight: float = 1.0
    """The reward is reward_model_weight x the model's score + reward_function_weight x the function's."""
    reward_function_weight: float = 1.0
    """See reward_model_weight."""

    def __post_init__(self) -> None:
        check_positive("rl", max_new_tokens=self.max_new_tokens, updates_per_batch=self.updates_per_batch,
                       clip=self.clip, temperature=self.temperature)
        _one_of("rl", "advantage", self.advantage, ADVANTAGES)
        if self.group_size < 2:
            raise UserError(f"rl.group_size must be >= 2: advantages compare samples of one prompt (got {self.group_size})")
        if self.beta < 0:
            raise UserError(f"rl.beta must be >= 0 (got {self.beta})")
        for source in ("reward_model", "reward_function"):
            if getattr(self, f"{source}_weight") != 1.0 and not getattr(self, source):
                raise UserError(f"rl.{source}_weight is set but rl.{source} is empty")
        if self.clip != 0.2 and self.updates_per_batch == 1:
            raise UserError("rl.clip acts only when rl.updates_per_batch > 1 (with one update the ratio is 1)")


SECTIONS: dict[str, type] = {
    "train": TrainConfig, "data": DataConfig, "optim": OptimConfig, "schedule": ScheduleConfig,
    "progressive": ProgressiveConfig, "eval": EvalConfig, "checkpoint": CheckpointConfig,
    "parallel": ParallelConfig, "lora": LoRAConfig, "rm": RewardConfig, "dpo": DPOConfig,
    "rl": RLConfig,
}
"""Every section of a run config besides [model], in the order --help-config prints them."""
OBJECTIVE_SECTIONS = {"rm": "rm", "dpo": "dpo", "rl": "rl"}
"""Sections that only one objective reads: {section: objective}; set in a run of another objective,
they are refused rather than ignored."""


@dataclass(kw_only=True)
class RunConfig:
    """A training run, resolved: the model and every section."""

    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    rm: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def __post_init__(self) -> None:
        if self.data.seq_len > self.model.max_seq_len:
            raise UserError(f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
        self.progressive.check(self.data)
        if self.train.objective == "rl":
            self._check_rl()
        if self.train.objective == "dpo" and self.progressive.seq_len_start:
            raise UserError("progressive.seq_len_start does not fit a dpo run: the cached reference log-probs are "
                            "of rows of data.seq_len tokens; leave it 0")
        if self.lora.r and not self.train.init_from:
            raise UserError("lora.r is set but there is no base to adapt: set train.init_from to a finished run")
        for section, objective in OBJECTIVE_SECTIONS.items():
            changed = [f.name for f in dataclasses.fields(getattr(self, section))
                       if getattr(getattr(self, section), f.name) != f.default]
            if changed and self.train.objective != objective:
                raise UserError(f"{section}.{changed[0]} is set but train.objective is {self.train.objective}; "
                                f"[{section}] applies to {objective} runs only (in a recipe, set it in that stage)")

    def _check_rl(self) -> None:
        if not (self.rl.reward_model or self.rl.reward_function):
            raise UserError("an rl run needs a reward: set rl.reward_model (an rm run) and/or rl.reward_function")
        if self.parallel.strategy == "fsdp":
            raise UserError("an rl run samples with whole weights on every rank; use parallel.strategy = \"ddp\"")
        if self.checkpoint.every % self.rl.updates_per_batch:
            raise UserError(f"checkpoint.every ({self.checkpoint.every}) must be a multiple of rl.updates_per_batch "
                            f"({self.rl.updates_per_batch}), so a resumed run starts on a fresh batch of samples")
        if self.data.seq_len < self.rl.max_new_tokens + 8:
            raise UserError(f"data.seq_len ({self.data.seq_len}) must leave room for a prompt besides "
                            f"rl.max_new_tokens ({self.rl.max_new_tokens})")

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(),
                **{name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}}

    def replace(self, **sections: dict) -> RunConfig:
        """A copy with fields of some sections replaced: replace(train={"steps": 10})."""
        changed = {name: dataclasses.replace(getattr(self, name), **fields) for name, fields in sections.items()}
        return dataclasses.replace(self, **changed)


def load_run_config(path: Path | None, overrides: list[str]) -> RunConfig:
    """Read a TOML config, apply `section.key=value` overrides, validate."""
    return run_config_from_dict(apply_overrides(load_toml(path) if path else {}, overrides))


MOVED = {  # keys of the single [train] section of earlier releases -> (section, key) now
    "data": ("data", "path"), "mixture": ("data", "mixture"), "tokenizer": ("data", "tokenizer"),
    "seq_len": ("data", "seq_len"), "batch_size": ("data", "batch_size"), "grad_accum": ("data", "grad_accum"),
    "lr": ("optim", "lr"), "weight_decay": ("optim", "weight_decay"), "beta1": ("optim", "beta1"),
    "beta2": ("optim", "beta2"), "grad_clip": ("optim", "grad_clip"), "warmup_steps": ("schedule", "warmup_steps"),
    "schedule": ("schedule", "decay"), "min_lr_ratio": ("schedule", "min_lr_ratio"),
    "seq_len_start": ("progressive", "seq_len_start"), "seq_len_warmup_steps": ("progressive", "seq_len_warmup_steps"),
    "batch_size_start": ("progressive", "batch_size_start"), "batch_ramp_steps": ("progressive", "batch_ramp_steps"),
    "eval_every": ("eval", "every"), "eval_tokens": ("eval", "tokens"), "checkpoint_every": ("checkpoint", "every"),
    "keep_checkpoints": ("checkpoint", "keep"), "parallel": ("parallel", "strategy"),
}


def run_config_from_dict(doc: dict) -> RunConfig:
    """[model] takes any ModelConfig field plus `preset` (fields then override the preset); each
    other section its dataclass's fields."""
    unknown = sorted(set(doc) - {"model", *SECTIONS})
    if unknown:
        raise UserError(f"unknown config section(s) {', '.join(unknown)}; known sections: model, {', '.join(SECTIONS)}")
    moved = sorted(set(doc.get("train", {})) & set(MOVED))
    if moved:
        raise UserError("config keys moved to their own sections: " + ", ".join(
            f"train.{k} is now {'.'.join(MOVED[k])}" for k in moved))
    model_kwargs = checked_kwargs(ModelConfig, dict(doc.get("model", {})), "model", extra={"preset": str})
    preset_name = model_kwargs.pop("preset", None)
    model = preset(preset_name, **model_kwargs) if preset_name else ModelConfig(**model_kwargs)
    sections = {name: build(cls, dict(doc.get(name, {})), name) for name, cls in SECTIONS.items()}
    return RunConfig(model=model, **sections)


def saved_run_config(doc: dict) -> RunConfig:
    """The config.json of a run directory; one written before the sections existed (all training
    keys in [train]) is read with its keys moved to where they live now, so old runs still resume."""
    train = dict(doc.get("train", {}))
    if set(train) & set(MOVED):
        doc = {k: dict(v) for k, v in doc.items()}
        for key in set(train) & set(MOVED):
            section, name = MOVED[key]
            doc.setdefault(section, {})[name] = doc["train"].pop(key)
    return run_config_from_dict(doc)


def config_help() -> dict:
    """Every section and key of a run config with its type, default and docstring (--help-config)."""
    model = [{"key": "preset", "type": "str", "default": "", "doc": f"A named model ({', '.join(PRESETS)}); "
              "the other [model] keys override its fields."}, *describe_fields(ModelConfig)]
    sections = [{"section": "model", "doc": ModelConfig.__doc__.splitlines()[0], "keys": model}]
    for name, cls in SECTIONS.items():
        sections.append({"section": name, "doc": cls.__doc__, "keys": describe_fields(cls)})
    return {"sections": sections}


def format_config_help(doc: dict) -> str:
    """The sections as TOML a user can copy: each key at its default, its docstring as a comment."""
    lines = []
    for section in doc["sections"]:
        lines += [f"[{section['section']}]  # {section['doc']}"]
        for key in section["keys"]:
            lines.append(f"{key['key']} = {toml_value(key['default'])}  # {key['type']}: {key['doc']}".rstrip(": "))
        lines.append("")
    return "\n".join(lines).rstrip()
