"""The chat page at / in headless Chromium (playwright driving the system chromium), against the live
server on 127.0.0.1 with the tiny trained run: the API key field and the model picker, a streamed
reply that grows chunk by chunk and equals the API's greedy reply, errors shown inline (400, 401,
429, and 503 while a long chatty_run reply holds the only slot), Stop closing a long stream (the
server frees the slot), and no request leaving 127.0.0.1. Each test saves a screenshot in its tmp dir.

Why not skipped when Chromium is missing: the page is a deliverable like the API, so a machine
without a browser fails here with what to install (scripts/test installs it where it can)."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import openai
import pytest
from hybridlm.data.preferences import read_preferences
from hybridlm.serve.feedback import FeedbackStore, export_feedback
from httpserver import (
    KEY,
    NO_LIMITS,
    health,
    holding_the_slot,
    send,
    serving_run,
    wait_until,
)

CAP = 32
LONG = 4000
"""max_tokens of a chatty_run reply that outlasts a test (seconds of decoding); the tests end it early."""
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_path() -> str:
    """$HYBRIDLM_CHROMIUM, else a Chromium on PATH; a failure saying what to install otherwise."""
    path = os.environ.get("HYBRIDLM_CHROMIUM") or next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    if not path or not Path(path).exists():
        pytest.fail("the chat page test needs Chromium: apt-get install chromium (Debian/Ubuntu), "
                    "or set HYBRIDLM_CHROMIUM=/path/to/chrome")
    return path


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the chat page test needs playwright: pip install -e '.[dev]'")
    with sync_playwright() as playwright:  # the system Chromium: playwright downloads no browser
        chromium = playwright.chromium.launch(executable_path=chromium_path(), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def live(tiny_run, tmp_path_factory):
    with serving_run(tiny_run, tmp_path_factory.mktemp("chat_page"), "server.max_batch=4", "server.max_queue=8",
                     f"server.max_tokens_cap={CAP}", *NO_LIMITS) as live:
        yield live


@pytest.fixture
def page(browser, tmp_path) -> Iterator:
    """A fresh page (own sessionStorage) whose requests may only go to 127.0.0.1; it is
    screenshotted to tmp_path/chat_page.png at the end."""
    context = browser.new_context(viewport={"width": 900, "height": 640})
    outside: list[str] = []

    def only_loopback(route) -> None:
        if urlparse(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_loopback)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    page.screenshot(path=str(tmp_path / "chat_page.png"))
    context.close()
    assert not outside, f"the page tried to reach beyond 127.0.0.1: {outside}"
    assert not errors, f"script errors on the page: {errors}"


WATCH_REPLY = """() => {
  window.replyLengths = [];
  new MutationObserver(() => {
    const replies = document.querySelectorAll("#messages .message.assistant .text");
    const length = replies.length ? replies[replies.length - 1].textContent.length : 0;
    const seen = window.replyLengths;
    if (length && (!seen.length || seen[seen.length - 1] !== length)) seen.push(length);
  }).observe(document.getElementById("messages"), {subtree: true, childList: true, characterData: true});
}"""
"""Records every length the last reply's text takes on the page, as the DOM changes."""


def ask(page, text: str) -> object:
    """Type a message, send it, and wait until its reply has finished; returns the reply element."""
    page.get_by_label("Message").fill(text)
    page.get_by_role("button", name="Send").click()
    reply = page.locator("#messages .message.assistant").last
    page.wait_for_function("() => !document.querySelector('[data-state=\"streaming\"]')", timeout=60_000)
    return reply


def test_a_streamed_reply_equals_the_api_reply(live, page, tmp_path):
    page.goto(live.url + "/")
    assert page.title() == "hybridlm chat"
    page.get_by_role("alert").filter(has_text="401").wait_for()  # no key yet: the model list is refused
    page.get_by_label("API key").fill(KEY)
    page.get_by_label("API key").press("Tab")  # `change` stores the key and reloads the models
    page.wait_for_function(f"() => document.getElementById('model').value === {live.model!r}")
    assert page.get_by_role("alert").is_hidden()
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill(str(CAP))
    page.evaluate(WATCH_REPLY)
    question = "Paragraph 3:"  # the tiny model answers with ~90 characters: several of the filter's 16-character steps

    reply = ask(page, question)

    assert reply.get_attribute("data-state") == "done"
    text = reply.locator(".text").inner_text()
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=60)
    expected = client.chat.completions.create(model=live.model, messages=[{"role": "user", "content": question}],
                                              max_tokens=CAP, temperature=0).choices[0].message.content
    assert text == expected and text.strip()
    lengths = page.evaluate("window.replyLengths")
    assert int(reply.get_attribute("data-chunks")) > 1
    assert len(lengths) > 1 and lengths == sorted(lengths) and lengths[-1] == len(text), lengths
    page.screenshot(path=str(tmp_path / "chat_reply.png"))
    assert page.evaluate("sessionStorage.getItem('hybridlm.apiKey')") == KEY
    page.reload()
    assert page.get_by_label("API key").input_value() == KEY  # kept for the session, not retyped


def test_errors_are_shown_inline(live, page):
    page.goto(live.url + "/")
    page.get_by_label("API key").fill("sk-wrong")
    page.get_by_label("API key").press("Tab")
    page.get_by_role("alert").filter(has_text="401").wait_for()
    page.get_by_label("API key").fill(KEY)
    page.get_by_label("API key").press("Tab")
    page.wait_for_function(f"() => document.getElementById('model').value === {live.model!r}")
    page.get_by_label("Max tokens").fill(str(CAP + 1))
    ask(page, "Hello?")
    error = page.locator("#messages [role=alert] .text").last.inner_text()
    assert error.startswith("400") and "max_tokens" in error, error
    assert page.get_by_label("Message").input_value() == "Hello?"  # given back for another try


def refusal_shown(page, live, status: str) -> None:
    """Open the page on `live`, pick its model with the key, ask, and find the refusal inline."""
    page.goto(live.url + "/")
    page.get_by_label("API key").fill(KEY)
    page.get_by_label("API key").press("Tab")
    page.wait_for_function(f"() => document.getElementById('model').value === {live.model!r}")
    ask(page, "Hello?")
    error = page.locator("#messages [role=alert] .text").last.inner_text()
    assert error.startswith(status) and re.search(r"retry (in|after) \d+ s", error), error
    assert page.get_by_label("Message").input_value() == "Hello?"  # given back for another try


def test_a_rate_limit_is_shown_inline(tiny_run, page, tmp_path):
    with serving_run(tiny_run, tmp_path, "limits.requests_per_minute=1") as live:  # the model list takes it
        refusal_shown(page, live, "429")


def test_a_full_queue_is_shown_inline(chatty_run, page, tmp_path):
    with serving_run(chatty_run, tmp_path, "server.max_batch=1", "server.max_queue=1", f"server.max_tokens_cap={LONG}",
                     *NO_LIMITS) as live:
        with holding_the_slot(live.url, live.model, LONG):
            waiting = send(live.url, {"model": live.model, "prompt": "Paragraph 2", "max_tokens": 2})
            wait_until(lambda: health(live.url)["queue_depth"] == 1, what="the second request queueing")
            refusal_shown(page, live, "503")
        waiting.close()


def test_stop_ends_the_reply_and_frees_the_slot(chatty_run, page, tmp_path):
    with serving_run(chatty_run, tmp_path, "safety.enabled=false", f"server.max_tokens_cap={LONG}", *NO_LIMITS) as live:
        page.goto(live.url + "/")
        page.get_by_label("API key").fill(KEY)
        page.get_by_label("API key").press("Tab")
        page.wait_for_function(f"() => document.getElementById('model').value === {live.model!r}")
        page.get_by_label("Temperature").fill("0")  # greedy: the untrained run's reply runs to max_tokens
        page.get_by_label("Max tokens").fill(str(LONG))
        page.get_by_label("Message").fill("Go on")
        page.get_by_role("button", name="Send").click()
        reply = page.locator("#messages .message.assistant").last
        page.wait_for_function("() => Number(document.querySelector('.message.assistant').dataset.chunks) >= 3")
        page.get_by_role("button", name="Stop").click()
        page.wait_for_function("() => document.querySelector('.message.assistant').dataset.state === 'stopped'")
        assert reply.locator(".text").inner_text()
        wait_until(lambda: health(live.url)["active_sequences"] == 0, what="the slot freeing")
        assert health(live.url)["tokens_generated"] < LONG  # the server closed the stream long before max_tokens
        assert page.get_by_role("button", name="Send").is_enabled()


def _open_with_key(page, live) -> None:
    page.goto(live.url + "/")
    page.get_by_label("API key").fill(KEY)
    page.get_by_label("API key").press("Tab")
    page.wait_for_function(f"() => document.getElementById('model').value === {live.model!r}")


def test_thumbs_and_comparisons_reach_the_feedback_store_and_export_as_pairs(live, page, tmp_path):
    question = "Paragraph 5:"
    _open_with_key(page, live)
    page.get_by_label("Max tokens").fill("12")
    page.get_by_label("Temperature").fill("0")
    greedy = ask(page, question)
    greedy_text = greedy.locator(".text").text_content()
    greedy.get_by_role("button", name="Good reply").click()
    page.wait_for_function("() => document.querySelector('.message.assistant').dataset.feedback === 'up'")
    page.get_by_role("button", name="New chat").click()
    page.get_by_label("Temperature").fill("1.5")
    sampled = ask(page, question)  # the same conversation, another reply: rated down
    sampled.get_by_role("button", name="Bad reply").click()
    page.wait_for_function("() => document.querySelector('.message.assistant').dataset.feedback === 'down'")

    page.get_by_role("button", name="New chat").click()
    page.get_by_label("Compare two replies").check()
    page.get_by_label("Message").fill("Paragraph 9:")
    page.get_by_role("button", name="Send").click()
    page.wait_for_function("() => document.querySelectorAll('[data-state=\"choosing\"]').length === 2")
    first, second = (page.locator("#messages .message.assistant").nth(i).locator(".text").text_content()
                     for i in range(2))
    page.get_by_role("button", name="Pick reply 2").click()
    page.wait_for_function("() => document.querySelectorAll('[data-picked]').length === 2")
    page.screenshot(path=str(tmp_path / "chat_compare.png"))

    rows = FeedbackStore(live.tmp / "feedback.sqlite", create=False).rows()
    assert [(r["kind"], r["rating"]) for r in rows] == [("rating", "up"), ("rating", "down"), ("comparison", None)]
    asked = [{"role": "user", "content": question}]
    assert json.loads(rows[0]["messages"]) == asked == json.loads(rows[1]["messages"])
    assert rows[0]["reply"] == greedy_text and rows[0]["reply"] != rows[1]["reply"]
    assert (rows[2]["chosen"], rows[2]["rejected"]) == (second, first)
    assert all(r["model"] == live.model and r["key_id"] not in ("", "anonymous", KEY) for r in rows)

    exported = tmp_path / "prefs.jsonl"
    assert export_feedback(live.tmp / "feedback.sqlite", exported)["pairs"] == 2
    pairs = read_preferences(str(exported)).pairs  # the format rm and dpo stages read
    assert [(p.chosen, p.rejected) for p in pairs] == [(second, first), (rows[0]["reply"], rows[1]["reply"])]
    assert pairs[1].prompt[0].content == question


def test_feedback_endpoint_rejects_bad_input_by_name(live):
    url = urlparse(live.url)
    for body, status, needle in [
        ({"model": live.model, "messages": [{"role": "user", "content": "x"}], "reply": "y"}, 400, "rating"),
        ({"model": live.model, "messages": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "a"}, 400,
         "the same text"),
        ({"model": "other", "messages": [{"role": "user", "content": "x"}], "reply": "y", "rating": "up"}, 404,
         "not served here"),
        ({"model": live.model, "messages": [{"role": "user", "content": "x"}], "reply": "y", "rating": "up",
          "score": 3}, 400, "score"),
    ]:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        conn.request("POST", "/v1/feedback", body=json.dumps(body),
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        response = conn.getresponse()
        error = json.loads(response.read())["error"]
        conn.close()
        assert response.status == status and needle in error["message"], (body, error)
