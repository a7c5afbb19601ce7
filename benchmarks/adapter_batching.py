"""Serving LoRA adapters on one base: decode throughput of a full batch, base only vs one adapter vs
two adapters mixed (the scheduler runs one decode pass per adapter present in a batch).

Trains two small LoRA runs (r = 8 on attn.qkv + attn.proj, and on ffn.up + ffn.down; 20 sft steps on
stdlib-docs:qa) on --base, then through the Service (the server's scheduler, no HTTP) sends --batch
requests at once, --tokens greedy tokens each (the end markers' logits biased away, so every reply
runs to the end), three ways, each --repeats times after one warm-up (the median is kept):
- all to the base model;
- all to adapter A (one decode pass per step, through peft's LoRA layers);
- half to A and half to B (two decode passes per step).
Reports generated tokens / wall seconds of the whole batch, and the ratio to the base model.

Usage: .venv/bin/python benchmarks/adapter_batching.py --base RUN --tokenizer TOK --out DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from hybridlm.serve.service import GenerationRequest, Service
from hybridlm.train.config import run_config_from_dict
from hybridlm.train.trainer import train


def _lora(base: Path, tokenizer: Path, out: Path, targets: list[str]) -> Path:
    if not (out / "adapter_model.safetensors").exists():
        train(run_config_from_dict({
            "model": json.loads((base / "config.json").read_text())["model"],
            "train": {"out": str(out), "objective": "sft", "steps": 20, "init_from": str(base)},
            "data": {"mixture": {"stdlib-docs:qa": 1.0}, "tokenizer": str(tokenizer), "batch_size": 8, "seq_len": 128},
            "optim": {"lr": 1e-3}, "schedule": {"warmup_steps": 2}, "eval": {"every": 0},
            "checkpoint": {"every": 20}, "lora": {"r": 8, "alpha": 16.0, "targets": targets}}), progress=False)
    return out


async def _batch(service: Service, models: list[str | None], tokens: int) -> tuple[int, float]:
    prompt = service.encode_chat([{"role": "user", "content": "What does `os.path.join(a, *p)` do?"}])
    never_stop = {service.tokenizer.eos_id: -100.0, service.tokenizer.special_ids["end"]: -100.0}  # every reply runs to `tokens`

    async def one(adapter: str | None) -> int:
        produced = 0
        async for chunk in service.stream(GenerationRequest(prompt_ids=prompt, max_tokens=tokens, temperature=0.0,
                                                            logit_bias=never_stop, adapter=adapter)):
            produced += len(chunk.token_ids)
        return produced

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(m) for m in models))
    return sum(counts), time.perf_counter() - started



async def _measure(args, a: Path, b: Path) -> dict:
    service = Service(args.base, max_batch=args.batch, adapters={"a": str(a), "b": str(b)}, prefix_cache_mb=0)
    await service.start()
    half = args.batch // 2
    cases = {"base only": [None] * args.batch, "one adapter": ["a"] * args.batch,
             "two adapters mixed": ["a"] * half + ["b"] * (args.batch - half)}
    found = {}
    for name, models in cases.items():
        await _batch(service, models, args.tokens)  # warm-up
        runs = sorted([await _batch(service, models, args.tokens) for _ in range(args.repeats)], key=lambda r: r[1])
        tokens, seconds = runs[len(runs) // 2]
        found[name] = {"tokens": tokens, "median_seconds": seconds, "tok_s": tokens / seconds}
    await service.close()
    base = found["base only"]["tok_s"]
    return {name: {**v, "vs_base": v["tok_s"] / base} for name, v in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    a = _lora(args.base, args.tokenizer, args.out / "lora_attn", ["attn.qkv", "attn.proj"])
    b = _lora(args.base, args.tokenizer, args.out / "lora_ffn", ["ffn.up", "ffn.down"])
    result = asyncio.run(_measure(args, a, b))
    (args.out / "adapter_batching.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
