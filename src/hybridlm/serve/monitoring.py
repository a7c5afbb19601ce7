"""Monitoring: Prometheus metrics and the audit log.

Why a private registry: two servers in one process (tests) must not share counters, and `/metrics`
shows only this server's series. Why an audit log apart from metrics: metrics say how the fleet
behaves, the audit log says what each request did (who by key id, how big, how long, which filter
rules fired) so an operator can answer "what happened at 14:02". It never holds a key, and holds
prompt or reply text only when `audit_text` is switched on.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/openapi.json")
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SAFETY = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    """The server's series. Queue depth, active sequences and batch size are read from the
    service when `/metrics` is scraped, so they are never stale."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("hybridlm_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.ttft = Histogram("hybridlm_time_to_first_token_seconds", "Request arrival to first generated text",
                              ["endpoint"], buckets=_LATENCY, registry=r)
        self.per_token = Histogram("hybridlm_time_per_output_token_seconds",
                                   "Mean time between output tokens after the first, per request", ["endpoint"],
                                   buckets=_PER_TOKEN, registry=r)
        self.e2e = Histogram("hybridlm_request_duration_seconds", "Request arrival to last byte", ["endpoint"],
                             buckets=_LATENCY, registry=r)
        self.tokens_in = Counter("hybridlm_prompt_tokens", "Prompt tokens accepted", registry=r)
        self.tokens_out = Counter("hybridlm_completion_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("hybridlm_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.active = Gauge("hybridlm_active_sequences", "Sequences being decoded", registry=r)
        self.batch_size = Gauge("hybridlm_batch_size", "Sequences in the last decode step", registry=r)
        self.generated = Gauge("hybridlm_engine_tokens_generated", "Tokens the engine generated since start",
                               registry=r)
        self.filter_hits = Counter("hybridlm_filter_hits", "Safety filter hits", ["rule", "action", "direction"],
                                   registry=r)
        self.safety_seconds = Histogram("hybridlm_safety_filter_seconds",
                                        "Time spent in the safety filter chain, per request", buckets=_SAFETY,
                                        registry=r)
        self.review_items = Counter("hybridlm_review_items", "Items sent to the review queue", registry=r)
        self.model_version = Info("hybridlm_model", "The version serving new requests", registry=r)
        self.swaps = Counter("hybridlm_model_swaps", "Hot swaps to a new version, by result", ["result"], registry=r)
        self.rollbacks = Counter("hybridlm_model_rollbacks", "Automated rollbacks after a swap", registry=r)
        self.prefix_hit_rate = Gauge("hybridlm_prefix_cache_hit_rate", "Share of prompt tokens served from "
                                     "the prefix cache since start", registry=r)
        self.prefix_tokens_saved = Gauge("hybridlm_prefix_cache_tokens_saved", "Prompt tokens not prefilled "
                                         "because the prefix cache held them, since start", registry=r)
        self.prefix_hits = Gauge("hybridlm_prefix_cache_hits", "Requests that reused a cached prefix", registry=r)
        self.prefix_lookups = Gauge("hybridlm_prefix_cache_lookups", "Requests looked up in the prefix cache",
                                    registry=r)
        self.prefix_bytes = Gauge("hybridlm_prefix_cache_bytes", "Memory the prefix cache holds", registry=r)
        self.prefix_evictions = Gauge("hybridlm_prefix_cache_evictions", "Blocks evicted (least recently used)",
                                      registry=r)

    def scrape(self, stats: dict) -> bytes:
        """Prometheus text, with the service's gauges read now."""
        self.queue_depth.set(stats.get("queue_depth", 0))
        self.active.set(stats.get("active_sequences", 0))
        self.batch_size.set(stats.get("batch_size", 0))
        self.generated.set(stats.get("tokens_generated", 0))
        prefix = stats.get("prefix_cache") or {}
        self.prefix_hit_rate.set(prefix.get("tokens_saved", 0) / max(prefix.get("prompt_tokens", 0), 1))
        self.prefix_tokens_saved.set(prefix.get("tokens_saved", 0))
        self.prefix_hits.set(prefix.get("hits", 0))
        self.prefix_lookups.set(prefix.get("lookups", 0))
        self.prefix_bytes.set(prefix.get("bytes", 0))
        self.prefix_evictions.set(prefix.get("evictions", 0))
        return generate_latest(self.registry)


def endpoint_label(path: str) -> str:
    """The path if it is one of ours, else "other" (a bounded label set, whatever clients send)."""
    return path if path in ENDPOINTS else "other"


@dataclass
class RequestRecord:
    """What one request did; filled in as it goes, written as one audit line at the end."""

    request_id: str
    endpoint: str
    method: str
    started: float = field(default_factory=time.perf_counter)
    time: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    key_id: str | None = None
    end_user: str | None = None
    """The request's `user` (or `safety_identifier`): the client's own id for its end user."""
    status: int = 0
    error_code: str | None = None
    stream: bool | None = None
    n: int | None = None
    max_tokens: int | None = None
    request_bytes: int = 0
    response_bytes: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model_version: str | None = None
    """The version that served it (a hot swap may change it between requests, never within one)."""
    ttft_s: float | None = None
    duration_s: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    filter_hits: list[str] = field(default_factory=list)
    safety_s: float = 0.0
    prompt_text: str | None = None
    output_text: list[str] | None = None
    """Per choice."""

    def first_token(self) -> None:
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.started

    def audit_line(self, with_text: bool) -> str:
        doc = asdict(self)
        doc.pop("started")
        if not with_text:
            doc.pop("prompt_text")
            doc.pop("output_text")
        return json.dumps({k: v for k, v in doc.items() if v not in (None, [])}, ensure_ascii=False)


class AuditLog:
    """JSON lines, one per request, to a file (appended) or to stderr ("-")."""

    def __init__(self, target: str, with_text: bool = False) -> None:
        self.with_text = with_text
        self._lock = threading.Lock()
        self._file: TextIO | None = None
        if target and target != "-":
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - open for the server's life

    def write(self, record: RequestRecord) -> None:
        line = record.audit_line(self.with_text) + "\n"
        with self._lock:
            (self._file or sys.stderr).write(line)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
