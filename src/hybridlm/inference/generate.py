"""Text in, text out: the glue between a loaded run, the token engine and the text streamer."""

from __future__ import annotations

from typing import Iterator

from hybridlm.errors import UserError
from hybridlm.inference.engine import generate_ids
from hybridlm.inference.sampling import SamplingParams
from hybridlm.inference.text import stream_text
from hybridlm.run import LoadedRun


def generate_text(run: LoadedRun, prompt: str, params: SamplingParams) -> Iterator[str]:
    """Stream the continuation of `prompt`. Generation starts after an eos token, the
    document boundary the model saw in training."""
    if not prompt:
        raise UserError("the prompt is empty; pass some text with --prompt")
    tokenizer = run.tokenizer
    prompt_ids = [tokenizer.eos_id] + tokenizer.encode(prompt)
    ids = generate_ids(run.model, prompt_ids, params, eos_id=tokenizer.eos_id)
    return stream_text(tokenizer, ids, params.stop)
