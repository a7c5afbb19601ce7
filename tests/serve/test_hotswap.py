"""Serving a registry alias (models:/NAME@ALIAS) on 127.0.0.1 with a real MLflow SQLite registry:
clients stream without pause while the alias moves twice, and no request fails, every reply is
complete and is exactly what one version produces (the version named in its response header);
the old weights are freed; a version changed after registration is refused at load and the
serving one stays; /admin/reload needs an admin key; the rollback policy moves the alias back
after a version whose replies the safety filter blocks, and leaves a healthy one alone."""

from __future__ import annotations

import gc
import json
import shutil
import threading
import weakref
from types import SimpleNamespace

import pytest
from httpserver import KEY, NO_LIMITS, config, keys, running, wait_until

from hybridlm.fileio import atomic_write_json, read_json
from hybridlm.inference.decode import generate_ids
from hybridlm.inference.generate import completion_prompt_ids
from hybridlm.inference.sampling import SamplingParams
from hybridlm.inference.text import stream_text
from hybridlm.registry.card import render_card
from hybridlm.registry.serving import AliasSource
from hybridlm.registry.store import Registry
from hybridlm.run import load_run
from hybridlm.serve.app import create_app

ADMIN = "sk-admin-51c0"
PROMPTS = ["Paragraph 3:", "Paragraph 41: the value", "Paragraph 7"]
TOKENS = 24


def reference(run_dir) -> dict[str, str]:
    """Each prompt's greedy reply on one version, decoded by the engine directly."""
    run = load_run(run_dir)
    out = {}
    for prompt in PROMPTS:
        ids = list(generate_ids(run.model, completion_prompt_ids(run.tokenizer, prompt),
                                SamplingParams(max_new_tokens=TOKENS, temperature=0), eos_id=run.tokenizer.eos_id))
        out[prompt] = "".join(stream_text(run.tokenizer, ids))  # the text a reply shows
    return out


@pytest.fixture
def registry(tiny_run, chatty_run, tmp_path):
    """tiny/1 = tiny_run, tiny/2 = chatty_run (other weights), tiny/3 = a copy of tiny_run."""
    store = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    copy = tmp_path / "tiny-copy"
    shutil.copytree(tiny_run, copy)
    for run in (tiny_run, chatty_run, copy):
        store.register(run, "tiny", render_card(run, "tiny"))
    store.move("tiny", "production", 1, "set")
    return SimpleNamespace(store=store, runs={1: tiny_run, 2: chatty_run, 3: copy}, tmp=tmp_path)


def serve_alias(registry, *overrides: str):
    cfg = config(registry.tmp, 'server.dtype="fp32"', "server.alias_poll_s=0.1", *NO_LIMITS, *overrides)
    return create_app(AliasSource(registry.store, "tiny", "production"), cfg, keys(KEY), keys(ADMIN))


def stream_once(url: str, prompt: str) -> tuple[str, str, str | None]:
    """(version header, text, finish reason) of one streamed greedy completion; raises on any failure."""
    import http.client
    from urllib.parse import urlparse

    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps({"model": "tiny", "prompt": prompt, "stream": True,
                     "max_tokens": TOKENS, "temperature": 0}),
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        version, text, finish, done = response.getheader("x-hybridlm-model-version"), "", None, False
        for line in response.read().decode().splitlines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert "error" not in event, event
                text += event["choices"][0]["text"]
                finish = event["choices"][0]["finish_reason"] or finish
        assert done and finish in ("stop", "length", "content_filter")
        return version, text, finish
    finally:
        conn.close()


def health(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"{url}/health", timeout=30) as page:
        return json.loads(page.read())


def post(url: str, path: str, key: str | None) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{url}{path}", method="POST", data=b"",
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as page:
            return page.status, json.loads(page.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_streams_survive_two_alias_moves_and_each_reply_is_one_versions(registry):
    expected = {f"tiny/{v}": reference(run) for v, run in registry.runs.items()}
    app = serve_alias(registry)
    first_model = weakref.ref(app.state.server.service._scheduler.model)
    replies, failures, stop = [], [], threading.Event()

    def client(index: int) -> None:
        while not stop.is_set():
            prompt = PROMPTS[index % len(PROMPTS)]
            try:
                replies.append((prompt, *stream_once(url, prompt)))
            except Exception as exc:  # noqa: BLE001 - every failure is counted, none may happen
                failures.append(repr(exc))
            index += 1

    with running(app) as url:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for version in (2, 3):
            wait_until(lambda: len(replies) >= 6, 60, "replies before the move")
            registry.store.move("tiny", "production", version, "set")
            wait_until(lambda v=version: health(url)["version"] == f"tiny/{v}", 30, f"the swap to tiny/{version}")
            replies_at_swap = len(replies)
            wait_until(lambda n=replies_at_swap: len(replies) >= n + 6, 60, "replies after the move")
        stop.set()
        for thread in threads:
            thread.join(60)
        metrics = __import__("urllib.request").request.urlopen(f"{url}/metrics", timeout=30).read().decode()
        wait_until(lambda: gc.collect() is not None and first_model() is None, 30, "the first version's weights freed")
    assert failures == []
    served = {version for _, version, _, _ in replies}
    assert served == {"tiny/1", "tiny/2", "tiny/3"}
    for prompt, version, text, _ in replies:
        assert text == expected[version][prompt], (version, prompt)  # exactly that version's reply
    assert expected["tiny/1"] != expected["tiny/2"]  # the versions are told apart by their replies
    assert 'hybridlm_model_info{version="tiny/3"} 1.0' in metrics
    assert 'hybridlm_model_swaps_total{result="ok"} 2.0' in metrics


def test_a_tampered_version_is_refused_at_load_and_the_serving_one_stays(registry):
    run = registry.runs[3]
    cfg = read_json(run / "config.json", "run config")
    cfg["train"]["seed"] += 1
    atomic_write_json(run / "config.json", cfg)
    app = serve_alias(registry, "server.alias_poll_s=0")
    with running(app) as url:
        assert post(url, "/admin/reload", None)[0] == 401
        assert post(url, "/admin/reload", KEY)[0] == 401  # an API key is not an admin key
        assert post(url, "/admin/reload", ADMIN) == (200, {"swapped": False, "version": "tiny/1"})
        registry.store.move("tiny", "production", 3, "set")
        status, body = post(url, "/admin/reload", ADMIN)
        assert status == 409 and "tiny/1 keeps serving" in body["error"]["message"]
        assert "does not match its recorded sha256" in body["error"]["message"]
        state = health(url)
        assert state["version"] == "tiny/1" and "sha256" in state["last_swap_error"]
        assert stream_once(url, PROMPTS[0])[0] == "tiny/1"
        registry.store.move("tiny", "production", 2, "set")
        assert post(url, "/admin/reload", ADMIN)[1]["version"] == "tiny/2"  # a good version loads after a bad one


def test_no_admin_keys_means_no_admin_requests(registry):
    app = create_app(AliasSource(registry.store, "tiny", "production"),
                     config(registry.tmp, 'server.dtype="fp32"', *NO_LIMITS), keys(KEY))
    with running(app) as url:
        status, body = post(url, "/admin/reload", ADMIN)
        assert status == 403 and "no admin keys" in body["error"]["message"]


def test_the_rollback_policy_moves_the_alias_back_from_a_blocked_version_only(registry):
    # The random-weight version writes bytes outside ASCII; the trained one does not.
    rule = 'safety.rules=[{name = "non-ascii", action = "block", patterns = ["[^\\\\x00-\\\\x7f]"], applies_to = ["output"]}]'
    app = serve_alias(registry, "rollback.enabled=true", "rollback.min_requests=4", "rollback.max_block_rate=0.5",
                      "rollback.max_error_rate=0", rule)
    with running(app) as url:
        registry.store.move("tiny", "production", 3, "set")  # healthy: its replies pass
        wait_until(lambda: health(url)["version"] == "tiny/3", 30, "the swap to tiny/3")
        for prompt in PROMPTS * 2:
            stream_once(url, prompt)
        assert health(url)["version"] == "tiny/3"
        registry.store.move("tiny", "production", 2, "set")
        wait_until(lambda: health(url)["version"] == "tiny/2", 30, "the swap to tiny/2")
        for prompt in PROMPTS * 2:
            stream_once(url, prompt)
        wait_until(lambda: health(url)["version"] == "tiny/3", 30, "the automated rollback")
    last = registry.store.history("tiny", "production")[-1]
    assert last.action == "auto-rollback" and (last.from_version, last.to_version) == (2, 3)
    assert "safety-filter block rate" in last.reason and last.reason.startswith("tiny/2")


def test_serve_refuses_an_unknown_model_or_alias_in_one_line(registry):
    import subprocess
    import sys

    uri = registry.store.uri
    for ref, words in (("models:/nope@production", "no model named 'nope'"), ("models:/tiny@staging", "no alias 'staging'"),
                       ("models:/tiny", "models:/NAME@ALIAS")):
        result = subprocess.run([sys.executable, "-m", "hybridlm", "serve", "--model", ref, "--registry", uri, "--port", "0"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1, \
            result.stderr
