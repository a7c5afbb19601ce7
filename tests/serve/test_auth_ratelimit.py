"""API keys (hashes only, key ids, file + environment) and the per-key token buckets."""

from __future__ import annotations

import hashlib

import pytest

from hybridlm.errors import UserError
from hybridlm.serve.auth import ENV_VAR, hash_key, key_id, load_keys, parse_keys
from hybridlm.serve.ratelimit import RateLimiter


def test_keys_are_kept_as_sha256_hashes_and_named_by_a_prefix(tmp_path):
    path = tmp_path / "keys.txt"
    hashed = hashlib.sha256(b"sk-from-hash").hexdigest()
    path.write_text(f"# team keys\nsk-alpha\n\nsk-beta  # ci\nsha256:{hashed}\n")
    store = load_keys(path, env={ENV_VAR: "sk-gamma, sk-delta"})
    assert store.enabled and len(store.hashes) == 5
    assert all(len(h) == 64 and "sk-" not in h for h in store.hashes)
    assert "sk-alpha" not in repr(store)
    assert store.identify("sk-alpha") == key_id(hash_key("sk-alpha")) == hash_key("sk-alpha")[:12]
    assert store.identify("sk-from-hash") == hashed[:12]
    assert store.identify("sk-delta") is not None
    assert store.identify("sk-wrong") is None and store.identify("") is None and store.identify(None) is None


def test_no_keys_means_authentication_is_off():
    assert not load_keys(None, env={}).enabled


@pytest.mark.parametrize("text, message", [
    ("sha256:1234", "64 hex digits"),
    ("two words", "may not contain spaces"),
])
def test_bad_key_lines_are_refused(text, message):
    with pytest.raises(UserError, match=message):
        parse_keys(text, "keys.txt")


def test_missing_or_empty_key_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_keys(tmp_path / "absent.txt", env={})
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(UserError, match="holds no keys"):
        load_keys(tmp_path / "empty.txt", env={})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_request_bucket_allows_a_burst_then_says_when_to_retry():
    clock = Clock()
    limiter = RateLimiter(requests_per_minute=3, tokens_per_minute=0, clock=clock)
    assert [limiter.take_request("a") for _ in range(3)] == [None, None, None]
    refused = limiter.take_request("a")
    assert refused is not None and refused.which == "requests" and refused.retry_after == 20
    assert limiter.take_request("b") is None  # buckets are per key
    clock.now += refused.retry_after
    assert limiter.take_request("a") is None


def test_token_bucket_charges_up_front_and_refunds_what_was_not_used():
    clock = Clock()
    limiter = RateLimiter(requests_per_minute=0, tokens_per_minute=600, clock=clock)
    assert limiter.take_tokens("a", 500) is None
    refused = limiter.take_tokens("a", 200)
    assert refused is not None and refused.which == "tokens" and refused.retry_after == 10
    limiter.refund_tokens("a", 300)  # the first request used 200 of its 500
    assert limiter.take_tokens("a", 200) is None
    assert limiter.too_large(601) and not limiter.too_large(600)


def test_zero_limits_are_unlimited():
    limiter = RateLimiter(0, 0)
    assert all(limiter.take_request("a") is None and limiter.take_tokens("a", 10**9) is None for _ in range(1000))
