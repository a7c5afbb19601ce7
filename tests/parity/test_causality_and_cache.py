"""Causality for every layer kind, and cached decoding equal to a full forward."""

from __future__ import annotations

import pytest
import torch

from hybridlm.config import ModelConfig
from hybridlm.model import HybridLM


def _model(pattern: str, **kw) -> HybridLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, n_layer=len(pattern), n_head=4, d_model=32, max_seq_len=160,
                      layer_pattern=pattern, window=6, stride=5, n_global=2, **kw)
    return HybridLM(cfg).eval()


@pytest.mark.parametrize("pattern", ["DD", "SS", "DSS"])
@pytest.mark.parametrize("position", ["rope", "learned", "sinusoidal"])
def test_changing_a_later_token_changes_no_earlier_output(pattern, position):
    model = _model(pattern, position=position)
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        base = model(ids)
        for t in (0, 13, 38):
            changed = ids.clone()
            changed[0, t + 1] = (changed[0, t + 1] + 1) % 97
            out = model(changed)
            torch.testing.assert_close(out[0, : t + 1], base[0, : t + 1], atol=0, rtol=0)
            assert not torch.allclose(out[0, t + 1], base[0, t + 1])


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2}, {"position": "learned", "norm": "layernorm", "ffn": "gelu"}])
def test_cached_decoding_equals_full_forward(kw):
    model = _model("DSSS", **kw)
    ids = torch.randint(0, 97, (2, 120))  # far longer than the window (6) and several strides
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        steps = [model(ids[:, :17], cache)]  # prefill, then one token at a time
        steps += [model(ids[:, t : t + 1], cache) for t in range(17, 90)]
        steps.append(model(ids[:, 90:], cache))  # a chunk after decoding
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


def test_sparse_cache_keeps_only_window_strided_and_nothing_else():
    model = _model("DS")
    ids = torch.randint(0, 97, (1, 150))
    with torch.no_grad():
        cache = model.new_cache()
        model(ids[:, :1], cache)
        for t in range(1, 150):
            model(ids[:, t : t + 1], cache)
    dense_cache, sparse_cache = cache
    per_key = 2 * 4 * 8 * 4  # k and v, 4 heads, head dim 8, fp32
    assert dense_cache.nbytes() == per_key * 150
    window_keys = 6 - 1  # the run kept between steps
    strided_keys = len([p for p in range(150 - window_keys) if (p + 1) % 5 == 0])
    assert sparse_cache.nbytes() == per_key * (window_keys + strided_keys)


def test_bf16_hybrid_model_matches_its_fp32_self():
    """The whole model under bf16 autocast (C++ kernel for both layer kinds where the CPU has it)
    stays close to the fp32 model: same greedy next tokens almost everywhere."""
    model = _model("DDSS")
    ids = torch.randint(0, 97, (2, 150))
    with torch.no_grad():
        full = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids).float()
    assert (low - full).abs().max() < 0.1
    assert (low.argmax(-1) == full.argmax(-1)).float().mean() > 0.95
