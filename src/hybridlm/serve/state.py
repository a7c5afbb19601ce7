"""The server's shared state: one ServerState per app, built from the config, holding the
service, keys, rate limiter, safety chain, review queue, metrics and audit log, plus the steps
every request shares with it (filter hits, token charges). What belongs to one request (its Job,
refunds, the end of its generation) lives in generation.py.

Why one object passed explicitly: handlers stay pure functions of (state, request), two servers
in one process (the tests) never share anything, and nothing is decided at import time.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hybridlm.serve.auth import KeyStore
from hybridlm.serve.config import ServeConfig
from hybridlm.serve.hotswap import ModelSource, Swapper
from hybridlm.serve.monitoring import AuditLog, Metrics, RequestRecord
from hybridlm.serve.protocol import ApiError
from hybridlm.serve.ratelimit import Limited, RateLimiter
from hybridlm.serve.feedback import FeedbackStore
from hybridlm.serve.review import ReviewQueue, items_for
from hybridlm.serve.safety import Hit, SafetyChain, build_chain

if TYPE_CHECKING:
    from hybridlm.serve.service import Service

log = logging.getLogger("hybridlm.serve")


@dataclass
class ServerState:
    """Everything a request handler needs, built once per server."""

    swapper: Swapper
    config: ServeConfig
    keys: KeyStore
    admin_keys: KeyStore
    limiter: RateLimiter
    safety: SafetyChain | None
    review: ReviewQueue | None
    feedback: FeedbackStore
    metrics: Metrics
    audit: AuditLog
    model_name: str
    writer: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="review"))

    @property
    def service(self) -> Service:
        """The version new requests go to (a hot swap changes it; a request keeps the one it began on)."""
        return self.swapper.service

    def note_hits(self, hits: list[Hit], direction: str, text: str, record: RequestRecord) -> None:
        """Count filter hits, name them in the audit record, queue flagged/blocked ones for review."""
        for hit in hits:
            self.metrics.filter_hits.labels(hit.rule, hit.action, direction).inc()
            record.filter_hits.append(f"{direction}:{hit.rule}:{hit.action}")
        items = items_for(hits, direction, text, record.request_id, record.key_id)
        if items and self.review is not None:
            self.metrics.review_items.inc(len(items))
            self.writer.submit(self._store, items)

    def _store(self, items: list[dict]) -> None:
        try:
            self.review.add(items)  # type: ignore[union-attr]
        except Exception:
            log.exception("could not write %d review item(s)", len(items))

    def charge_tokens(self, key_id: str, tokens: int) -> None:
        if self.limiter.too_large(tokens):
            raise ApiError(400, f"this request needs {tokens} tokens (prompt + max_tokens x n) but the limit is "
                           f"{self.limiter.tpm} tokens per minute; lower max_tokens or n", param="max_tokens",
                           code="request_too_large")
        limited = self.limiter.take_tokens(key_id, tokens)
        if limited is not None:
            raise rate_limited(limited)


def rate_limited(limited: Limited) -> ApiError:
    return ApiError(429, limited.message, type=limited.which, code="rate_limit_exceeded",
                    headers={"Retry-After": str(limited.retry_after)})


def build_state(service: Service, config: ServeConfig, keys: KeyStore, source: ModelSource,
                admin_keys: KeyStore) -> ServerState:
    safety = config.safety
    metrics = Metrics()
    chain = build_chain(safety.rules, builtin=safety.builtin_rules, classifier=safety.classifier,
                        threshold=safety.classifier_threshold, classifier_action=safety.classifier_action,
                        hold_chars=safety.hold_chars) if safety.enabled else None
    return ServerState(
        swapper=Swapper(source, config.server, config.rollback, metrics, service), config=config, keys=keys,
        admin_keys=admin_keys,
        limiter=RateLimiter(config.limits.requests_per_minute, config.limits.tokens_per_minute),
        safety=chain if chain is not None and chain.filters else None,
        review=ReviewQueue(Path(safety.review_db)) if safety.enabled else None,
        feedback=FeedbackStore(Path(config.server.feedback_db)),
        metrics=metrics, audit=AuditLog(config.audit.log, config.audit.include_text),
        model_name=config.server.model_name or source.name)
