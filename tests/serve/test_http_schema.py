"""Schemathesis against the live server's /openapi.json (tiny run, small caps): generated requests,
valid and invalid, never get a 5xx. Bounded examples keep it to seconds.

The strategies are driven with Hypothesis's own @given inside the test (schemathesis's lazy
pytest loader does not run under pytest 9)."""

from __future__ import annotations

import pytest
import schemathesis
from httpserver import KEY, serving_run
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error


@pytest.fixture(scope="module")
def schema_server(tiny_run, tmp_path_factory):
    with serving_run(tiny_run, tmp_path_factory.mktemp("schema"), "server.max_batch=4", "server.max_queue=64",
                     "server.max_tokens_cap=4", "limits.requests_per_minute=0", "limits.tokens_per_minute=0",
                     "server.max_n=2", "server.max_body_bytes=65536") as live:
        yield live.url, live.model


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_generated_requests_get_no_server_error(schema_server, mode):
    url, model = schema_server
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    seen: dict[str, set[int]] = {}

    @given(case=schema.as_strategy(mode))
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model  # reach generation, not only the unknown-model 404
        response = case.call(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
        case.validate_response(response, checks=[not_a_server_error])
        seen.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)

    check()
    assert {"POST /v1/completions", "POST /v1/chat/completions"} <= set(seen)
    if mode == schemathesis.GenerationMode.POSITIVE:
        assert 200 in seen["POST /v1/completions"] | seen["POST /v1/chat/completions"], seen
