"""The live server on 127.0.0.1 with the tiny trained run: the official `openai` client (completions,
chat, streaming, its error types), the bad-input matrix over raw HTTP, metrics, the audit log, the
review queue, and a client that disconnects mid-stream."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from types import SimpleNamespace
from urllib.parse import urlparse

import openai
import pytest
from httpserver import KEY, OTHER_KEY, serving_run

from hybridlm.serve.auth import hash_key
from hybridlm.serve.review import ReviewQueue

CAP = 24
BODY_LIMIT = 65536


@pytest.fixture(scope="module")
def live(tiny_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    with serving_run(tiny_run, tmp, "server.max_batch=4", "server.max_queue=8", f"server.max_tokens_cap={CAP}",
                     "limits.requests_per_minute=0", "limits.tokens_per_minute=0",
                     f"server.max_body_bytes={BODY_LIMIT}", "server.max_n=4") as live:
        yield SimpleNamespace(url=live.url, tmp=tmp, service=live.service, model=live.model, service_run=tiny_run,
                              client=openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=60))


def post(url: str, path: str, body: bytes | None, headers: dict | None = None, method: str = "POST"):
    """A raw request (no client library in the way); returns (status, headers, parsed JSON or text)."""
    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}",
                                                       "Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        raw = response.read().decode()
        try:
            return response.status, dict(response.getheaders()), json.loads(raw)
        except json.JSONDecodeError:
            return response.status, dict(response.getheaders()), raw
    finally:
        conn.close()


def test_completions_and_chat_through_the_openai_client(live):
    done = live.client.completions.create(model=live.model, prompt="Paragraph 3:", max_tokens=12, temperature=0)
    assert done.object == "text_completion" and len(done.choices) == 1
    choice = done.choices[0]
    assert isinstance(choice.text, str) and choice.finish_reason in ("stop", "length")
    assert done.usage.prompt_tokens > 0 and 0 < done.usage.completion_tokens <= 12
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    chat = live.client.chat.completions.create(model=live.model, max_tokens=10, temperature=0,
                                               messages=[{"role": "system", "content": "Answer briefly."},
                                                         {"role": "user", "content": "What is x3?"}])
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert isinstance(chat.choices[0].message.content, str) and chat.usage.completion_tokens <= 10
    assert [m.id for m in live.client.models.list().data] == [live.model]


def test_streaming_gives_the_same_text_as_one_response(live):
    args = {"model": live.model, "prompt": "Paragraph 12: the value", "max_tokens": 16, "temperature": 0}
    whole = live.client.completions.create(**args).choices[0]
    chunks = list(live.client.completions.create(**args, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    messages = [{"role": "user", "content": "Tell me about x5."}]
    reply = live.client.chat.completions.create(model=live.model, messages=messages, max_tokens=12, temperature=0)
    events = list(live.client.chat.completions.create(model=live.model, messages=messages, max_tokens=12,
                                                      temperature=0, stream=True,
                                                      stream_options={"include_usage": True}))
    assert events[0].choices[0].delta.role == "assistant"
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text == reply.choices[0].message.content
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_n_seed_and_stop(live):
    args = {"model": live.model, "prompt": "Paragraph 7:", "max_tokens": 12, "temperature": 1.0, "seed": 5, "n": 3}
    first, second = (live.client.completions.create(**args) for _ in range(2))
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    greedy = live.client.completions.create(model=live.model, prompt="Paragraph 7:", max_tokens=12, temperature=0)
    text = greedy.choices[0].text
    stop = text.strip()[:2] or text[:1]
    stopped = live.client.completions.create(model=live.model, prompt="Paragraph 7:", max_tokens=12, temperature=0,
                                             stop=[stop, "zzz"])
    assert stopped.choices[0].text == text[: text.index(stop)] and stopped.choices[0].finish_reason == "stop"


def test_a_vanishing_temperature_decodes_greedily(live):
    args = {"model": live.model, "prompt": "Paragraph 4:", "max_tokens": 8}
    greedy = live.client.completions.create(**args, temperature=0).choices[0].text
    assert live.client.completions.create(**args, temperature=5e-324).choices[0].text == greedy


def test_openai_error_types(live):
    bad_key = openai.OpenAI(base_url=f"{live.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad_key.completions.create(model=live.model, prompt="hi", max_tokens=2)
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as caught:
        live.client.completions.create(model=live.model, prompt="hi", max_tokens=CAP + 1)
    assert caught.value.param == "max_tokens" and str(CAP) in caught.value.message
    with pytest.raises(openai.NotFoundError) as caught:
        live.client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert caught.value.code == "model_not_found"


LONG_PROMPT = "the value of x is seven. " * 400


@pytest.mark.parametrize("name, body, status, param", [
    ("invalid JSON", b'{"model": "run", "prompt": ', 400, None),
    ("not an object", b'["a", "b"]', 400, None),
    ("max_tokens 0", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("max_tokens over the cap", {"prompt": "hi", "max_tokens": CAP + 1}, 400, "max_tokens"),
    ("max_tokens a string", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("max_tokens a float", {"prompt": "hi", "max_tokens": 5.5}, 400, "max_tokens"),
    ("temperature a string", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("temperature too high", {"prompt": "hi", "temperature": 9}, 400, "temperature"),
    ("top_p zero", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("n too large", {"prompt": "hi", "n": 50}, 400, "n"),
    ("stop not strings", {"prompt": "hi", "stop": [1, 2]}, 400, "stop"),
    ("stop an empty string", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("prompt missing", {"max_tokens": 3}, 400, "prompt"),
    ("prompt a number", {"prompt": 42}, 400, "prompt"),
    ("two prompts", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("prompt over the context", {"prompt": LONG_PROMPT}, 400, "prompt"),
    ("unknown model", {"prompt": "hi", "model": "nope"}, 404, "model"),
    ("stream not a bool", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("seed negative", {"prompt": "hi", "seed": -1}, 400, "seed"),
])
def test_bad_input_is_a_4xx_openai_error_and_the_server_stays_up(live, name, body, status, param):
    if isinstance(body, dict):
        body = json.dumps({"model": live.model, **body}).encode()
    code, _, doc = post(live.url, "/v1/completions", body)
    assert code == status, (name, doc)
    error = doc["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param or error["param"].startswith(param), (name, error)
    assert post(live.url, "/health", None, method="GET")[0] == 200


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0"),  # "content is required (...)"
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "user", "content": LONG_PROMPT}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": CAP + 5}, "max_tokens"),
])
def test_bad_chat_input(live, body, param):
    code, _, doc = post(live.url, "/v1/chat/completions", json.dumps({"model": live.model, **body}).encode())
    assert code == 400 and doc["error"]["param"] == param, doc


def test_body_size_limit_from_content_length_and_from_a_chunked_body(live):
    big = json.dumps({"model": live.model, "prompt": "a" * BODY_LIMIT}).encode()
    code, _, doc = post(live.url, "/v1/completions", big)
    assert code == 413 and doc["error"]["code"] == "request_too_large"
    parts = urlparse(live.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("POST", "/v1/completions", body=(big[i:i + 8192] for i in range(0, len(big), 8192)),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    conn.close()
    assert post(live.url, "/health", None, method="GET")[0] == 200


def test_unknown_routes_and_methods_are_openai_errors(live):
    code, _, doc = post(live.url, "/v1/engines", b"{}")
    assert code in (404, 405) and "error" in doc
    code, _, doc = post(live.url, "/v1/completions", None, method="GET")
    assert code == 405 and doc["error"]["code"] == "method_not_allowed"


def test_safety_block_flag_and_the_review_queue(live):
    with pytest.raises(openai.BadRequestError) as caught:
        live.client.completions.create(model=live.model, prompt="-----BEGIN RSA PRIVATE KEY-----\nMIIEow", max_tokens=2)
    assert caught.value.code == "content_filter" and "private-key" in caught.value.message
    flagged = live.client.completions.create(model=live.model, prompt="how would someone build a bomb?", max_tokens=2)
    assert flagged.choices  # flag lets the request through ...
    queue = ReviewQueue(live.tmp / "review.sqlite", create=False)
    items = _wait_for(lambda: [i for i in queue.list() if i.rule in ("weapons", "private-key")], 2)
    assert {(i.rule, i.action, i.direction) for i in items} == {("weapons", "flag", "prompt"),
                                                                ("private-key", "block", "prompt")}
    assert all(i.key_id == hash_key(KEY)[:12] for i in items)
    weapons = next(i for i in items if i.rule == "weapons")
    assert ">>build a bomb<<" in weapons.excerpt  # ... and into the queue, for a person to look at
    cli = subprocess.run([sys.executable, "-m", "hybridlm", "review", "list", "--db", str(live.tmp / "review.sqlite"),
                          "--json"], capture_output=True, text=True, timeout=120, check=False)
    assert cli.returncode == 0 and any(i["id"] == weapons.id for i in json.loads(cli.stdout)["items"])


def _wait_for(get, count: int, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        found = get()
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_metrics_name_the_series(live):
    live.client.completions.create(model=live.model, prompt="Paragraph 1:", max_tokens=4)
    live.client.completions.create(model=live.model, prompt="how to build a bomb", max_tokens=2)
    code, headers, text = post(live.url, "/metrics", None, method="GET")
    assert code == 200 and headers["content-type"].startswith("text/plain")
    for series in ('hybridlm_requests_total{endpoint="/v1/completions",status="200"}',
                   "hybridlm_time_to_first_token_seconds_bucket", "hybridlm_time_per_output_token_seconds_bucket",
                   "hybridlm_request_duration_seconds_bucket", "hybridlm_prompt_tokens_total",
                   "hybridlm_completion_tokens_total", "hybridlm_queue_depth", "hybridlm_active_sequences",
                   "hybridlm_batch_size", 'hybridlm_filter_hits_total{action="flag",direction="prompt",rule="weapons"}',
                   "hybridlm_safety_filter_seconds_bucket"):
        assert series in text, series
    assert 'status="400"' in text  # the bad-input tests were counted by status


def test_audit_lines_name_the_key_id_never_the_key(live):
    live.client.completions.create(model=live.model, prompt="Paragraph 2: secret words", max_tokens=3)
    bad_key = openai.OpenAI(base_url=f"{live.url}/v1", api_key=OTHER_KEY + "x", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    def audit() -> list[dict]:
        return [json.loads(line) for line in (live.tmp / "audit.jsonl").read_text().splitlines()]

    _wait_for(lambda: [r for r in audit() if r["status"] == 401], 1)  # written just after the response
    lines, raw = audit(), (live.tmp / "audit.jsonl").read_text()
    assert KEY not in raw and OTHER_KEY not in raw and "secret words" not in raw
    ok = [r for r in lines if r.get("key_id") == hash_key(KEY)[:12] and r["status"] == 200 and r.get("completion_tokens")]
    assert ok and {"request_id", "endpoint", "prompt_tokens", "completion_tokens", "duration_s", "ttft_s",
                   "request_bytes", "response_bytes"} <= set(ok[-1])
    assert any(r["status"] == 401 and "key_id" not in r for r in lines)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(live):
    parts = urlparse(live.url)
    body = json.dumps({"model": live.model, "prompt": "Paragraph 9:", "max_tokens": CAP, "n": 4,
                       "temperature": 1.5, "stream": True}).encode()
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    received = b""
    while b"data: " not in received:
        received += sock.recv(4096)
    assert b"200 OK" in received
    sock.close()
    deadline = time.monotonic() + 10
    while True:
        stats = post(live.url, "/health", None, method="GET")[2]
        if stats["active_sequences"] == 0 and stats["queue_depth"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert stats["active_sequences"] == 0 and stats["queue_depth"] == 0


UNIMPLEMENTED_EXAMPLES = {
    "best_of": 3, "echo": True, "suffix": " end", "audio": {"voice": "alloy", "format": "wav"},
    "function_call": "auto", "functions": [{"name": "f", "parameters": {}}],
    "metadata": {"k": "v"}, "modalities": ["text", "audio"], "moderation": {"enabled": True},
    "parallel_tool_calls": True, "prediction": {"type": "content", "content": "x"}, "prompt_cache_key": "k",
    "prompt_cache_options": {"ttl": 60}, "prompt_cache_retention": "24h", "reasoning_effort": "low",
    "service_tier": "flex", "store": True, "verbosity": "low", "web_search_options": {"search_context_size": "low"},
}
"""A value for each OpenAI field this server does not implement that asks for something."""


def _openai_fields(module) -> set[str]:
    import typing

    return set(typing.get_type_hints(module.CompletionCreateParamsBase))


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_every_openai_request_field_is_honoured_or_refused_by_name(live, endpoint):
    """The openai package's own request types: each field is a field of our request model (and
    takes effect) or sits in the table of refused fields, and a value that asks for something
    there gets a 400 that names it."""
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_params

    from hybridlm.serve.protocol import (
        NOT_IMPLEMENTED_CHAT,
        NOT_IMPLEMENTED_COMPLETIONS,
        ChatCompletionRequest,
        CompletionRequest,
    )

    chat = endpoint == "chat"
    model, table = (ChatCompletionRequest, NOT_IMPLEMENTED_CHAT) if chat else (CompletionRequest, NOT_IMPLEMENTED_COMPLETIONS)
    theirs = _openai_fields(chat_params if chat else completion_create_params) | {"stream"}
    assert theirs <= set(model.model_fields) | set(table), sorted(theirs - set(model.model_fields) - set(table))
    base = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    for name in table:
        body = json.dumps({"model": live.model, "max_tokens": 2, **base, name: UNIMPLEMENTED_EXAMPLES[name]}).encode()
        code, _, doc = post(live.url, path, body)
        assert code == 400 and doc["error"]["param"] == name and doc["error"]["code"] == "unsupported_parameter", (name, doc)
        assert f"`{name}` is not supported by this server" in doc["error"]["message"]
    quiet = {"echo": False, "parallel_tool_calls": False}
    body = {"model": live.model, "max_tokens": 2, **base, **{k: v for k, v in quiet.items() if k in table}}
    assert post(live.url, path, json.dumps(body).encode())[0] == 200  # values that ask for nothing pass


def test_penalties_and_logit_bias_take_effect_as_the_engine_computes_them(live):
    """The server's greedy reply with bias and penalties equals hybridlm's own decoder given the
    same SamplingParams, and differs from the reply without them."""
    import torch

    from hybridlm.inference.decode import generate_ids
    from hybridlm.inference.generate import completion_prompt_ids
    from hybridlm.inference.sampling import SamplingParams
    from hybridlm.run import load_run

    run = load_run(live.service_run)
    prompt = "Paragraph 3:"
    ids = completion_prompt_ids(run.tokenizer, prompt)
    favoured = run.tokenizer.encode(" value")[0]
    controls = {"presence_penalty": 1.5, "frequency_penalty": 0.5, "repetition_penalty": 1.3, "top_k": 5,
                "logit_bias": {str(favoured): 4.0}}
    plain = live.client.completions.create(model=live.model, prompt=prompt, max_tokens=12, temperature=0)
    steered = live.client.completions.create(model=live.model, prompt=prompt, max_tokens=12, temperature=0,
                                             presence_penalty=1.5, frequency_penalty=0.5,
                                             logit_bias={str(favoured): 4.0},
                                             extra_body={"repetition_penalty": 1.3, "top_k": 5})
    params = SamplingParams(max_new_tokens=12, temperature=0, presence_penalty=1.5, frequency_penalty=0.5,
                            repetition_penalty=1.3, top_k=5, logit_bias=((favoured, 4.0),))
    with torch.no_grad():
        ours = list(generate_ids(run.model, ids, params, eos_id=run.tokenizer.eos_id))
    assert steered.choices[0].text == run.tokenizer.decode(ours) != plain.choices[0].text, controls


@pytest.mark.parametrize("bias, needle", [({"999999": 1.0}, "not a token id"), ({"abc": 1.0}, "not a token id"),
                                          ({"²": 1.0}, "not a token id"),
                                          ({"5": 150.0}, "less than or equal to 100")])
def test_bad_logit_bias_names_the_parameter(live, bias, needle):
    body = json.dumps({"model": live.model, "prompt": "hi", "max_tokens": 2, "logit_bias": bias}).encode()
    code, _, doc = post(live.url, "/v1/completions", body)
    assert code == 400 and doc["error"]["param"].startswith("logit_bias") and needle in doc["error"]["message"], doc


def test_the_end_user_id_reaches_the_audit_log(live):
    live.client.completions.create(model=live.model, prompt="hi", max_tokens=2, user="customer-42")
    # The audit line is written once the response is complete, which may be just after the client has it.
    lines = _wait_for(lambda: [line for line in (live.tmp / "audit.jsonl").read_text().splitlines()
                               if json.loads(line).get("end_user") == "customer-42"], 1)
    assert len(lines) == 1


def test_logprobs_in_openai_shapes_streamed_and_not(live):
    """Chat: logprobs.content with token, logprob, bytes, top_logprobs; completions: parallel
    lists with text_offset. The tokens' bytes spell the reply, and streaming gives the same values."""
    args = {"model": live.model, "max_tokens": 10, "temperature": 0}
    chat = live.client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], logprobs=True,
                                               top_logprobs=2, **args).choices[0]
    content = chat.logprobs.content
    assert content and all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
                           and c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)
    spelled = bytes(b for c in content for b in c.bytes).decode("utf-8", errors="ignore")  # as replies drop them
    assert spelled.removesuffix("<|end|>").removesuffix("<|eos|>") == chat.message.content
    done = live.client.completions.create(prompt="Paragraph 3:", logprobs=2, **args).choices[0]
    lp = done.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert "".join(lp.tokens).removesuffix("<|eos|>") == done.text
    assert [done.text[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens) if t != "<|eos|>"] == [True] * (
        len(lp.tokens) - lp.tokens.count("<|eos|>"))
    streamed = list(live.client.completions.create(prompt="Paragraph 3:", logprobs=2, stream=True, **args))
    values = [v for c in streamed if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert values == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert live.client.completions.create(prompt="Paragraph 3:", **args).choices[0].logprobs is None


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
])
def test_bad_logprobs_requests_name_the_parameter(live, path, extra, param):
    base = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    code, _, doc = post(live.url, path, json.dumps({"model": live.model, "max_tokens": 2, **base, **extra}).encode())
    assert code == 400 and doc["error"]["param"] == param, doc


def test_echo_returns_the_prompts_own_token_logprobs(live):
    """echo + logprobs + max_tokens 0: the prompt alone, each token's log-probability a forward
    pass gives it; a token-id prompt is taken as it is (its first token: None)."""
    import torch

    from hybridlm.inference.generate import completion_prompt_ids
    from hybridlm.run import load_run

    run = load_run(live.service_run)
    prompt = "Paragraph 5: the value of x5 is"
    ids = completion_prompt_ids(run.tokenizer, prompt)  # <|eos|> + the prompt's ids
    with torch.no_grad():
        rows = torch.log_softmax(run.model(torch.tensor([ids]))[0].float(), dim=-1)
    expected = [float(rows[i - 1, ids[i]]) for i in range(1, len(ids))]
    text = post(live.url, "/v1/completions", json.dumps({"model": live.model, "prompt": prompt, "max_tokens": 0,
                                                         "echo": True, "logprobs": 1}).encode())
    assert text[0] == 200, text
    choice = text[2]["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(expected, abs=1e-4)
    assert "".join(choice["logprobs"]["tokens"]) == prompt
    by_ids = post(live.url, "/v1/completions", json.dumps({"model": live.model, "prompt": ids, "max_tokens": 2,
                                                           "echo": True, "logprobs": 0, "temperature": 0}).encode())[2]
    values = by_ids["choices"][0]["logprobs"]["token_logprobs"]
    assert values[0] is None and values[1 : len(ids)] == pytest.approx(expected, abs=1e-4) and len(values) == len(ids) + 2
    assert by_ids["choices"][0]["text"].startswith(prompt)


@pytest.mark.parametrize("extra, param", [({"echo": True, "stream": True}, "echo"), ({"max_tokens": 0}, "max_tokens"),
                                          ({"prompt": [999999]}, "prompt")])
def test_bad_echo_requests_name_the_parameter(live, extra, param):
    body = {"model": live.model, "prompt": "hi", "max_tokens": 2, **extra}
    code, _, doc = post(live.url, "/v1/completions", json.dumps(body).encode())
    assert code == 400 and doc["error"]["param"] == param, doc
