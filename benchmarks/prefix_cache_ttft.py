"""Time to first token with and without the prefix cache: chat requests that share one system
prompt of --system tokens and differ in the user's question, through the Service (the layer under
the HTTP routes), one request at a time. With the cache, the first request stores the system
prompt's blocks and the later ones restore them; the median TTFT of the later ones is reported,
and the replies are checked to be the same tokens in both runs.

Usage: .venv/bin/python benchmarks/prefix_cache_ttft.py RUN_DIR --text FILE [--system 512] [--requests 12]
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

from hybridlm.serve.service import GenerationRequest, Service

QUESTIONS = ("What is the main point?", "Summarise it.", "Who is named first?", "Give one date.",
             "What happens next?", "Is it true?", "Name a place.", "Why?", "List two facts.", "Explain it simply.",
             "What is missing?", "Say it in one line.", "Which year?", "Who wrote it?", "Is there a number?",
             "What came before?")


def system_text(service: Service, text: str, tokens: int) -> str:
    """The first `tokens` tokens of `text`, as text."""
    ids = service.tokenizer.encode(text)
    if len(ids) < tokens:
        raise SystemExit(f"--text holds only {len(ids)} tokens; need {tokens}")
    return service.tokenizer.decode(ids[:tokens])


async def _ttft(service: Service, req: GenerationRequest) -> tuple[float, list[int]]:
    start, first, tokens = time.perf_counter(), None, []
    async for chunk in service.stream(req):
        first = first or time.perf_counter() - start
        tokens += chunk.token_ids
    return first, tokens


async def _measure(args: argparse.Namespace, cache_mb: int) -> dict:
    service = Service(args.run, max_tokens_cap=args.max_tokens, dtype="auto", prefix_cache_mb=cache_mb)
    await service.start()
    try:
        system = system_text(service, args.text.read_text(encoding="utf-8"), args.system)
        chats = [service.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": q}])
                 for q in QUESTIONS[: args.requests + 1]]
        results = [await _ttft(service, GenerationRequest(ids, args.max_tokens, temperature=0)) for ids in chats]
        later = [seconds for seconds, _ in results[1:]]
        return {"prompt_tokens": [len(ids) for ids in chats], "first_ttft_s": results[0][0],
                "median_ttft_s": statistics.median(later), "min_ttft_s": min(later),
                "replies": [tokens for _, tokens in results], "prefix_cache": service.stats()["prefix_cache"]}
    finally:
        await service.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--text", type=Path, required=True, help="a text file the system prompt is cut from")
    parser.add_argument("--system", type=int, default=512, help="system prompt tokens")
    parser.add_argument("--requests", type=int, default=12, help="timed requests after the first")
    parser.add_argument("--max-tokens", type=int, default=4)
    args = parser.parse_args()
    if not 1 <= args.requests < len(QUESTIONS):
        raise SystemExit(f"--requests must be in [1, {len(QUESTIONS) - 1}]")
    off = asyncio.run(_measure(args, 0))
    on = asyncio.run(_measure(args, 256))
    if on.pop("replies") != off.pop("replies"):
        raise SystemExit("the replies differ with the prefix cache: it is not exact")
    print(json.dumps({"cpu": platform.processor() or platform.machine(), "system_tokens": args.system,
                      "without_cache": off, "with_cache": on,
                      "median_ttft_ratio": off["median_ttft_s"] / on["median_ttft_s"]}, indent=2))


if __name__ == "__main__":
    main()
