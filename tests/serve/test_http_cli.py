"""`hybridlm serve` as a user runs it: a subprocess on a free 127.0.0.1 port with a key file and a
TOML config, answering the openai client; bad input exits 2 with one line before anything starts."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import openai
import pytest
from conftest import free_port


def hybridlm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybridlm", *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_serve_starts_answers_and_stops_on_ctrl_c(tiny_run, tmp_path):
    (tmp_path / "keys.txt").write_text("sk-cli-key\n")
    (tmp_path / "serve.toml").write_text(
        f'[server]\nmax_tokens_cap = 16\nmodel_name = "tiny"\n[safety]\nreview_db = "{tmp_path / "review.sqlite"}"\n'
        f'[audit]\nlog = "{tmp_path / "audit.jsonl"}"\n')
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "hybridlm", "serve", "--model", str(tiny_run), "--port", str(port), "--api-keys",
         str(tmp_path / "keys.txt"), "--config", str(tmp_path / "serve.toml"), "limits.requests_per_minute=100",
         "server.dtype=fp32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    health = json.loads(response.read())
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read() if server.poll() else ""
                time.sleep(0.2)
        assert health["status"] == "ok" and health["model"] == "tiny"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-cli-key", max_retries=0)
        reply = client.completions.create(model="tiny", prompt="Paragraph 1:", max_tokens=5)
        assert reply.usage.completion_tokens <= 5
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt="Paragraph 1:", max_tokens=17)
    finally:
        server.send_signal(signal.SIGINT)
        _, stderr = server.communicate(timeout=60)
    assert server.returncode == 0, stderr[-2000:]
    assert "sk-cli-key" not in (tmp_path / "audit.jsonl").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--model", "/no/such/run"], "not a hybridlm run directory"),
    (["--api-keys", "/no/such/keys.txt"], "API key file not found"),
    (["--config", "/no/such/serve.toml"], "config file not found"),
    (["limits.requests_per_minute=-1"], "must be >= 0"),
    (["server.colour=blue"], "unknown server key"),
    (["--port", "70000"], "--port"),
])
def test_serve_bad_input_exits_2_with_one_line(tiny_run, extra, message):
    args = ["serve", "--model", str(tiny_run), *extra] if "--model" not in extra else ["serve", *extra]
    result = hybridlm(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
