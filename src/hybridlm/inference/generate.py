"""Text in, text out: the glue between a loaded run, the token engine and the text streamer."""

from __future__ import annotations

from typing import Iterator

from hybridlm.errors import UserError
from hybridlm.inference.decode import generate_ids
from hybridlm.inference.sampling import SamplingParams
from hybridlm.inference.text import stream_text
from hybridlm.run import LoadedRun
from hybridlm.tokenizer import TextTokenizer


def completion_prompt_ids(tokenizer: TextTokenizer, text: str) -> list[int]:
    """A plain-text prompt starts after eos: training documents are separated by eos
    (data/prepare.py), so that is where the model saw text begin."""
    return [tokenizer.eos_id, *tokenizer.encode(text)]


def generate_text(run: LoadedRun, prompt: str, params: SamplingParams) -> Iterator[str]:
    """Stream the continuation of `prompt` (see completion_prompt_ids for the eos in front)."""
    if not prompt:
        raise UserError("the prompt is empty; pass some text with --prompt")
    tokenizer = run.tokenizer
    prompt_ids = completion_prompt_ids(tokenizer, prompt)
    ids = generate_ids(run.model, prompt_ids, params, eos_id=tokenizer.eos_id)
    return stream_text(tokenizer, ids, params.stop)
