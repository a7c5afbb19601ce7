"""RACE: the reader on small files in the official per-article format (made up here: RACE is not
in shared/data and must be supplied), its prompts (earlier questions answered, cloze blanks
filled), and lm-evaluation-harness's own `race` task definition, pointed at the same articles in
its loader's layout, giving the acc `hybridlm eval run` gives."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from lm_eval_local import lm_eval_cli, write_local_task

from hybridlm.errors import UserError
from hybridlm.eval.tasks import race
from hybridlm.eval.tasks.base import EvalOptions

ANIMALS = ("cat", "dog", "bird", "fish", "horse", "mouse")


def made_up_article(k: int) -> dict:
    """Article k: two or three questions, the second a cloze one (made-up data)."""
    animal, other = ANIMALS[k % 6], ANIMALS[(k + 1) % 6]
    questions = [f"What does the {animal} like?", f"The {animal} sleeps in the  _  .", f"Who visits the {animal}?"]
    options = [["milk", "rain", "stones", "paper"], ["box", "sky", "river", "tree"], [other, "nobody", "a ghost", "a car"]]
    answers = ["A", "B", "C", "D"][k % 4], "A", "A"
    n = 2 + k % 2
    return {"article": f"The {animal} is small. It likes milk and sleeps in a box. The {other} visits it.",
            "questions": questions[:n], "options": options[:n], "answers": list(answers[:n]), "id": f"high{k}.txt"}


def write_release(root, count: int = 12) -> list[dict]:
    folder = root / race.FOLDER
    folder.mkdir(parents=True)
    articles = [made_up_article(k) for k in range(count)]
    for k, article in enumerate(articles):
        (folder / f"{k}.txt").write_text(json.dumps(article))
    return articles


def test_the_reader_builds_lm_evals_prompt(tmp_path):
    write_release(tmp_path)
    items = race.read_race(tmp_path / race.FOLDER)
    assert len(items) == 12  # files read in numeric order: 0, 1, ..., 10, 11
    two, three = items[0], items[1]
    assert two.query == ("Article: The cat is small. It likes milk and sleeps in a box. The dog visits it.\n\n"
                         "Question: What does the cat like?\nAnswer: milk\nThe cat sleeps in the  _  .")
    assert three.query.endswith("Answer: rain\nThe dog sleeps in the box\nWho visits the dog?")
    assert three.choices == ("bird", "nobody", "a ghost", "a car") and three.gold == 0


def test_bad_and_missing_files_are_refused(tmp_path):
    (tmp_path / race.FOLDER).mkdir(parents=True)
    (tmp_path / race.FOLDER / "1.txt").write_text('{"article": "x", "questions": ["q"], "options": [["a"]], "answers": ["A"]}')
    with pytest.raises(UserError, match="is not a RACE article file"):
        race.read_race(tmp_path / race.FOLDER)
    with pytest.raises(UserError, match="unpack the official RACE.tar.gz"):
        race.prepare(EvalOptions(data_dir=tmp_path / "elsewhere"))


def test_lm_evals_own_race_gives_the_same_acc(tiny_run, tmp_path):
    articles = write_release(tmp_path / "data")
    rows = [{"article": a["article"], "example_id": a["id"],  # EleutherAI/race's layout: problems as a Python literal
             "problems": str([{"question": q, "options": o, "answer": ans}
                              for q, o, ans in zip(a["questions"], a["options"], a["answers"])])} for a in articles]
    data, tasks = tmp_path / "race.jsonl", tmp_path / "tasks"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_local_task(tasks, "race/race.yaml", "race_local", {"test": data})
    theirs = lm_eval_cli(tiny_run, tasks, ["race_local"], tmp_path / "out", tmp_path, "--num_fewshot", "1")["race_local"]
    result = subprocess.run([sys.executable, "-m", "hybridlm", "eval", "run", "--model", str(tiny_run), "--tasks", "race",
                             "--shots", "1", "--dtype", "fp32", "--data-dir", str(tmp_path / "data"), "--json"],
                            capture_output=True, text=True, timeout=600, check=True)
    ours = json.loads(result.stdout)["tasks"]["race"]
    assert ours["n"] == 12 and ours["metrics"]["acc"] == pytest.approx(theirs["acc,none"], abs=1e-12)
