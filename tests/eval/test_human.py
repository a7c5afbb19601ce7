"""Human evaluation as a person uses it: `eval human build` from two real runs, the rating page
as a subprocess on 127.0.0.1 driven over HTTP, ratings in the SQLite study, and `eval human
report`'s win rates and mean ratings checked by hand against the sides the cards hid."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager

import pytest
from conftest import free_port
from conftest import one_line_error
from e2e.test_cli import hybridlm

from hybridlm.errors import UserError
from hybridlm.eval.human.build import prompts_of
from hybridlm.eval.human.report import percentile_interval
from hybridlm.eval.human.store import Study
from hybridlm.eval.scoring import Scorer
from hybridlm.eval.tasks.generation import chat_replies

PROMPTS = [{"instruction": f"Write paragraph {k}.", "output": f"Paragraph {k}: x{k} is {k}."} for k in range(1, 6)]



@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("human") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def build(tiny_run, chatty_run, prompts_file, out, mode):
    result = hybridlm("eval", "human", "build", "--model-a", str(tiny_run), "--model-b", str(chatty_run), "--prompts",
                      str(prompts_file), "--out", str(out), "--mode", mode, "--limit", "4", "--max-new-tokens", "6",
                      "--dtype", "fp32", "--json")
    assert result.returncode == 0, result.stderr
    return Study(out)


@contextmanager
def page(study_path):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "hybridlm", "eval", "human", "serve", str(study_path), "--port",
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(base + "/", timeout=5).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.communicate()[1][-2000:]
                time.sleep(0.2)
        yield base
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=30)


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


def post(base: str, fields: dict) -> tuple[int, str]:
    """(status, final page) of a form post; the 303 to the next card is followed."""
    data = urllib.parse.urlencode(fields).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(base + "/rate", data=data), timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_pairwise_study_is_blind_and_its_report_follows_the_hidden_sides(tiny_run, chatty_run, prompts_file, tmp_path):
    study = build(tiny_run, chatty_run, prompts_file, tmp_path / "study.db", "pairwise")
    cards = study.cards()
    conversations = prompts_of(str(prompts_file), 4)
    replies = {side: chat_replies(Scorer.from_path(run, dtype="fp32"), conversations, 6)
               for side, run in (("a", tiny_run), ("b", chatty_run))}
    assert len(cards) == 4 and replies["a"] != replies["b"]
    for k, card in enumerate(cards):  # each card holds both runs' replies to its prompt, in the order it records
        other = "b" if card.first_side == "a" else "a"
        assert (card.first_reply, card.second_reply) == (replies[card.first_side][k], replies[other][k])
        assert card.prompt == [{"role": "user", "content": f"Write paragraph {k + 1}."}]
    assert {c.first_side for c in cards} == {"a", "b"}  # the seeded shuffle puts each run first somewhere

    verdicts = {"ann": ["first", "second", "tie", "first"], "bob": ["second", "second", "first", "tie"]}
    with page(study.path) as base:
        assert "Your name" in get(base + "/")
        screen = get(base + "/?rater=ann")
        assert "Reply 1" in screen and "Reply 2" in screen and str(tiny_run) not in screen and "chatty" not in screen
        status, body = post(base, {"card_id": cards[0].id, "rater": "ann", "fluency": "first"})
        assert status == 400 and "rate every criterion" in body and "coherence" in body
        status, body = post(base, {"card_id": cards[0].id, "rater": "ann", "fluency": "first", "coherence": "best",
                                   "helpfulness": "tie"})
        assert status == 400 and "coherence must be one of first, second, tie" in body
        for rater, choices in verdicts.items():
            for card, choice in zip(cards, choices):
                status, body = post(base, {"card_id": card.id, "rater": rater, **dict.fromkeys(
                    ("fluency", "coherence", "helpfulness"), choice)})
                assert status == 200
            assert "You have rated all 4 cards" in body

    expected = []
    for choices in verdicts.values():
        for card, choice in zip(cards, choices):
            winner = card.first_side if choice == "first" else ("b" if card.first_side == "a" else "a")
            expected.append(0.5 if choice == "tie" else float(winner == "a"))
    result = hybridlm("eval", "human", "report", str(study.path), "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["raters"] == ["ann", "bob"] and document["a"] == str(tiny_run)
    for criterion in ("fluency", "coherence", "helpfulness"):
        summary = document["criteria"][criterion]
        assert summary["ratings"] == 8 and summary["ties"] == 2
        assert summary["a_win_rate"] == pytest.approx(sum(expected) / 8)
        assert summary["a_win_rate_ci95"] == pytest.approx(list(percentile_interval(expected)))
        low, high = summary["a_win_rate_ci95"]
        assert 0 <= low <= summary["a_win_rate"] <= high <= 1 and low < high
    assert "A win rate" in hybridlm("eval", "human", "report", str(study.path)).stdout


def test_rating_study_means_per_run(tiny_run, chatty_run, prompts_file, tmp_path):
    study = build(tiny_run, chatty_run, prompts_file, tmp_path / "rating.db", "rating")
    cards = study.cards()
    assert len(cards) == 8 and all(c.second_reply is None for c in cards)
    assert sorted(c.first_side for c in cards) == ["a"] * 4 + ["b"] * 4
    scores = {card.id: 1 + (card.id % 5) for card in cards}
    with page(study.path) as base:
        assert "from 1 (poor) to 5" in get(base + "/?rater=cy")
        status, body = post(base, {"card_id": cards[0].id, "rater": "cy", "fluency": "6", "coherence": "1",
                                   "helpfulness": "1"})
        assert status == 400 and "fluency must be one of 1, 2, 3, 4, 5" in body
        for card in cards:
            assert post(base, {"card_id": card.id, "rater": "cy", **dict.fromkeys(
                ("fluency", "coherence", "helpfulness"), str(scores[card.id]))})[0] == 200
    document = json.loads(hybridlm("eval", "human", "report", str(study.path), "--json").stdout)
    for side in ("a", "b"):
        mine = [scores[c.id] for c in cards if c.first_side == side]
        summary = document["criteria"]["coherence"][side]
        assert summary["n"] == 4 and summary["mean"] == pytest.approx(sum(mine) / 4)
        assert summary["ci95"][0] <= summary["mean"] <= summary["ci95"][1]


def test_bad_input_is_refused_in_one_line(tiny_run, prompts_file, tmp_path, cli):
    (tmp_path / "taken.db").write_text("")
    (tmp_path / "notes.txt").write_text("not a study")
    cases = [
        (["build", "--model-a", str(tiny_run), "--model-b", str(tiny_run), "--prompts", str(prompts_file), "--out",
          str(tmp_path / "taken.db")], "exists; give a new --out"),
        (["build", "--model-a", str(tiny_run), "--model-b", str(tiny_run), "--prompts", str(tmp_path / "nope.jsonl"),
          "--out", str(tmp_path / "new.db")], "instruction data not found"),
        (["build", "--model-a", str(tiny_run), "--model-b", str(tiny_run), "--prompts", str(prompts_file), "--out",
          str(tmp_path / "new.db"), "--limit", "0"], "--limit must be > 0"),
        (["report", str(tmp_path / "missing.db")], "study not found"),
        (["report", str(tmp_path / "notes.txt")], "is not a human-evaluation study"),
        (["serve", str(tmp_path / "missing.db")], "study not found"),
    ]
    for args, words in cases:
        one_line_error(cli("eval", "human", *args), words)
    assert not (tmp_path / "new.db").exists()
    assistant_only = tmp_path / "assistant.jsonl"
    assistant_only.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hello"}]}) + "\n")
    with pytest.raises(UserError, match="no conversation with a user turn"):
        prompts_of(str(assistant_only), None)
