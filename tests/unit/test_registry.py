"""The registry on a real MLflow SQLite store in a temporary directory, with real runs: register
two versions, set an alias, promote through a passing and a failing gate (checks evaluated by the
eval code: bits per byte, task accuracy, the safety filter's pass rate), roll back, and read the
whole history back; a run changed after registration is refused; model cards parse with
huggingface_hub's own model-card reader; bad input is one line, exit 2, and changes nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import one_line_error
from huggingface_hub import ModelCard

from hybridlm.errors import UserError
from hybridlm.fileio import atomic_write_json, read_json
from hybridlm.registry.card import card_metadata, render_card
from hybridlm.registry.promotion import promote, rollback
from hybridlm.registry.store import Registry, verify


@pytest.fixture
def world(tiny_run, tmp_path):
    """A registry, two finished runs (the second a copy of the first), items, prompts and gates."""
    second = tmp_path / "second"
    shutil.copytree(tiny_run, second)
    (tmp_path / "valid.txt").write_text("".join(f"Paragraph {i}: the value of x{i} is {i * 7 % 13}.\n\n"
                                                for i in range(800, 830)))
    (tmp_path / "items.jsonl").write_text("".join(json.dumps({"context": f"Paragraph {i}: the value of x{i} is",
                                                              "choices": [" 1.", " banana"], "label": 0}) + "\n"
                                                  for i in range(8)))
    (tmp_path / "prompts.txt").write_text("Paragraph 3:\nParagraph 9: the value\n")
    (tmp_path / "pass.toml").write_text(
        '[[check]]\nkind = "bpb"\ndata = "valid.txt"\nmax_regression_pct = 5.0\n'
        '[[check]]\nkind = "accuracy"\ntask = "mc:items.jsonl"\nmin = 0.5\n'
        '[[check]]\nkind = "safety_pass_rate"\nprompts = "prompts.txt"\nmin = 1.0\nmax_new_tokens = 8\n'
        '[[check]]\nkind = "hashes"\n')
    (tmp_path / "fail.toml").write_text('[[check]]\nkind = "accuracy"\ntask = "mc:items.jsonl"\nmin = 1.01\n')
    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    return Registry(uri), tiny_run, second, tmp_path, uri


def register(store: Registry, run, name: str = "tiny"):
    return store.register(run, name, render_card(run, name))


def test_versions_aliases_gates_rollback_and_the_whole_history(world):
    store, first, second, tmp, _ = world
    v1, v2 = register(store, first), register(store, second)
    assert (v1.version, v2.version) == (1, 2) and v2.run_dir == second.resolve()
    lineage = read_json(first / "lineage.json", "lineage")
    assert v1.tags["hybridlm.tokenizer_sha256"] == lineage["tokenizer_sha256"]
    assert v1.tags["hybridlm.code_version"] == lineage["code_version"] and "hybridlm.manifest_sha256" in v1.tags
    store.move("tiny", "production", 1, "set", who="tester")
    move, outcomes = promote(store, "tiny", 2, "production", tmp / "pass.toml")
    assert move.from_version == 1 and move.to_version == 2 and store.alias_version("tiny", "production") == 2
    assert [o["check"] for o in outcomes] == ["hashes", "bpb", "accuracy", "safety_pass_rate"]
    assert all(o["passed"] for o in outcomes) and outcomes[2]["value"] == 1.0  # " 1." beats " banana"
    assert outcomes[1]["value"] == pytest.approx(outcomes[1]["value"]) and "vs tiny/1" in outcomes[1]["detail"]
    with pytest.raises(UserError, match=r"refused: acc 1\.0000 on items.jsonl \(below 1\.01\)"):
        promote(store, "tiny", 1, "production", tmp / "fail.toml")
    assert store.alias_version("tiny", "production") == 2  # a failing gate moves nothing
    assert rollback(store, "tiny", "production", reason="bad replies").to_version == 1
    history = store.history("tiny", "production")
    assert [(m.action, m.from_version, m.to_version) for m in history] == [
        ("set", None, 1), ("promote", 1, 2), ("promote-refused", 2, 1), ("rollback", 2, 1)]
    assert history[0].who == "tester" and history[1].gate == outcomes and history[3].reason == "bad replies"
    assert history[2].gate[-1]["passed"] is False
    with pytest.raises(UserError, match="no earlier version to roll back to"):
        rollback(store, "tiny", "production")
    assert store.resolve("tiny@production").version == 1 and store.resolve("tiny").version == 2


def test_a_run_changed_after_registration_is_refused(world):
    store, first, second, tmp, _ = world
    register(store, first)
    version = register(store, second)
    store.move("tiny", "production", 1, "set")
    config = read_json(second / "config.json", "run config")
    config["train"]["seed"] += 1
    atomic_write_json(second / "config.json", config)
    with pytest.raises(UserError, match="does not match its recorded sha256"):
        verify(version)
    # Rewriting manifest.json to match does not help: the registry pinned the manifest itself.
    manifest = read_json(second / "manifest.json", "manifest")
    manifest["config.json"] = __import__("hybridlm.fileio").fileio.sha256_file(second / "config.json")
    atomic_write_json(second / "manifest.json", manifest)
    with pytest.raises(UserError, match="changed after registration"):
        verify(version)
    with pytest.raises(UserError, match="changed after registration"):
        promote(store, "tiny", 2, "production", None)
    assert store.alias_version("tiny", "production") == 1


def test_model_cards_carry_hub_metadata_and_a_readable_body(world, tiny_run):
    _, _, _, tmp, _ = world
    evals = [{"tasks": {"mc:items": {"metrics": {"acc": 0.75, "acc_norm": 0.5}}}}]
    text = render_card(tiny_run, "tiny", evals=evals, license="apache-2.0", version="3")
    card = ModelCard(text)  # huggingface_hub parses the YAML block and the model-index
    assert card.data.license == "apache-2.0" and card.data.library_name == "hybridlm"
    results = {(r.task_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("mc:items", "acc")] == 0.75 and results[("mc:items", "acc_norm")] == 0.5
    assert card_metadata(text)["datasets"] == sorted({s["spec"] for s in read_json(tiny_run / "lineage.json",
                                                                                  "lineage")["sources"]})
    for heading in ("## Intended use", "## Training stages and data", "## Evaluation", "## Limitations"):
        assert heading in text
    assert "| run | clm | 40 |" in text and "| mc:items | acc | 0.7500 |" in text


def test_the_cli_and_its_bad_input(world, cli):
    store, first, second, tmp, uri = world

    def registry(*args: str, at: str = uri) -> tuple[int, str, str]:
        return cli("registry", *args, "--registry", at)

    code, out, err = registry("register", str(first), "--name", "tiny", "--json")
    assert code == 0, err
    assert json.loads(out)["version"] == 1
    assert registry("alias", "set", "tiny", "production", "1")[0] == 0
    shown = json.loads(registry("show", "tiny@production", "--json")[1])
    assert shown["version"] == 1 and shown["card"].startswith("---") and shown["stages"][-1]["objective"] == "clm"
    (tmp / "unknown.toml").write_text('[[check]]\nkind = "vibes"\n')
    shutil.copytree(first, tmp / "unfinished")
    (tmp / "unfinished" / "model.safetensors").unlink()  # a run killed before its end
    for args, words in [
        (("show", "nope"), "no model named 'nope'"), (("show", "tiny@staging"), "has no alias 'staging'"),
        (("show", "tiny/7"), "has no version 7"), (("register", str(tmp / "unfinished"), "--name", "tiny"),
                                                   "is not a finished run"),
        (("promote", "tiny", "1", "--to", "production", "--gate", str(tmp / "unknown.toml")), "known kinds: bpb"),
        (("alias", "set", "tiny", "v2", "1"), "not look like a version"),
        (("rollback", "tiny", "production"), "no earlier version"),
    ]:
        one_line_error(registry(*args), words)
    one_line_error(registry("list", at="http://127.0.0.1:9"), "cannot reach the registry")
    assert [(m.action, m.to_version) for m in store.history("tiny", "production")] == [("set", 1)]  # nothing changed
    assert [v.version for v in store.versions("tiny")] == [1]
    done = subprocess.run([sys.executable, "-m", "hybridlm", "registry", "show", "nope", "--registry", uri],
                          capture_output=True, text=True, timeout=300)  # and once through a real process
    one_line_error(done, "no model named 'nope'")


def test_a_move_that_keeps_the_version_does_not_trap_rollback(world):
    store, first, second, _, _ = world
    register(store, first), register(store, second)
    store.move("tiny", "production", 1, "set")
    store.move("tiny", "production", 2, "set")
    store.move("tiny", "production", 2, "set")  # promoted again: 2 -> 2
    assert rollback(store, "tiny", "production").to_version == 1
