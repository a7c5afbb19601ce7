"""One measured point of `hybridlm bench`, run inside a fresh subprocess.

A fresh process per point makes the peak-memory figure honest: it is the growth of the process's
peak resident set during the first (cold) run, before any timing repeat. Times are medians of
`repeats` warm runs.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from hybridlm.config import preset
from hybridlm.device import autocast
from hybridlm.model import HybridLM
from hybridlm.model.attention import set_dense_backend, sparse_causal_attention

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure(run: Callable[[], float | None], repeats: int) -> dict:
    """Peak-RSS growth of a cold run, then the median of warm runs: wall time, or what `run` returns."""
    before = _peak_rss()
    run()
    peak = _peak_rss() - before
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        reported = run()
        samples.append(reported if reported is not None else time.perf_counter() - start)
    return {"seconds": statistics.median(samples), "peak_mb": peak / 2**20}


def attention_point(spec: dict) -> dict:
    """One attention layer: dense causal SDPA or hybridlm sparse, forward or forward+backward."""
    dtype = DTYPES[spec["dtype"]]
    gen = torch.Generator().manual_seed(0)
    shape = (spec["batch"], spec["heads"], spec["seq"], spec["head_dim"])
    grad = spec["pass"] == "fwdbwd"
    q, k, v = (torch.randn(shape, generator=gen).to(dtype).requires_grad_(grad) for _ in range(3))
    g_shape = (spec["batch"], spec["heads"], spec["n_global"], spec["head_dim"])
    kg, vg = (torch.randn(g_shape, generator=gen).to(dtype) for _ in range(2)) if spec["n_global"] else (None, None)

    def attend() -> torch.Tensor:
        if spec["kind"] == "dense":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return sparse_causal_attention(q, k, v, window=spec["window"], stride=spec["stride"],
                                       k_extra_BHED=kg, v_extra_BHED=vg)

    def run() -> None:
        if grad:
            out = attend()
            out.backward(torch.ones_like(out))
        else:
            with torch.no_grad():
                attend()

    return _measure(run, spec["repeats"])


def _model(spec: dict) -> HybridLM:
    cfg = preset(spec["preset"], max_seq_len=max(spec["seq"] + spec.get("new_tokens", 0), 1024))
    torch.manual_seed(0)
    return HybridLM(cfg.all_dense() if spec["kind"] == "dense" else cfg)


def train_point(spec: dict) -> dict:
    """One optimizer step (forward, backward, AdamW) of a preset, hybrid or made all-dense."""
    model = _model(spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = max(1, spec["batch_tokens"] // spec["seq"])
    ids = torch.randint(0, model.cfg.vocab_size, (batch, spec["seq"] + 1), generator=torch.Generator().manual_seed(0))
    device = torch.device("cpu")

    def run() -> None:
        with autocast(spec["dtype"], device):
            loss = model(ids[:, :-1], targets_BT=ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = _measure(run, spec["repeats"])
    result["tokens_per_s"] = batch * spec["seq"] / result["seconds"]
    return result


@torch.no_grad()
def generate_point(spec: dict) -> dict:
    """Batch-1 decoding after a prefill of `seq` tokens (one forward into the caches, as the
    server's prefill takes it): seconds per new token, prefill tokens/s, KV-cache and weight bytes. The
    model runs as the engine runs it (`hybridlm generate`): weights cast to the dtype once, both
    kinds on the engine's kernels (the peer here is the all-dense model, not another kernel), and
    with `quantize` both with weight-only int8 or int4 (groups of 64) blocks, as `hybridlm quantize`
    makes them."""
    model = _model(spec).eval().to(torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32)
    if spec.get("quantize"):
        from hybridlm.model.converters.quant import DEFAULT_GROUP_SIZE, quantizable_layers, quantize_linears

        quantize_linears(model, quantizable_layers(model), spec["quantize"], DEFAULT_GROUP_SIZE)
    ids = torch.randint(0, model.cfg.vocab_size, (1, spec["seq"] + spec["new_tokens"]),
                        generator=torch.Generator().manual_seed(0))

    cache_bytes, prefill_s = [], []

    def run() -> float:
        cache = model.new_cache()
        start = time.perf_counter()
        model(ids[:, : spec["seq"]], cache)
        prefill_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        for t in range(spec["seq"], spec["seq"] + spec["new_tokens"]):
            model(ids[:, t : t + 1], cache)
        cache_bytes.append(sum(layer.nbytes() for layer in cache))
        return (time.perf_counter() - start) / spec["new_tokens"]

    result = _measure(run, spec["repeats"])  # seconds = median time per decoded token
    result["tokens_per_s"] = 1.0 / result["seconds"]
    result["prefill_tokens_per_s"] = spec["seq"] / statistics.median(prefill_s[1:])  # the warm runs
    result["kv_cache_mb"] = cache_bytes[-1] / 2**20
    distinct = {t.data_ptr(): t.nbytes for t in model.state_dict().values()}  # a tied head counted once
    result["weights_mb"] = sum(distinct.values()) / 2**20
    return result


POINTS = {"attention": attention_point, "train": train_point, "generate": generate_point}

if __name__ == "__main__":
    point = json.loads(sys.argv[1])
    torch.set_num_threads(point.get("threads") or torch.get_num_threads())
    peer_kernels = point["kind"] == "dense" and point["bench"] != "generate"  # SDPA as the dense peer
    set_dense_backend("sdpa" if peer_kernels else point.get("dense_backend", "auto"))
    print(json.dumps(POINTS[point["bench"]](point)))
