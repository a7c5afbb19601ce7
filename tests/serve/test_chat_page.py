"""The chat page at / in headless Chromium (playwright driving the system chromium), against the live
server on 127.0.0.1 with the tiny trained run: the API key field and the model picker, a streamed
reply that grows chunk by chunk and equals the API's greedy reply, errors shown inline (400, 401,
429, 503), Stop closing the stream (the server frees the slot), and no request leaving 127.0.0.1.
Each test saves a screenshot in its tmp dir.

Why not skipped when Chromium is missing: the page is a deliverable like the API, so a machine
without a browser fails here with what to install (scripts/test installs it where it can)."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import openai
import pytest
from httpserver import KEY, ScriptedService, queue_full, serving

CAP = 32
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
    from hybridlm.serve.service import Service

    tmp = tmp_path_factory.mktemp("chat_page")
    service = Service(tiny_run, max_batch=4, max_queue=8, max_tokens_cap=CAP, dtype="fp32")
    with serving(service, tmp, "limits.requests_per_minute=0", "limits.tokens_per_minute=0") as url:
        yield SimpleNamespace(url=url, model=service.model_id)


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


@pytest.mark.parametrize("name, overrides, service, status", [
    ("rate limited", ("limits.requests_per_minute=1",), lambda: ScriptedService(["hi"]), "429"),
    ("queue full", (), queue_full, "503"),
])
def test_refusals_under_load_are_shown_inline(page, tmp_path, name, overrides, service, status):
    with serving(service(), tmp_path, *overrides) as url:  # the page's model list takes the one request
        page.goto(url + "/")
        page.get_by_label("API key").fill(KEY)
        page.get_by_label("API key").press("Tab")
        page.wait_for_function("() => document.getElementById('model').value === 'scripted'")
        ask(page, "Hello?")
        error = page.locator("#messages [role=alert] .text").last.inner_text()
        assert error.startswith(status) and re.search(r"retry (in|after) \d+ s", error), error


def test_stop_ends_the_reply_and_frees_the_slot(page, tmp_path):
    service = ScriptedService(["word "] * 40, delay=0.05)
    with serving(service, tmp_path, "safety.enabled=false") as url:
        page.goto(url + "/")
        page.get_by_label("API key").fill(KEY)
        page.get_by_label("API key").press("Tab")
        page.wait_for_function("() => document.getElementById('model').value === 'scripted'")
        page.get_by_label("Max tokens").fill("32")
        page.get_by_label("Message").fill("Go on")
        page.get_by_role("button", name="Send").click()
        reply = page.locator("#messages .message.assistant").last
        page.wait_for_function("() => Number(document.querySelector('.message.assistant').dataset.chunks) >= 3")
        page.get_by_role("button", name="Stop").click()
        page.wait_for_function("() => document.querySelector('.message.assistant').dataset.state === 'stopped'")
        shown = reply.locator(".text").inner_text()
        assert shown.startswith("word word word") and len(shown) < len("word ") * 32
        deadline = time.monotonic() + 10
        while service.active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert service.active == 0 and service.closed == 1  # the server closed the stream: its slot is free
        assert page.get_by_role("button", name="Send").is_enabled()
