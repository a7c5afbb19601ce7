"""Timing whole requests through the Service (the layer under the HTTP routes), shared by the
benchmarks that compare one request with and without a feature."""

from __future__ import annotations

import statistics
import time

from hybridlm.serve.service import GenerationRequest, Service


async def timed(service: Service, req: GenerationRequest) -> tuple[float, list[int]]:
    """Seconds from submission to the last chunk, and the tokens generated."""
    start, tokens = time.perf_counter(), []
    async for chunk in service.stream(req):
        tokens += chunk.token_ids
    return time.perf_counter() - start, tokens


async def median_run(service: Service, req: GenerationRequest, repeats: int) -> dict:
    """After one warm-up, the median of `repeats` runs: {"seconds", "tokens", "tokens_per_s", "ids"}."""
    await timed(service, req)
    runs = [await timed(service, req) for _ in range(repeats)]
    seconds = statistics.median(s for s, _ in runs)
    ids = runs[0][1]
    return {"seconds": seconds, "tokens": len(ids), "tokens_per_s": len(ids) / seconds, "ids": ids}
