"""ReCoRD: the reader on a small file in SuperGLUE's JSONL format (made up here: ReCoRD is not in
shared/data and must be supplied), lm-eval's prompt and choices, and the task end to end on the
tiny run, its EM / F1 recomputed from the model's own log-likelihoods. (lm-eval's own `record`
cannot run here for parity: its scorer imports transformers.data.metrics, gone from transformers 5.)"""

from __future__ import annotations

import json

import pytest

from hybridlm.errors import UserError
from hybridlm.eval.scoring import Scorer
from hybridlm.eval.tasks import record
from hybridlm.eval.tasks.base import EvalOptions
from hybridlm.eval.tasks.squad import f1

TEXT = "Alice met Bob in Paris.\n@highlight\nBob likes Paris\n@highlight\nAlice flew home"


def span(word: str, nth: int = 0) -> dict:
    start = -1
    for _ in range(nth + 1):
        start = TEXT.index(word, start + 1)
    return {"start": start, "end": start + len(word) - 1}  # inclusive ends, as the release gives them


MADE_UP = [{"idx": 0, "source": "made up", "passage": {"text": TEXT, "entities": [
    span("Alice"), span("Bob"), span("Paris"), span("Bob", 1), span("Alice", 1)]}, "qas": [
    {"idx": 0, "query": "@placeholder was met in Paris.", "answers": [{"text": "Bob"}, {"text": "Bob"}]},
    {"idx": 1, "query": "@placeholder is a city.", "answers": [{"text": "Paris"}]}]}]


def write(root, records=MADE_UP):
    path = root / record.VAL
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_the_reader_builds_lm_evals_documents(tmp_path):
    queries = record.read_record(write(tmp_path))
    assert len(queries) == 2 and queries[0].entities == ("Alice", "Bob", "Paris")  # sorted, duplicates dropped
    assert queries[0].answers == ("Bob",) and queries[0].item.gold == 1
    assert queries[0].item.query == "Alice met Bob in Paris.\n\n  - Bob likes Paris.\n  - Alice flew home.\n"
    assert queries[1].item.choices == ("  - Alice is a city.", "  - Bob is a city.", "  - Paris is a city.")


def test_a_record_without_its_answer_among_the_entities_is_refused(tmp_path):
    bad = [{**MADE_UP[0], "qas": [{"idx": 0, "query": "@placeholder", "answers": [{"text": "Carol"}]}]}]
    with pytest.raises(UserError, match="passage 1 is not a ReCoRD record"):
        record.read_record(write(tmp_path, bad))


def test_record_end_to_end_scores_follow_the_likeliest_entity(tiny_run, tmp_path):
    write(tmp_path)
    task = record.prepare(EvalOptions(data_dir=tmp_path))
    scorer = Scorer.from_path(tiny_run, batch_size=4, dtype="fp32")
    result = task.score(scorer)
    expected_em, expected_f1 = [], []
    for query in task.queries:
        lls = [ll for ll, _ in scorer.loglikelihood([(query.item.query, " " + c) for c in query.item.choices])]
        predicted = query.entities[lls.index(max(lls))]
        expected_em.append(float(predicted in query.answers))
        expected_f1.append(max(f1(predicted, gold) for gold in query.answers))
    assert result["n"] == 2
    assert result["metrics"]["em"] == pytest.approx(sum(expected_em) / 2)
    assert result["metrics"]["f1"] == pytest.approx(sum(expected_f1) / 2)
