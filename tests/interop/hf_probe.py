"""Run in another Python environment (one with torch and a given transformers release, and no
hybridlm): load exported models and report what transformers computes with them.

Usage: python hf_probe.py REQUEST.json ANSWER.json (transformers may print to stdout, so the
answer goes to a file). The request lists exports,
each with a left-padded batch of prompts and the logits hybridlm computed for it (a safetensors
file); the answer gives, per export, the largest logit difference, the tokens transformers'
greedy generate() chose with its KV cache and without it, how many tokens each cached forward
call was fed, and how AutoTokenizer encodes a text. It imports only torch, safetensors and transformers, as an export's user would.
"""

from __future__ import annotations

import json
import sys

import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


@torch.no_grad()
def probe(export: dict) -> dict:
    model = AutoModelForCausalLM.from_pretrained(export["dir"], trust_remote_code=True, local_files_only=True).eval()
    model.generation_config.eos_token_id = None  # generate exactly new_tokens tokens, as hybridlm is asked to
    reference = load_file(export["logits"])
    ids, mask = reference["input_ids"], reference["attention_mask"]
    logits = model(ids, attention_mask=mask).logits
    real = mask.bool()
    logit_error = float((logits[real] - reference["logits"][real]).abs().max())
    fed: list[int] = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: fed.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    greedy = {"max_new_tokens": export["new_tokens"], "do_sample": False, "pad_token_id": export["pad_id"]}
    try:
        cached = model.generate(ids, attention_mask=mask, **greedy)
    finally:
        hook.remove()
    uncached = model.generate(ids, attention_mask=mask, use_cache=False, **greedy)
    prompt = ids.shape[1]
    tokenizer = AutoTokenizer.from_pretrained(export["dir"], local_files_only=True)
    return {"logit_error": logit_error, "fed": fed, "cached": cached[:, prompt:].tolist(),
            "uncached": uncached[:, prompt:].tolist(), "text_ids": tokenizer(export["text"])["input_ids"]}


def main() -> None:
    request = json.loads(open(sys.argv[1], encoding="utf-8").read())
    answer = {"transformers": transformers.__version__,
              "exports": {export["name"]: probe(export) for export in request["exports"]}}
    with open(sys.argv[2], "w", encoding="utf-8") as out:
        json.dump(answer, out)


if __name__ == "__main__":
    main()
