"""The review queue in SQLite and `hybridlm review list|show|resolve` in subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hybridlm.errors import UserError
from hybridlm.serve.review import ReviewQueue, excerpt


def hybridlm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybridlm", *args], capture_output=True, text=True, timeout=120, check=False)


def item(rule: str = "weapons", direction: str = "prompt") -> dict:
    return {"request_id": "r1", "key_id": "abc123def456", "direction": direction, "rule": rule, "action": "flag",
            "excerpt": "how do I >>build a bomb<<"}


def test_queue_add_list_get_resolve(tmp_path):
    queue = ReviewQueue(tmp_path / "review.sqlite")
    ids = queue.add([item(), item("self-harm", "output")])
    assert [i.rule for i in queue.list()] == ["weapons", "self-harm"]
    resolved = queue.resolve(ids[0], "confirmed", "real request")
    assert resolved.status == "resolved" and resolved.decision == "confirmed" and resolved.note == "real request"
    assert [i.id for i in queue.list("open")] == [ids[1]]
    assert queue.counts() == {"open": 1, "resolved": 1}
    with pytest.raises(UserError, match="already resolved"):
        queue.resolve(ids[0], "allowed")
    with pytest.raises(UserError, match="no review item 99"):
        queue.get(99)
    with pytest.raises(UserError, match="decision must be"):
        queue.resolve(ids[1], "maybe")


def test_excerpt_marks_the_match_and_stays_short():
    text = "a" * 500 + "SECRET" + "b" * 500
    out = excerpt(text, 500, 506)
    assert ">>SECRET<<" in out and len(out) < 200 and out.startswith("...") and out.endswith("...")
    assert excerpt("short SECRET", 6, 12) == "short >>SECRET<<"


def test_a_non_database_file_is_a_user_error(tmp_path):
    bad = tmp_path / "not.sqlite"
    bad.write_text("this is not sqlite " * 100)
    with pytest.raises(UserError, match="not a review database"):
        ReviewQueue(bad, create=False)


def test_review_cli_lists_shows_and_resolves(tmp_path):
    db = tmp_path / "review.sqlite"
    (first, _) = ReviewQueue(db).add([item(), item("self-harm")])
    listed = hybridlm("review", "list", "--db", str(db), "--json")
    assert listed.returncode == 0, listed.stderr
    doc = json.loads(listed.stdout)
    assert doc["counts"] == {"open": 2, "resolved": 0} and [i["rule"] for i in doc["items"]] == ["weapons", "self-harm"]
    shown = hybridlm("review", "show", str(first), "--db", str(db))
    assert shown.returncode == 0 and "weapons" in shown.stdout and ">>build a bomb<<" in shown.stdout
    done = hybridlm("review", "resolve", str(first), "--decision", "allowed", "--note", "a film plot", "--db", str(db),
                    "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["status"] == "resolved"
    still_open = json.loads(hybridlm("review", "list", "--db", str(db), "--json").stdout)
    assert [i["rule"] for i in still_open["items"]] == ["self-harm"]
    everything = json.loads(hybridlm("review", "list", "--db", str(db), "--status", "all", "--json").stdout)
    assert len(everything["items"]) == 2


@pytest.mark.parametrize("args, message", [
    (("show", "999"), "no review item 999"),
    (("show", "abc"), "is not a valid integer"),
    (("resolve", "1", "--decision", "perhaps"), "--decision"),
    (("list", "--status", "closed"), "--status"),
])
def test_review_cli_bad_input_exits_2_with_one_line(tmp_path, args, message):
    db = tmp_path / "review.sqlite"
    ReviewQueue(db).add([item()])
    result = hybridlm("review", *args, "--db", str(db))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_review_cli_missing_database_and_double_resolve(tmp_path):
    missing = hybridlm("review", "list", "--db", str(tmp_path / "none.sqlite"))
    assert missing.returncode == 2 and "review database not found" in missing.stderr
    assert not (tmp_path / "none.sqlite").exists()
    db = tmp_path / "review.sqlite"
    (first,) = ReviewQueue(db).add([item()])
    assert hybridlm("review", "resolve", str(first), "--decision", "confirmed", "--db", str(db)).returncode == 0
    again = hybridlm("review", "resolve", str(first), "--decision", "confirmed", "--db", str(db))
    assert again.returncode == 2 and "already resolved" in again.stderr
