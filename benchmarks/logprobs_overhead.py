"""What log-probabilities cost the server: one greedy request through the Service (the layer under
the HTTP routes), with and without `top_logprobs`, same prompt and length (eos and <|end|> biased
away so every run decodes --tokens tokens), median of --repeats.

Usage: .venv/bin/python benchmarks/logprobs_overhead.py RUN_DIR [--tokens 200] [--top 5] [--repeats 3]
One JSON document on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
from pathlib import Path

from service_timing import median_run

from hybridlm.serve.service import GenerationRequest, Service


async def _measure(args: argparse.Namespace) -> dict:
    service = Service(args.run, max_tokens_cap=args.tokens, dtype="auto")
    await service.start()
    try:
        ids = service.encode_prompt("Return the")
        results = {}
        for name, top in (("without", None), ("with", args.top), ("without_again", None)):
            never_stop = {service.tokenizer.eos_id: -100.0, service.tokenizer.special_ids["end"]: -100.0}
            req = GenerationRequest(ids, args.tokens, temperature=0, top_logprobs=top, logit_bias=never_stop)
            results[name] = await median_run(service, req, args.repeats)
            del results[name]["ids"]
        return results
    finally:
        await service.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = asyncio.run(_measure(args))
    per_token = {k: v["seconds"] / v["tokens"] for k, v in results.items()}
    base = (per_token["without"] + per_token["without_again"]) / 2
    print(json.dumps({"cpu": platform.processor() or platform.machine(), "top_logprobs": args.top, **results,
                      "overhead_per_token_us": (per_token["with"] - base) * 1e6,
                      "overhead_ratio": per_token["with"] / base}, indent=2))


if __name__ == "__main__":
    main()
