"""The C++ decode kernels against fp32 references from PyTorch, and the kernel-path dispatch.

Tolerances: each kernel accumulates in fp32 and rounds its result to bf16 once, so it stays
within one bf16 rounding (relative 2^-8) of the fp32 result of the same bf16 inputs; the atol
covers outputs near zero.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridlm.config import preset
from hybridlm.device import cpu_has_bf16
from hybridlm.errors import UserError
from hybridlm.model import HybridLM
from hybridlm.model.cpu_kernels import kernel_path
from hybridlm.model.decode_kernel_bf16 import (
    MAX_ROWS,
    attention_applies,
    decode_attention_bf16,
    linear_applies,
    linear_bf16,
    widens_bf16,
)
from hybridlm.model.transformer import ACTIVATIONS, Linear

ONE_ROUNDING = 2.0**-8


def _bf16(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@torch.no_grad()
@pytest.mark.parametrize("activation", ["none", "gelu_tanh", "swiglu"])
@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS])
@pytest.mark.parametrize("n_in,n_out,bias", [(384, 1152, True), (100, 36, False), (1536, 384, True), (64, 8194, False)])
def test_linear_kernel_equals_the_fp32_product_rounded_once(kernel, activation, rows, n_in, n_out, bias):
    """Widths that are not a multiple of 32 (masked tails) or of the 4-output tile, one to four
    rows, each activation applied to the fp32 output."""
    x, weight = _bf16(rows, n_in, seed=1), _bf16(n_out, n_in, seed=2) / n_in**0.5
    b = _bf16(n_out, seed=3) if bias else None
    reference = ACTIVATIONS[activation](F.linear(x.float(), weight.float(), None if b is None else b.float()))
    got = linear_bf16(x, weight, b, activation)
    assert got.dtype == torch.bfloat16 and got.shape == reference.shape
    torch.testing.assert_close(got.float(), reference, rtol=ONE_ROUNDING, atol=1e-3)


@torch.no_grad()
def test_linear_kernel_takes_leading_dims_and_only_inference_calls(kernel):
    x, weight = _bf16(2, 1, 64), _bf16(48, 64)
    torch.testing.assert_close(linear_bf16(x, weight, None).float(), (x.float() @ weight.float().T),
                               rtol=ONE_ROUNDING, atol=1e-3)
    assert not linear_applies(_bf16(MAX_ROWS + 1, 64), weight)  # many rows: oneDNN's GEMM
    assert not linear_applies(x.float(), weight.float())
    with torch.enable_grad():
        assert not linear_applies(x, weight)  # no backward of its own


@torch.no_grad()
@pytest.mark.parametrize("heads,kv_heads", [(6, 6), (6, 2), (4, 1)])
@pytest.mark.parametrize("length", [1, 17, 1000])
@pytest.mark.parametrize("dim", [32, 64, 128, 48, 40])
def test_decode_attention_equals_sdpa_on_a_cache_slice(kernel, heads, kv_heads, length, dim):
    """Keys and values are a slice of a larger cache buffer (strided), as DenseKVCache passes them;
    grouped and multi-query heads; lengths under, over and not a multiple of the AVX-512 kernel's
    16-key blocks (the AVX2 kernel's 8); each head dim they keep in registers, and ones with a tail
    past their vectors (48 for AVX-512's 32 bf16 per load, 40 for both)."""
    q = _bf16(2, heads, 1, dim, seed=4)
    k_buffer, v_buffer = _bf16(2, kv_heads, length + 30, dim, seed=5), _bf16(2, kv_heads, length + 30, dim, seed=6)
    k, v = k_buffer[:, :, :length], v_buffer[:, :, :length]
    assert attention_applies(q, [k])
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=heads != kv_heads)
    torch.testing.assert_close(decode_attention_bf16(q, [k], [v]).float(), reference, rtol=ONE_ROUNDING, atol=2e-3)


@torch.no_grad()
def test_decode_attention_over_key_sets_equals_sdpa_over_their_concatenation(kernel):
    """A sparse layer's three key sets: global slots shared by the batch (expanded, stride 0), the
    strided store, and the window (a slice of a larger buffer); one empty set."""
    q = _bf16(2, 6, 1, 64, seed=7)
    slots = _bf16(1, 2, 4, 64, seed=8).expand(2, -1, -1, -1), _bf16(1, 2, 4, 64, seed=9).expand(2, -1, -1, -1)
    strided = _bf16(2, 2, 9, 64, seed=10), _bf16(2, 2, 9, 64, seed=11)
    window = _bf16(2, 2, 40, 64, seed=12)[:, :, 3:30], _bf16(2, 2, 40, 64, seed=13)[:, :, 3:30]
    empty = _bf16(2, 2, 0, 64), _bf16(2, 2, 0, 64)
    sets = [slots, empty, strided, window]
    keys, values = [k for k, _ in sets], [v for _, v in sets]
    assert attention_applies(q, keys)
    reference = F.scaled_dot_product_attention(q.float(), torch.cat(keys, 2).float(), torch.cat(values, 2).float(),
                                               enable_gqa=True)
    torch.testing.assert_close(decode_attention_bf16(q, keys, values).float(), reference, rtol=ONE_ROUNDING,
                               atol=2e-3)


@torch.no_grad()
def test_many_bf16_rows_on_a_cpu_without_native_bf16_are_multiplied_in_fp32():
    """A prefill's rows (more than the decode kernel takes) through a bf16 Linear: where the CPU
    has no native bf16 the layer widens to fp32 and rounds once, which is exactly the fp32
    product rounded; elsewhere oneDNN's bf16 GEMM gives it within one rounding."""
    layer = Linear(96, 40).to(torch.bfloat16)
    x = _bf16(3, 7, 96, seed=4)
    assert widens_bf16(x, layer.weight) == (not cpu_has_bf16())
    exact = F.linear(x.float(), layer.weight.float(), layer.bias.float()).to(torch.bfloat16)
    got = layer(x)
    assert got.dtype == torch.bfloat16
    if widens_bf16(x, layer.weight):
        assert torch.equal(got, exact)
    torch.testing.assert_close(got.float(), exact.float(), rtol=ONE_ROUNDING, atol=1e-3)


def _decode_logits(model: HybridLM, ids: list[int]) -> torch.Tensor:
    """Teacher-forced decoding: the logits of every position, one token at a time through the cache."""
    cache = model.new_cache()
    with torch.no_grad():
        return torch.cat([model(torch.tensor([[token]]), cache)[0] for token in ids])


@pytest.mark.parametrize("layers", ["DDSS", "SSSS"])
def test_forcing_the_torch_path_gives_the_same_decoding(kernel, layers, monkeypatch):
    """A bf16 hybrid model decodes alike on both kernel paths (the kernels' one rounding against
    torch's rounding before each activation), and like its whole-sequence forward; the paths
    really differ, or this would prove nothing. 40 tokens through a window of 8 and a stride of 4
    roll the sparse caches' buffers several times."""
    cfg = preset("tiny", n_layer=4, layer_pattern=layers, window=8, stride=4, max_seq_len=128)
    torch.manual_seed(0)
    model = HybridLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (40,)).tolist()
    ours = _decode_logits(model, ids).float()
    with torch.no_grad():
        whole = model(torch.tensor([ids]))[0].float()
    assert (ours - whole).abs().max() < 0.05 * whole.abs().max()
    monkeypatch.setenv("HYBRIDLM_KERNEL", "torch")
    theirs = _decode_logits(model, ids).float()
    difference = (ours - theirs).abs().max()
    assert 0 < difference < 0.05 * theirs.abs().max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize(
    "value,flags,message",
    [
        ("avx512_bf16", frozenset({"avx", "avx2", "fma"}), "needs the CPU flags avx512_bf16 avx512bw avx512f avx512vl, "
                                                          "which this CPU lacks \\(its SIMD flags: avx avx2\\)"),
        ("amx", frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16"}),
         "HYBRIDLM_KERNEL=amx needs the CPU flags amx_tile, which this CPU lacks \\(its SIMD flags: amx_bf16 avx512_bf16 "
         "avx512bw avx512f avx512vl\\)"),
        ("avx2", frozenset({"avx", "sse4_2"}), "needs the CPU flags avx2 fma, which this CPU lacks \\(its SIMD "
                                               "flags: avx\\)"),
        ("fast", frozenset(), "'fast' is not a kernel path; use auto, amx, avx512_bf16, avx2, torch"),
    ],
)
def test_a_kernel_path_the_cpu_cannot_run_is_refused_by_name(value, flags, message, monkeypatch):
    monkeypatch.setenv("HYBRIDLM_KERNEL", value)
    with pytest.raises(UserError, match=message):
        kernel_path(flags)


def test_the_kernel_path_follows_the_cpu_flags(monkeypatch):
    monkeypatch.delenv("HYBRIDLM_KERNEL", raising=False)
    assert kernel_path(frozenset({"avx", "avx2"})) == "torch"  # AVX2 without FMA
    assert kernel_path(frozenset({"avx2", "fma"})) == "avx2"
    avx512_bf16 = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16"})
    assert kernel_path(avx512_bf16) == "avx512_bf16"
    assert kernel_path(avx512_bf16 | {"amx_bf16", "amx_tile", "amx_int8"}) == "amx"
    assert kernel_path(avx512_bf16 | {"amx_int8", "amx_tile"}) == "avx512_bf16"  # AMX without its bf16 part
    monkeypatch.setenv("HYBRIDLM_KERNEL", "torch")
    assert kernel_path(frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"})) == "torch"
