"""The fused decode step (decode_step.py) against the module path and the whole-sequence forward.

The module path is the reference: a forward hook on the model sends every step there (hooks must
see each module's call, so the fused step stands aside for them). Both round to bf16 at the same
places; they differ only where fp32 sums run in another order (the norms), which can move a bf16
result by one rounding, so logits agree to a few bf16 roundings and the greedy tokens agree.
"""

from __future__ import annotations

import copy

import pytest
import torch

from hybridlm.config import preset
from hybridlm.model import HybridLM
from hybridlm.model.converters.quant import quantizable_layers, quantize_linears
from hybridlm.model.decode_step import build_plan
from hybridlm.model.kv_cache import SparseKVCache

CONFIGS = {
    # RoPE, RMSNorm, SwiGLU, grouped-query heads, sparse layers with global slots rolling their caches
    "hybrid-gqa": {"layer_pattern": "DSDS", "n_kv_head": 2, "n_global": 2},
    # GPT-2's choices: learned positions, LayerNorm with biases, tanh GELU, biased projections
    "gpt2": {"layer_pattern": "DDSS", "position": "learned", "norm": "layernorm", "ffn": "gelu", "bias": True,
             "n_global": 0},
    "sinusoidal-mqa": {"layer_pattern": "SSSS", "position": "sinusoidal", "n_kv_head": 1},
}


def _model(fields: dict) -> HybridLM:
    cfg = preset("tiny", n_layer=4, d_model=64, n_head=4, vocab_size=211, max_seq_len=160, window=8, stride=4,
                 **fields)
    torch.manual_seed(0)
    model = HybridLM(cfg).eval()
    with torch.no_grad():  # away from the init's zero biases and unit norms, so each of them matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.to(torch.bfloat16)


def _teacher_forced(model: HybridLM, ids: list[int], prompt: int, module_path: bool):
    """The logits of each position after the prompt, one token at a time through the cache."""
    hook = model.register_forward_hook(lambda *args: None) if module_path else None
    cache = model.new_cache()
    with torch.no_grad():
        first = model(torch.tensor([ids[:prompt]]), cache)[0, -1:]
        steps = [model(torch.tensor([[token]]), cache)[0] for token in ids[prompt:]]
    if hook is not None:
        hook.remove()
    return torch.cat([first, *steps]).float(), cache


@pytest.mark.parametrize("name", CONFIGS)
def test_fused_step_equals_the_module_path_and_the_whole_forward(kernel, name):
    """60 steps after a 20-token prompt: past a window of 8 and a stride of 4 the sparse caches
    roll their buffers and evict strided keys many times."""
    model = _model(CONFIGS[name])
    ids = torch.randint(0, model.cfg.vocab_size, (81,), generator=torch.Generator().manual_seed(1)).tolist()
    fused, fused_cache = _teacher_forced(model, ids, 20, module_path=False)
    modules, module_cache = _teacher_forced(model, ids, 20, module_path=True)
    assert fused_cache._plan is not None and module_cache._plan is None  # each path really ran
    scale = modules.abs().max()
    assert (fused - modules).abs().max() <= 4 * 2.0**-8 * scale
    assert (fused.argmax(-1) == modules.argmax(-1)).float().mean() >= 0.95
    with torch.no_grad():
        whole = model(torch.tensor([ids]))[0, 19:].float()
    assert (fused - whole).abs().max() < 0.05 * whole.abs().max()
    for ours, theirs in zip(fused_cache, module_cache):  # the caches end alike, bookkeeping and keys
        assert ours.length == theirs.length == 81
        if isinstance(ours, SparseKVCache):
            assert (ours.run_start, ours.run_k.shape, ours.far_k.shape) == (theirs.run_start, theirs.run_k.shape,
                                                                           theirs.far_k.shape)
            torch.testing.assert_close(ours.run_k.float(), theirs.run_k.float(), atol=0.05, rtol=0.02)
        else:
            torch.testing.assert_close(ours.k_BHSD[:, :, :81].float(), theirs.k_BHSD[:, :, :81].float(),
                                       atol=0.05, rtol=0.02)


def _quantized(name: str, kind: str, group_size: int) -> HybridLM:
    model = _model(CONFIGS[name])
    return quantize_linears(model, quantizable_layers(model), kind, group_size)


@pytest.mark.parametrize(("name", "kind", "group_size"), [("hybrid-gqa", "int8", 64), ("gpt2", "int8", 64),
                                                          ("hybrid-gqa", "int4", 32), ("gpt2", "int4", 64)])
def test_fused_step_reads_quantized_layers_as_the_module_path(kernel, name, kind, group_size):
    """Weight-only int8 and int4 layers in the fused step: the same logits as the module path
    (aten's integer kernels) to a few bf16 roundings, and each layer's kernel output against the
    fp32 product with the weight its codes stand for."""
    model = _quantized(name, kind, group_size)
    ids = torch.randint(0, model.cfg.vocab_size, (61,), generator=torch.Generator().manual_seed(2)).tolist()
    fused, fused_cache = _teacher_forced(model, ids, 20, module_path=False)
    modules, module_cache = _teacher_forced(model, ids, 20, module_path=True)
    assert fused_cache._plan is not None and module_cache._plan is None
    scale = modules.abs().max()
    assert (fused - modules).abs().max() <= 4 * 2.0**-8 * scale
    assert (fused.argmax(-1) == modules.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize(("kind", "group_size", "in_features"), [("int8", 64, 200), ("int4", 32, 96),
                                                                 ("int4", 64, 384)])
@torch.no_grad()
def test_the_quantized_linear_kernel_equals_the_dequantized_fp32_product(kernel, kind, group_size, in_features):
    """One quantized layer through the plan's Linear kernel (a one-layer plan's qkv, through the
    step's first projection) against fp32 F.linear on the dequantized weight: off by one bf16
    rounding of the result at most. 200 inputs leave a tail past the int8 tiles' vectors."""
    from hybridlm.model.converters.quant import QuantizedLinear
    from hybridlm.model.decode_kernel_bf16 import decode_extension

    torch.manual_seed(3)
    linear = torch.nn.Linear(in_features, 48, bias=True)
    layer = QuantizedLinear.from_linear(linear, kind, group_size).to(torch.bfloat16)
    extension = decode_extension()
    x = torch.randn(3, in_features).to(torch.bfloat16)
    zeros = layer.zeros if kind == "int4" else None
    ours = extension.quantized_linear(x, layer.qweight, layer.scales, zeros, layer.bias).float()
    exact = torch.nn.functional.linear(x.float(), layer.dequantized(), layer.bias.float())
    assert (ours - exact).abs().max() <= 2.0**-8 * exact.abs().max()
    torch.testing.assert_close(ours, exact.to(torch.bfloat16).float(), atol=2e-2, rtol=2.0**-7)


@torch.no_grad()
def test_rows_at_different_positions_decode_as_each_alone(kernel):
    """The server's batched step: each row through the same kernels as alone, so bit-identical
    logits (every output's sum runs in the same order whatever the batch holds)."""
    model = _model(CONFIGS["hybrid-gqa"])
    prompts = [list(range(3, 3 + n)) for n in (5, 17, 30)]
    batched, alone = [model.new_cache() for _ in prompts], [model.new_cache() for _ in prompts]
    for ids, cache_b, cache_a in zip(prompts, batched, alone):
        model(torch.tensor([ids]), cache_b)
        model(torch.tensor([ids]), cache_a)
    tokens = [ids[-1] for ids in prompts]
    for _ in range(12):
        logits_BV = model.decode_rows(tokens, batched)
        for b, token in enumerate(tokens):
            assert torch.equal(logits_BV[b], model(torch.tensor([[token]]), alone[b])[0, -1])
        tokens = logits_BV.argmax(-1).tolist()
    assert batched[0]._plan is not None


@torch.no_grad()
def test_a_batch_sharing_one_cache_decodes_as_each_row_alone(kernel):
    """n samples of one prompt share a cache of batch n (generate_samples)."""
    model = _model(CONFIGS["gpt2"])
    prompt = torch.arange(5, 25)
    shared, alone = model.new_cache(), model.new_cache()
    model(prompt.expand(3, -1), shared)
    model(prompt[None], alone)
    rows = torch.tensor([[7], [7], [7]])
    for step in range(10):
        logits = model(rows, shared)[:, 0]
        one = model(rows[:1], alone)[0, 0]
        for b in range(3):
            assert torch.equal(logits[b], one)
        rows = torch.tensor([[step + 9]] * 3)
    assert shared._plan is not None and shared[0].length == 30


@torch.no_grad()
def test_a_copied_cache_decodes_on_like_the_original(kernel):
    model = _model(CONFIGS["hybrid-gqa"])
    cache = model.new_cache()
    model(torch.arange(3, 40)[None], cache)
    model(torch.tensor([[5]]), cache)  # builds the plan
    copied = copy.deepcopy(cache)
    assert torch.equal(model(torch.tensor([[9]]), copied), model(torch.tensor([[9]]), cache))


def test_models_the_fused_step_does_not_cover_take_the_module_path(kernel):
    """fp32 weights, a mixture of experts, training mode: no plan (those run the modules, whose
    own tests cover them)."""
    assert build_plan(_model(CONFIGS["gpt2"]).float()) is None
    moe = preset("tiny", n_layer=2, d_model=64, n_head=4, vocab_size=97, ffn="moe", n_experts=4, top_k=2)
    assert build_plan(HybridLM(moe).to(torch.bfloat16).eval()) is None
    model = _model(CONFIGS["gpt2"])
    assert build_plan(model) is not None
    model.train()
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.arange(3, 10)[None], cache)
        model(torch.tensor([[4]]), cache)
    assert cache._plan is None and not cache._planned  # training mode never asks for a plan


def test_bf16_models_keep_fp32_rotary_tables():
    """model.to(bf16) would otherwise round the angles' cos/sin to bf16 (off by up to 2^-9)."""
    model = HybridLM(preset("tiny", n_layer=1, d_model=64, n_head=4, vocab_size=97)).to(torch.bfloat16)
    rotary = model.blocks[0].attn.rotary
    assert rotary.cos_TF.dtype == torch.float32
    exact = torch.outer(torch.arange(rotary.max_seq_len, dtype=torch.float64),
                        1.0 / rotary.theta ** (torch.arange(0, rotary.head_dim, 2, dtype=torch.float64) / rotary.head_dim))
    torch.testing.assert_close(rotary.cos_TF.double(), exact.cos(), atol=1e-5, rtol=0)
