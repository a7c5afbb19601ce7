"""The server's settings: `hybridlm serve --config FILE.toml` plus `section.key=value` overrides.

```toml
[server]                      # batching, caps, request size
max_batch = 16
max_tokens_cap = 512
[limits]                      # per API key; 0 turns a limit off
requests_per_minute = 120
tokens_per_minute = 100000
[safety]
review_db = "review.sqlite"
[[safety.rules]]
name = "internal-codename"
action = "redact"             # block | redact | flag
words = ["project falcon"]    # and/or patterns = ["regex", ...]
applies_to = ["output"]       # default: both prompt and output
[audit]
log = "audit.jsonl"           # "-" is stderr
include_text = false
[rollback]                    # after a hot swap (serving models:/NAME@ALIAS)
enabled = true
max_block_rate = 0.3
```

Why one dataclass per section: each validates itself in `__post_init__` with a message that names
the fix, and the field docstrings say what each key does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from hybridlm.errors import UserError
from hybridlm.serve.safety import ACTIONS, DIRECTIONS, Rule
from hybridlm.settings import apply_overrides, build, check_positive, checked_kwargs, load_toml


@dataclass(kw_only=True)
class ServerSettings:
    model_name: str = ""
    """The model id clients send and /v1/models lists; default: the run directory's name."""
    max_batch: int = 16
    """Sequences decoded together (continuous batching)."""
    max_queue: int = 64
    """Requests that may wait for a slot; beyond that the server answers 503."""
    max_tokens_cap: int = 512
    """The most new tokens one choice may ask for."""
    max_n: int = 8
    """The most choices one request may ask for."""
    max_body_bytes: int = 1 << 20
    """Larger request bodies are refused with 413 before they are read."""
    dtype: str = "auto"
    """Inference precision: auto, bf16 or fp32."""
    prefix_cache_mb: int = 256
    """Memory for cached prompt prefixes (blocks of 256 tokens shared by later prompts); 0 turns it off."""
    alias_poll_s: float = 10.0
    """Serving a registry alias (models:/NAME@ALIAS): seconds between checks that it moved; 0: only
    POST /admin/reload swaps."""
    feedback_db: str = "feedback.sqlite"
    """SQLite file of the ratings and comparisons POST /v1/feedback receives (the chat page's
    thumbs); `hybridlm feedback export --db FILE` turns them into preference pairs."""
    adapters: dict = field(default_factory=dict)
    """{NAME: LoRA run directory} served on the shared base: a request for model NAME decodes with
    that adapter (`--adapter NAME=PATH`); each must have been trained on the served weights."""

    def __post_init__(self) -> None:
        if not isinstance(self.adapters, dict) or not all(
                isinstance(k, str) and k and isinstance(v, str) and v for k, v in self.adapters.items()):
            raise UserError('server.adapters must map adapter names to LoRA run directories, e.g. {docs = "runs/lora"}')
        check_positive("server", max_batch=self.max_batch, max_queue=self.max_queue, max_tokens_cap=self.max_tokens_cap,
                  max_n=self.max_n, max_body_bytes=self.max_body_bytes)
        if self.alias_poll_s < 0:
            raise UserError(f"server.alias_poll_s must be >= 0 (0: reload only on POST /admin/reload; got {self.alias_poll_s})")
        if self.prefix_cache_mb < 0:
            raise UserError(f"server.prefix_cache_mb must be >= 0 (0 turns the prefix cache off; got {self.prefix_cache_mb})")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise UserError(f"server.dtype must be auto, bf16 or fp32 (got {self.dtype!r})")


@dataclass(kw_only=True)
class LimitSettings:
    requests_per_minute: int = 120
    """Per API key; 0 = unlimited."""
    tokens_per_minute: int = 100_000
    """Per API key, counting prompt tokens + max_tokens x n; 0 = unlimited."""

    def __post_init__(self) -> None:
        if self.requests_per_minute < 0 or self.tokens_per_minute < 0:
            raise UserError("limits.requests_per_minute and limits.tokens_per_minute must be >= 0 (0 = unlimited)")


@dataclass(kw_only=True)
class SafetySettings:
    enabled: bool = True
    """Run the filter chain on prompts and output."""
    builtin_rules: bool = True
    """Include the built-in rules (hybridlm.serve.safety.DEFAULT_RULES)."""
    hold_chars: int = 48
    """Streamed output waits this many characters so a match split across tokens is caught."""
    classifier: str = ""
    """Optional `module:function` called as function(text, direction) -> score in [0, 1]."""
    classifier_threshold: float = 0.5
    classifier_action: str = "flag"
    """block or flag."""
    review_db: str = "review.sqlite"
    """SQLite file of the review queue (flagged and blocked items)."""
    rules: list[Rule] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.hold_chars < 0:
            raise UserError(f"safety.hold_chars must be >= 0 (got {self.hold_chars})")
        if self.classifier_action not in ("block", "flag"):
            raise UserError(f"safety.classifier_action must be block or flag (got {self.classifier_action!r})")


@dataclass(kw_only=True)
class AuditSettings:
    log: str = "-"
    """Where audit lines go: a file (appended) or "-" for stderr."""
    include_text: bool = False
    """Also log prompt and reply text (off by default: the log then holds no user text)."""


@dataclass(kw_only=True)
class RollbackSettings:
    """Automated rollback after a hot swap: when the new version's requests within `window_s` pass
    a limit (once `min_requests` came), the alias moves back and the old version serves again."""

    enabled: bool = False
    window_s: float = 300.0
    """How long after a swap the new version is watched."""
    min_requests: int = 20
    """Requests to see before judging."""
    max_error_rate: float = 0.05
    """Share of requests that failed with a server error (503 queue-full excluded); 0 turns the check off."""
    max_block_rate: float = 0.0
    """Share of requests whose reply the output filter blocked; 0 turns the check off."""
    max_p99_s: float = 0.0
    """p99 of request duration in seconds; 0 turns the check off."""

    def __post_init__(self) -> None:
        check_positive("rollback", window_s=self.window_s, min_requests=self.min_requests)
        for name in ("max_error_rate", "max_block_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"rollback.{name} must be a share in [0, 1] (0 turns it off)")
        if self.max_p99_s < 0:
            raise UserError("rollback.max_p99_s must be >= 0 (0 turns it off)")


@dataclass(kw_only=True)
class ServeConfig:
    server: ServerSettings = field(default_factory=ServerSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    safety: SafetySettings = field(default_factory=SafetySettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    rollback: RollbackSettings = field(default_factory=RollbackSettings)

    def with_adapters(self, adapters: dict[str, str]) -> ServeConfig:
        """This config with more adapters served (`--adapter` on top of server.adapters)."""
        merged = {**self.server.adapters, **adapters}
        return dataclasses.replace(self, server=dataclasses.replace(self.server, adapters=merged))


_RULE_LISTS = ("patterns", "words", "applies_to")


def _rule(doc: object, index: int) -> Rule:
    where = f"safety.rules[{index}]"
    if not isinstance(doc, dict):
        raise UserError(f"{where} must be a table ([[safety.rules]] with name, action, patterns/words)")
    for key in _RULE_LISTS:
        value = doc.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{where}.{key} must be a list of strings (got {value!r})")
    values = {k: tuple(v) if k in _RULE_LISTS else v for k, v in doc.items()}
    if "name" not in values or "action" not in values:
        raise UserError(f"{where} needs a name and an action ({', '.join(ACTIONS)}); applies_to: {', '.join(DIRECTIONS)}")
    return Rule(**checked_kwargs(Rule, values, where, {k: tuple for k in _RULE_LISTS}))


def load_serve_config(path: Path | None, overrides: list[str] | None = None) -> ServeConfig:
    """Read the TOML file (if any), apply overrides, validate every section."""
    doc = apply_overrides(load_toml(path) if path else {}, list(overrides or []))
    sections = {"server": ServerSettings, "limits": LimitSettings, "safety": SafetySettings, "audit": AuditSettings,
                "rollback": RollbackSettings}
    unknown = sorted(set(doc) - set(sections))
    if unknown:
        raise UserError(f"unknown config section(s) {', '.join(unknown)}; known: {', '.join(sections)}")
    for name, value in doc.items():
        if not isinstance(value, dict):
            raise UserError(f"{name} must be a table ([{name}]) in the serve config")
    safety = dict(doc.get("safety", {}))
    rules = safety.pop("rules", [])
    if not isinstance(rules, list):
        raise UserError("safety.rules must be an array of tables ([[safety.rules]])")
    return ServeConfig(
        server=build(ServerSettings, doc.get("server", {}), "server"),
        limits=build(LimitSettings, doc.get("limits", {}), "limits"),
        safety=SafetySettings(**checked_kwargs(SafetySettings, safety, "safety", {"rules": list}) | {
            "rules": [_rule(r, i) for i, r in enumerate(rules)]}),
        audit=build(AuditSettings, doc.get("audit", {}), "audit"),
        rollback=build(RollbackSettings, doc.get("rollback", {}), "rollback"),
    )
