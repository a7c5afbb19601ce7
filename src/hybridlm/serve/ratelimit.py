"""Per-key token buckets: requests per minute and tokens per minute.

Why buckets: they allow a burst up to a minute's budget and then refill smoothly, so a client
that waits `Retry-After` seconds is sure to get through. A request is charged its prompt tokens
plus its whole completion budget (max_tokens x n) up front, because the cost must be known before
generation starts; what it did not use is given back when it ends. State lives in memory: one
server process, one set of buckets.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    capacity: float
    per_second: float
    level: float = field(init=False)
    stamp: float = field(init=False)

    def start(self, now: float) -> TokenBucket:
        self.level, self.stamp = self.capacity, now
        return self

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.per_second)
        self.stamp = now

    def take(self, amount: float, now: float) -> float:
        """Take `amount` and return 0, or take nothing and return the seconds until it would fit."""
        self._refill(now)
        if amount <= self.level:
            self.level -= amount
            return 0.0
        return (amount - self.level) / self.per_second

    def give_back(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)


@dataclass(frozen=True)
class Limited:
    """A refusal: which budget ran out and when to retry (whole seconds, at least 1)."""

    which: str  # "requests" | "tokens"
    retry_after: int
    message: str


class RateLimiter:
    """Buckets per key id. A limit of 0 means unlimited."""

    def __init__(self, requests_per_minute: int, tokens_per_minute: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rpm, self.tpm, self.clock = requests_per_minute, tokens_per_minute, clock
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._lock = threading.Lock()

    def _bucket(self, key: str, which: str, per_minute: int) -> TokenBucket:
        bucket = self._buckets.get((key, which))
        if bucket is None:
            bucket = TokenBucket(per_minute, per_minute / 60.0).start(self.clock())
            self._buckets[(key, which)] = bucket
        return bucket

    def too_large(self, tokens: int) -> bool:
        """Whether a request of `tokens` can never fit the per-minute token budget."""
        return self.tpm > 0 and tokens > self.tpm

    def take_request(self, key: str) -> Limited | None:
        if self.rpm <= 0:
            return None
        with self._lock:
            wait = self._bucket(key, "requests", self.rpm).take(1, self.clock())
        if wait == 0:
            return None
        return Limited("requests", max(1, math.ceil(wait)),
                       f"rate limit reached: {self.rpm} requests per minute for this key; retry in {math.ceil(wait)} s")

    def take_tokens(self, key: str, tokens: int) -> Limited | None:
        if self.tpm <= 0:
            return None
        with self._lock:
            wait = self._bucket(key, "tokens", self.tpm).take(tokens, self.clock())
        if wait == 0:
            return None
        return Limited("tokens", max(1, math.ceil(wait)),
                       f"rate limit reached: {self.tpm} tokens per minute for this key (this request needs {tokens}: "
                       f"prompt + max_tokens x n); retry in {math.ceil(wait)} s")

    def refund_tokens(self, key: str, tokens: int) -> None:
        if self.tpm <= 0 or tokens <= 0:
            return
        with self._lock:
            self._bucket(key, "tokens", self.tpm).give_back(tokens, self.clock())
