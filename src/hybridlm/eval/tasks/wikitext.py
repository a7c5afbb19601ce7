"""WikiText-2 perplexity and bits per byte over the whole test split (the word-tokenized
`wiki.test.tokens`, as shared/data has it), scored by eval/perplexity.py's sliding window: every
token once, with up to a context of history, windows advancing by --stride (default: the
context). `n` is the number of tokens scored; shots do not apply to a perplexity task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hybridlm.errors import UserError
from hybridlm.eval.perplexity import evaluate_text
from hybridlm.eval.tasks.base import EvalOptions, data_file

if TYPE_CHECKING:
    from hybridlm.eval.scoring import Scorer

FILE = "wikitext-2/test.txt"


@dataclass
class WikitextTask:
    text: str
    stride: int | None

    def score(self, scorer: Scorer) -> dict:
        ids = scorer.tokenizer.encode(self.text)
        result = evaluate_text(scorer.model, ids, len(self.text.encode("utf-8")), scorer.context,
                               self.stride or scorer.context, scorer.dtype)
        return {"metrics": {k: result[k] for k in ("ppl", "bpb", "loss")}, "n": result["tokens"], "stderr": {}}


def prepare(options: EvalOptions) -> WikitextTask:
    path = data_file(options, FILE)
    text = path.read_text(encoding="utf-8")
    if options.limit is not None:
        text = "".join(text.splitlines(keepends=True)[: options.limit])
    if not text.strip():
        raise UserError(f"{path}: nothing to score in the first {options.limit} lines; raise --limit")
    return WikitextTask(text, options.stride)
