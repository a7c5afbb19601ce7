"""What a grammar constraint costs decoding: one greedy request through the Service (the layer
under the HTTP routes), free and under a JSON schema ({"notes": <string>}), eos and <|end|> biased
away from the free reply and '"' from the string so both run to --tokens; tokens/s of each
(median of --repeats), and the matcher's
own time per token (mask + accept, replayed over the constrained reply's tokens), which is what
the constraint adds to each decode step.

Usage: .venv/bin/python benchmarks/grammar_overhead.py RUN_DIR [--tokens 200] [--repeats 5]
One JSON document on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path

from service_timing import median_run

from hybridlm.serve.service import GenerationRequest, Service

SCHEMA = {"type": "object", "properties": {"notes": {"type": "string"}}, "required": ["notes"],
          "additionalProperties": False}


def _matcher_seconds(grammar, tokens: list[int], stop_ids: set[int]) -> float:
    """Mean seconds per token of mask + accept along `tokens` (a reply the grammar produced)."""
    matcher, start = grammar.matcher(), time.perf_counter()
    for token in tokens:
        matcher.allowed()
        if token not in stop_ids:
            matcher.accept(token)
    return (time.perf_counter() - start) / len(tokens)


async def _measure(args: argparse.Namespace) -> dict:
    service = Service(args.run, max_tokens_cap=args.tokens, dtype="auto", prefix_cache_mb=0)
    await service.start()
    try:
        ids = service.encode_chat([{"role": "user", "content": "Describe the module in a few words."}])
        stop_ids = {service.tokenizer.eos_id, service.tokenizer.special_ids["end"]}
        grammar = service.grammars().json_schema(SCHEMA)
        # Tokens holding '"' biased away: the grammar still forces the ones the structure needs,
        # and the string then runs to --tokens, as long as the free reply.
        quotes = {t: -100.0 for t in range(service.tokenizer.vocab_size)
                  if t not in stop_ids and b'"' in service.tokenizer.token_bytes(t)}
        results = {}
        for name, constraint in (("free", None), ("json_schema", grammar), ("free_again", None)):
            bias = quotes | {token: -100.0 for token in stop_ids}  # the same for both: only the grammar differs
            req = GenerationRequest(ids, args.tokens, temperature=0, logit_bias=bias, grammar=constraint)
            results[name] = await median_run(service, req, args.repeats)
            tokens = results[name].pop("ids")
            if constraint is not None:
                results[name]["reply"] = service.tokenizer.decode(tokens)
                results[name]["matcher_us_per_token"] = statistics.median(
                    _matcher_seconds(grammar, tokens, stop_ids) for _ in range(5)) * 1e6
        return results
    finally:
        await service.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = asyncio.run(_measure(args))
    free = (results["free"]["tokens_per_s"] + results["free_again"]["tokens_per_s"]) / 2
    print(json.dumps({"cpu": platform.processor() or platform.machine(), **results,
                      "constrained_over_free_tokens_per_s": results["json_schema"]["tokens_per_s"] / free},
                     indent=2))


if __name__ == "__main__":
    main()
