"""The HTTP layer over a scripted Service, where exact control matters: a full queue (503), rate
limits (429 with Retry-After), output filtering of known text (streamed and not), a slow stream
abandoned by its client, and an error after the stream started."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlparse

import openai
import pytest
from httpserver import KEY, OTHER_KEY, ScriptedService, queue_full, serving

from hybridlm.serve.review import ReviewQueue

WORDS = ["The ", "door ", "code ", "is ", "12", "3-4", "5-67", "89", " and ", "the ", "word ", "is ", "open ",
         "sesame", ". ", "Bye."]


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def test_a_full_queue_is_503_with_retry_after(tmp_path):
    with serving(queue_full(), tmp_path) as url:
        with pytest.raises(openai.InternalServerError) as caught:
            client(url).completions.create(model="scripted", prompt="hi", max_tokens=3)
        assert caught.value.status_code == 503 and caught.value.code == "queue_full"
        assert caught.value.response.headers["retry-after"] == "1"
        with pytest.raises(openai.InternalServerError):  # streamed requests fail before the first byte, the same way
            list(client(url).completions.create(model="scripted", prompt="hi", max_tokens=3, stream=True))


def test_request_rate_limit_is_429_with_retry_after_per_key(tmp_path):
    with serving(ScriptedService(["a"]), tmp_path, "limits.requests_per_minute=2") as url:
        for _ in range(2):
            client(url).completions.create(model="scripted", prompt="hi", max_tokens=1)
        with pytest.raises(openai.RateLimitError) as caught:
            client(url).completions.create(model="scripted", prompt="hi", max_tokens=1)
        assert caught.value.code == "rate_limit_exceeded" and caught.value.type == "requests"
        assert int(caught.value.response.headers["retry-after"]) >= 1
        client(url, OTHER_KEY).completions.create(model="scripted", prompt="hi", max_tokens=1)  # its own bucket


def test_token_rate_limit_counts_prompt_plus_max_tokens_times_n(tmp_path):
    with serving(ScriptedService(["a"] * 8), tmp_path, "limits.tokens_per_minute=100") as url:
        c = client(url)
        c.completions.create(model="scripted", prompt="hi", max_tokens=30, n=2)  # reserves 3 + 60, uses 3 + 16
        c.completions.create(model="scripted", prompt="hi", max_tokens=30, n=2)  # the refund made room
        with pytest.raises(openai.RateLimitError) as caught:
            c.completions.create(model="scripted", prompt="hi", max_tokens=32, n=3)
        assert caught.value.type == "tokens" and "retry-after" in caught.value.response.headers
        with pytest.raises(openai.BadRequestError) as caught:  # can never fit: waiting would not help
            c.completions.create(model="scripted", prompt="x" * 50, max_tokens=32, n=2)
        assert caught.value.code == "request_too_large"


def test_output_filter_on_a_whole_reply(tmp_path):
    with serving(ScriptedService(WORDS), tmp_path, "safety.hold_chars=12") as url:
        reply = client(url).completions.create(model="scripted", prompt="hi", max_tokens=8)
        assert reply.choices[0].text == "The door code is [redacted]" and reply.choices[0].finish_reason == "length"
    script = WORDS + ["and so on "] * 16  # 32 pieces
    with serving(ScriptedService(script), tmp_path, 'safety.rules=[{name="magic", action="block", '
                 'words=["open sesame"], applies_to=["output"]}]') as url:
        reply = client(url).completions.create(model="scripted", prompt="hi", max_tokens=32, n=2)
        for choice in reply.choices:
            assert choice.text == "The door code is [redacted] and the word is " and choice.finish_reason == "content_filter"
        assert reply.usage.completion_tokens < 2 * len(script)  # generation stopped soon after the block


def test_output_filter_on_a_stream(tmp_path):
    with serving(ScriptedService(WORDS), tmp_path, 'safety.rules=[{name="magic", action="block", '
                 'words=["open sesame"], applies_to=["output"]}, {name="door", action="flag", words=["door"]}]') as url:
        chunks = list(client(url).chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "tell me"}], max_tokens=32, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert text == "The door code is [redacted] and the word is "
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        queue = ReviewQueue(tmp_path / "review.sqlite", create=False)
        deadline = time.monotonic() + 10
        while len(queue.list()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {(i.rule, i.action, i.direction) for i in queue.list()} == {("door", "flag", "output"),
                                                                           ("magic", "block", "output")}


def test_disconnect_mid_stream_closes_the_service_stream_at_once(tmp_path):
    service = ScriptedService(["tick "] * 32, delay=0.1)  # 3.2 s if nobody stopped it
    with serving(service, tmp_path) as url:
        parts = urlparse(url)
        body = json.dumps({"model": "scripted", "prompt": "hi", "max_tokens": 32, "n": 2, "stream": True}).encode()
        sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while b"data: " not in received:
            received += sock.recv(4096)
        assert service.active == 2
        sock.close()
        started = time.monotonic()
        while service.active and time.monotonic() - started < 3:
            time.sleep(0.01)
        assert service.active == 0 and service.closed == 1
        assert time.monotonic() - started < 2.0 and service.generated < 2 * 32  # not the 3.2 s of a full reply
        deadline = time.monotonic() + 5
        while True:
            audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
            if audit or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert audit[-1]["finish_reasons"] == ["abandoned", "abandoned"] and audit[-1]["status"] == 200


def test_disconnect_while_waiting_for_the_first_chunk(tmp_path):
    service = ScriptedService(["slow"], delay=5.0)
    with serving(service, tmp_path) as url:
        parts = urlparse(url)
        body = json.dumps({"model": "scripted", "prompt": "hi", "max_tokens": 1}).encode()
        sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 5
        while not service.active and time.monotonic() < deadline:
            time.sleep(0.01)
        sock.close()
        started = time.monotonic()
        while service.active and time.monotonic() - started < 4:
            time.sleep(0.01)
        assert service.active == 0 and time.monotonic() - started < 2.5  # the first chunk was 5 s away


class Broken(ScriptedService):
    async def stream(self, req):
        async for chunk in super().stream(req):
            yield chunk
            raise RuntimeError("engine fell over")


def test_an_error_after_the_stream_started_arrives_in_band(tmp_path):
    with serving(Broken(["a", "b"]), tmp_path) as url:
        with pytest.raises(openai.APIError) as caught:
            list(client(url).completions.create(model="scripted", prompt="hi", max_tokens=2, stream=True))
        assert "generation failed" in str(caught.value)
        reply = client(url).models.list()  # still serving
        assert reply.data[0].id == "scripted"


def test_the_audit_log_holds_text_only_when_configured(tmp_path):
    for include, expected in (("false", None), ("true", ["hello "])):
        with serving(ScriptedService(["hello "]), tmp_path, f"audit.include_text={include}") as url:
            client(url).completions.create(model="scripted", prompt="my prompt", max_tokens=2)
        line = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
        assert line.get("output_text") == expected
        assert line.get("prompt_text") == (None if expected is None else "my prompt")


def test_the_chat_page_directory_is_served_at_the_root_when_present(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    from hybridlm.serve import app as app_module

    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<html>chat</html>")
    monkeypatch.setattr(app_module, "STATIC_DIR", static)
    with serving(ScriptedService(["a"]), tmp_path) as url:
        with urllib.request.urlopen(f"{url}/", timeout=10) as response:
            assert response.read() == b"<html>chat</html>"
        with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
            assert json.loads(response.read())["status"] == "ok"  # the API routes come first
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"{url}/nothing-here", timeout=10)
        assert caught.value.code == 404 and "error" in json.loads(caught.value.read())
