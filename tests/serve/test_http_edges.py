"""The HTTP layer at its edges, on real runs: a full queue (503) and the recovery after it, rate
limits (429 with Retry-After), output filtering of the model's own greedy text (streamed and not,
with the review queue), clients that leave mid-stream or while queued, an engine that stops under
an open stream, and what the audit log keeps.

Where a request must stay busy for a while (holding the only batch slot, leaving mid-stream) it
runs on chatty_run (conftest.py), whose greedy replies run to max_tokens at a few ms per token;
the test then ends it itself, so none of these waits for a long reply to finish."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request

import openai
import pytest
from httpserver import (
    KEY,
    NO_LIMITS,
    OTHER_KEY,
    first_event,
    health,
    holding_the_slot,
    response,
    rules,
    send,
    serving_run,
    wait_until,
)

from hybridlm.serve.review import ReviewQueue

LONG = 4000
"""max_tokens of a reply that outlasts any test (seconds of decoding); the tests end it early."""


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def pick(text: str, length: int, after: int = 0) -> tuple[int, str]:
    """The first plain (ASCII letters, digits, inner spaces) substring of `length` characters
    starting at or after `after` that occurs nowhere earlier in `text`: (its index, it)."""
    for i in range(after, len(text) - length + 1):
        part = text[i : i + length]
        if re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9 ]*[A-Za-z0-9])?", part) and text.find(part) == i:
            return i, part
    raise AssertionError(f"no plain {length}-character substring after {after} in {text!r}")


def audit_lines(tmp) -> list[dict]:
    return [json.loads(line) for line in (tmp / "audit.jsonl").read_text().splitlines()]


def test_a_full_queue_is_503_with_retry_after_and_the_server_recovers(chatty_run, tmp_path):
    with serving_run(chatty_run, tmp_path, "server.max_batch=1", "server.max_queue=1", f"server.max_tokens_cap={LONG}",
                     *NO_LIMITS) as live:
        with holding_the_slot(live.url, live.model, LONG):
            waiting = send(live.url, {"model": live.model, "prompt": "Paragraph 2", "max_tokens": 4, "temperature": 0})
            wait_until(lambda: health(live.url)["queue_depth"] == 1, what="the second request queueing")
            assert health(live.url)["active_sequences"] == 1
            for stream in (False, True):  # streamed requests fail before the first byte, the same way
                with pytest.raises(openai.InternalServerError) as caught:
                    reply = client(live.url).completions.create(model=live.model, prompt="hi", max_tokens=3,
                                                                stream=stream)
                    if stream:
                        list(reply)
                error = caught.value
                assert error.status_code == 503 and error.code == "queue_full" and error.type == "server_error"
                assert set(error.body) == {"message", "type", "param", "code"} and "busy" in error.message
                assert error.response.headers["retry-after"] == "1"
            assert health(live.url)["queue_depth"] == 1  # the refused requests took no place in the queue
        status, doc = response(waiting)  # the slot came free: the queued request was served
        assert status == 200 and doc["choices"][0]["finish_reason"] == "length" and doc["usage"]["completion_tokens"] == 4
        wait_until(lambda: health(live.url)["active_sequences"] == 0 == health(live.url)["queue_depth"])
        again = client(live.url).completions.create(model=live.model, prompt="hi", max_tokens=3, temperature=0)
        assert again.choices[0].finish_reason == "length" and again.usage.completion_tokens == 3


def test_request_rate_limit_is_429_with_retry_after_per_key(tiny_run, tmp_path):
    with serving_run(tiny_run, tmp_path, "limits.requests_per_minute=2") as live:
        for _ in range(2):
            client(live.url).completions.create(model=live.model, prompt="hi", max_tokens=1)
        with pytest.raises(openai.RateLimitError) as caught:
            client(live.url).completions.create(model=live.model, prompt="hi", max_tokens=1)
        assert caught.value.code == "rate_limit_exceeded" and caught.value.type == "requests"
        assert int(caught.value.response.headers["retry-after"]) >= 1
        client(live.url, OTHER_KEY).completions.create(model=live.model, prompt="hi", max_tokens=1)  # its own bucket


def test_token_rate_limit_counts_prompt_plus_max_tokens_times_n(tiny_run, tmp_path):
    with serving_run(tiny_run, tmp_path, "limits.tokens_per_minute=100", "server.max_tokens_cap=64") as live:
        c = client(live.url)
        first = c.completions.create(model=live.model, prompt="hi", max_tokens=30, n=2, temperature=0)
        reserved = first.usage.prompt_tokens + 30 * 2
        assert 2 * reserved > 100  # two such reservations do not fit in the minute's budget ...
        assert first.usage.total_tokens + reserved <= 100  # ... but the trained run stops early (eos)
        assert {c.finish_reason for c in first.choices} == {"stop"}
        c.completions.create(model=live.model, prompt="hi", max_tokens=30, n=2, temperature=0)  # the refund made room
        with pytest.raises(openai.RateLimitError) as caught:
            c.completions.create(model=live.model, prompt="hi", max_tokens=32, n=3)
        assert caught.value.type == "tokens" and "retry-after" in caught.value.response.headers
        with pytest.raises(openai.BadRequestError) as caught:  # can never fit: waiting would not help
            c.completions.create(model=live.model, prompt="hi", max_tokens=50, n=2)
        assert caught.value.code == "request_too_large"


def test_output_filter_redacts_a_whole_reply(tiny_run, tmp_path):
    args = {"prompt": "Paragraph 3:", "max_tokens": 24, "temperature": 0}
    with serving_run(tiny_run, tmp_path, "safety.enabled=false") as live:
        text = client(live.url).completions.create(model=live.model, **args).choices[0].text
    _, phrase = pick(text, 8, after=1)  # several tokens long: a match split across tokens
    with serving_run(tiny_run, tmp_path, "safety.hold_chars=12", rules(
            {"name": "phrase", "action": "redact", "patterns": [re.escape(phrase)], "applies_to": ["output"]})) as live:
        reply = client(live.url).completions.create(model=live.model, **args)
    assert reply.choices[0].text == text.replace(phrase, "[redacted]") != text
    assert reply.choices[0].finish_reason == "stop"


def test_output_filter_block_ends_the_reply_and_its_generation(chatty_run, tmp_path):
    args = {"prompt": "Paragraph 3", "max_tokens": 300, "temperature": 0}
    with serving_run(chatty_run, tmp_path, "safety.enabled=false") as live:
        text = client(live.url).completions.create(model=live.model, **args).choices[0].text
    at, word = pick(text, 5, after=30)
    with serving_run(chatty_run, tmp_path, "safety.builtin_rules=false", rules(
            {"name": "magic", "action": "block", "patterns": [re.escape(word)], "ignore_case": False,
             "applies_to": ["output"]})) as live:
        reply = client(live.url).completions.create(model=live.model, **args, n=2)
        wait_until(lambda: health(live.url)["active_sequences"] == 0)
        generated = health(live.url)["tokens_generated"]
    for choice in reply.choices:
        assert choice.text == text[:at] and choice.finish_reason == "content_filter"
    assert reply.usage.completion_tokens < 2 * args["max_tokens"]
    assert generated < args["max_tokens"]  # both choices stopped soon after the match, not at 2 x 300 tokens


def test_a_blocked_choice_among_two_stops_decoding_while_the_other_runs_on(chatty_run, tmp_path):
    """n = 2 sampled choices that differ: a block rule hit in choice 0 only ends choice 0 at the
    match and frees its slot then; choice 1 still runs to max_tokens."""
    args = {"prompt": "Paragraph 3", "max_tokens": 300, "temperature": 1.0, "seed": 11, "n": 2}
    with serving_run(chatty_run, tmp_path, "safety.enabled=false") as live:
        free = sorted(client(live.url).completions.create(model=live.model, **args).choices, key=lambda c: c.index)
        wait_until(lambda: health(live.url)["active_sequences"] == 0)
        free_generated = health(live.url)["tokens_generated"]
    assert free[0].finish_reason == "length"  # unfiltered, choice 0 runs all 300 tokens
    first, second = free[0].text, free[1].text
    at = next(i for i in range(30, len(first) - 5) if pick(first, 5, after=i)[1] not in second)
    at, word = pick(first, 5, after=at)
    assert word not in second
    with serving_run(chatty_run, tmp_path, "safety.builtin_rules=false", rules(
            {"name": "magic", "action": "block", "patterns": [re.escape(word)], "ignore_case": False,
             "applies_to": ["output"]})) as live:
        reply = client(live.url).completions.create(model=live.model, **args)
        wait_until(lambda: health(live.url)["active_sequences"] == 0)
        generated = health(live.url)["tokens_generated"]
    blocked, other = sorted(reply.choices, key=lambda c: c.index)
    assert blocked.text == first[:at] and blocked.finish_reason == "content_filter"
    assert other.text == second and other.finish_reason == free[1].finish_reason
    assert generated < free_generated - 150  # choice 0 stopped near its match, not at its 300th token


def test_output_filter_on_a_stream_and_the_review_queue(chatty_run, tmp_path):
    args = {"messages": [{"role": "user", "content": "tell me"}], "max_tokens": 200, "temperature": 0}
    with serving_run(chatty_run, tmp_path, "safety.enabled=false") as live:
        text = client(live.url).chat.completions.create(model=live.model, **args).choices[0].message.content
    flag_at, flagged = pick(text, 4, after=5)
    block_at, blocked = pick(text, 5, after=flag_at + 30)
    with serving_run(chatty_run, tmp_path, "safety.builtin_rules=false", rules(
            {"name": "magic", "action": "block", "patterns": [re.escape(blocked)], "ignore_case": False,
             "applies_to": ["output"]},
            {"name": "door", "action": "flag", "patterns": [re.escape(flagged)], "ignore_case": False})) as live:
        chunks = list(client(live.url).chat.completions.create(model=live.model, **args, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert streamed == text[:block_at] and flagged in streamed  # flag lets the text through
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        queue = ReviewQueue(tmp_path / "review.sqlite", create=False)
        wait_until(lambda: len(queue.list()) >= 2, what="two review items")
        assert {(i.rule, i.action, i.direction) for i in queue.list()} == {("door", "flag", "output"),
                                                                           ("magic", "block", "output")}


def test_disconnect_mid_stream_frees_the_slots_at_once(chatty_run, tmp_path):
    with serving_run(chatty_run, tmp_path, f"server.max_tokens_cap={LONG}", *NO_LIMITS) as live:
        sock = send(live.url, {"model": live.model, "prompt": "hi", "max_tokens": LONG, "n": 2, "temperature": 0,
                               "stream": True})
        first_event(sock)
        assert health(live.url)["active_sequences"] == 2
        sock.close()
        took = wait_until(lambda: health(live.url)["active_sequences"] == 0, timeout=5, what="the slots freeing")
        stats = health(live.url)
        assert took < 2.0 and stats["queue_depth"] == 0
        assert stats["tokens_generated"] < LONG  # not the 2 x 4000 tokens of the whole reply
        wait_until(lambda: audit_lines(live.tmp), what="the audit line")
        audit = audit_lines(live.tmp)[-1]
        assert audit["finish_reasons"] == ["abandoned", "abandoned"] and audit["status"] == 200


def test_disconnect_while_queued_leaves_the_queue_at_once(chatty_run, tmp_path):
    with serving_run(chatty_run, tmp_path, "server.max_batch=1", "server.max_queue=2", f"server.max_tokens_cap={LONG}",
                     *NO_LIMITS) as live:
        with holding_the_slot(live.url, live.model, LONG):
            waiting = send(live.url, {"model": live.model, "prompt": "hi", "max_tokens": 4})
            wait_until(lambda: health(live.url)["queue_depth"] == 1, what="the request queueing")
            waiting.close()  # its first chunk is a whole long reply away
            took = wait_until(lambda: health(live.url)["queue_depth"] == 0, timeout=5, what="the queue emptying")
            assert took < 2.0 and health(live.url)["active_sequences"] == 1  # the running stream goes on
            wait_until(lambda: any(a.get("error_code") == "client_disconnected" for a in audit_lines(live.tmp)))
        wait_until(lambda: health(live.url)["active_sequences"] == 0)
        gone = next(a for a in audit_lines(live.tmp) if a.get("error_code") == "client_disconnected")
        assert gone["status"] == 499 and gone.get("completion_tokens", 0) == 0


def test_an_error_after_the_stream_started_arrives_in_band(chatty_run, tmp_path):
    with serving_run(chatty_run, tmp_path, f"server.max_tokens_cap={LONG}", *NO_LIMITS) as live:
        stream = client(live.url).completions.create(model=live.model, prompt="hi", max_tokens=LONG, temperature=0,
                                                     stream=True)
        assert next(iter(stream)).choices[0].text
        asyncio.run(live.service.close())  # the engine stops under the open stream
        with pytest.raises(openai.APIError) as caught:
            list(stream)
        assert "generation failed: the server is shutting down" in str(caught.value)  # the scheduler's message
        assert client(live.url).models.list().data[0].id == live.model  # still serving
        assert health(live.url)["active_sequences"] == 0


def test_the_audit_log_holds_text_only_when_configured(tiny_run, tmp_path):
    for include in (False, True):
        with serving_run(tiny_run, tmp_path, f"audit.include_text={str(include).lower()}") as live:
            reply = client(live.url).completions.create(model=live.model, prompt="Paragraph 5:", max_tokens=4)
        text = reply.choices[0].text
        assert text
        line = audit_lines(tmp_path)[-1]
        assert line.get("output_text") == ([text] if include else None)
        assert line.get("prompt_text") == ("Paragraph 5:" if include else None)


def test_the_chat_page_directory_is_served_at_the_root_when_present(tiny_run, tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    from hybridlm.serve import app as app_module

    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<html>chat</html>")
    monkeypatch.setattr(app_module, "STATIC_DIR", static)
    with serving_run(tiny_run, tmp_path) as live:
        with urllib.request.urlopen(f"{live.url}/", timeout=10) as reply:
            assert reply.read() == b"<html>chat</html>"
        assert health(live.url)["status"] == "ok"  # the API routes come first
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"{live.url}/nothing-here", timeout=10)
        assert caught.value.code == 404 and "error" in json.loads(caught.value.read())


def test_a_shared_system_prompt_is_prefilled_once_and_metrics_count_it(chatty_run, tmp_path):
    system = "".join(f"Rule {i}: the value of x{i} is {i * 7 % 13}. " for i in range(60))
    chats = [[{"role": "system", "content": system}, {"role": "user", "content": question}]
             for question in ("What is x3?", "And x12?")]
    replies = {}
    for budget in (64, 0):
        with serving_run(chatty_run, tmp_path / str(budget), f"server.prefix_cache_mb={budget}", *NO_LIMITS) as live:
            ids = [live.service.encode_chat(chat) for chat in chats]
            replies[budget] = [client(live.url).chat.completions.create(
                model=live.model, messages=chat, max_tokens=20, temperature=0).choices[0].message.content
                for chat in chats]
            with urllib.request.urlopen(f"{live.url}/metrics", timeout=30) as page:
                metrics = page.read().decode()
        series = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line.startswith("hybridlm_prefix_cache"))
        if budget:
            common = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
            shared_blocks = common // 256  # whole 256-token blocks of the shared system prompt
            prompt_tokens = [len(i) for i in ids]
            assert shared_blocks >= 2
            assert float(series["hybridlm_prefix_cache_tokens_saved"]) == 256 * shared_blocks
            assert float(series["hybridlm_prefix_cache_hits"]) == 1 and float(series["hybridlm_prefix_cache_lookups"]) == 2
            assert float(series["hybridlm_prefix_cache_hit_rate"]) == pytest.approx(256 * shared_blocks / sum(prompt_tokens))
            assert 0 < float(series["hybridlm_prefix_cache_bytes"]) <= 64 << 20
        else:
            assert float(series["hybridlm_prefix_cache_lookups"]) == 0  # switched off: nothing looked up
    assert replies[64] == replies[0]  # the cache changes nothing the client sees
