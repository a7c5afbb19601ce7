"""ReCoRD (SuperGLUE's release, superglue/ReCoRD/val.jsonl under --data-dir; not in shared/data, so
users supply it) as lm-evaluation-harness's `record` task (version 2.0) scores it.

One document per query, as Hugging Face's `super_glue` builds them: the passage, the query with
its "@placeholder", the passage's entity mentions (sorted, duplicates dropped) and the answers.
The prompt is the passage's first part then each "@highlight" line as "  - {highlight}.\\n"; each
entity is a choice "  - {query with the entity in place}". The entity with the highest
log-likelihood is the prediction, and `em` and `f1` are the best over the gold answers under the
SQuAD normalisation (per query, then averaged), as lm-eval computes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hybridlm.errors import UserError
from hybridlm.eval.tasks.base import EvalOptions, data_file
from hybridlm.eval.tasks.metrics import argmax, summarise
from hybridlm.eval.tasks.multiple_choice import McItem, McTask, prepare_mc, read_jsonl
from hybridlm.eval.tasks.squad import exact, f1

if TYPE_CHECKING:
    from hybridlm.eval.scoring import Scorer

VAL, TRAIN = "superglue/ReCoRD/val.jsonl", "superglue/ReCoRD/train.jsonl"
HIGHLIGHT = "\n@highlight\n"
PLACEHOLDER = "@placeholder"


@dataclass(frozen=True)
class Query:
    item: McItem
    """The prompt and one choice per entity; its gold (for shots) is the first answer."""
    entities: tuple[str, ...]
    answers: tuple[str, ...]


def passage_prompt(passage: str) -> str:
    first, *highlights = passage.strip().split(HIGHLIGHT)
    return first + "\n\n" + "".join(f"  - {highlight}.\n" for highlight in highlights)


def read_record(path: Path) -> list[Query]:
    """Each passage's queries: {"passage": {"text", "entities": [{"start", "end"}]}, "qas": [{"query",
    "answers": [{"text"}]}]} (entity spans' ends are inclusive)."""
    queries = []
    for number, record in enumerate(read_jsonl(path), start=1):
        try:
            text = record["passage"]["text"]
            entities = tuple(sorted({text[e["start"] : e["end"] + 1] for e in record["passage"]["entities"]}))
            for qa in record["qas"]:
                answers = tuple(sorted({a["text"] for a in qa["answers"]}))
                choices = tuple(f"  - {qa['query']}".replace(PLACEHOLDER, entity) for entity in entities)
                gold = entities.index(answers[0]) if answers and answers[0] in entities else -1
                if gold < 0 or len(entities) < 2:
                    raise ValueError("a query needs two or more entities, its first answer among them")
                queries.append(Query(McItem(passage_prompt(text), choices, gold), entities, answers))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: passage {number} is not a ReCoRD record ({type(exc).__name__}: {exc}); give "
                            "SuperGLUE's ReCoRD val.jsonl") from None
    return queries


@dataclass
class RecordTask:
    queries: list[Query]
    mc: McTask

    def score(self, scorer: Scorer) -> dict:
        predictions = [query.entities[argmax(lls)] for query, lls in zip(self.queries, self.mc.choice_loglikelihoods(scorer))]
        metrics, stderr = summarise({
            "em": [max(exact(p, gold) for gold in q.answers) for p, q in zip(predictions, self.queries)],
            "f1": [max(f1(p, gold) for gold in q.answers) for p, q in zip(predictions, self.queries)],
        })
        return {"metrics": metrics, "n": len(predictions), "stderr": stderr}


def prepare(options: EvalOptions) -> RecordTask:
    queries = read_record(data_file(options, VAL))
    train = Path(options.data_dir) / TRAIN
    pool = [q.item for q in read_record(train)] if options.shots and train.is_file() else None
    mc = prepare_mc("record", [q.item for q in queries], pool, options, metric_names=())
    return RecordTask(queries[: len(mc.items)], mc)
