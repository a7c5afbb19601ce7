"""Mixture-of-experts FFN: routing, capacity and both router losses by hand on small tensors; the
balancing loss and the bias balancing even the load of a real short run; cached decoding equals
the full forward; total vs active parameters; MoE layers quantize (router not); bad configs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hybridlm.config import ModelConfig
from hybridlm.errors import UserError
from hybridlm.model import HybridLM
from hybridlm.model.converters.quant import QuantizedLinear, quantizable_layers
from hybridlm.model.info import active_params, count_params, flops_per_token
from hybridlm.model.moe import MoEFeedForward, pop_moe_stats, pop_router_loss
from hybridlm.train.config import load_run_config
from hybridlm.train.moe_report import plot_moe
from hybridlm.train.report import write_report
from hybridlm.train.trainer import train

from conftest import TINY_MODEL


def _cfg(**fields) -> ModelConfig:
    base = dict(vocab_size=64, n_layer=2, n_head=2, d_model=16, d_ff=32, max_seq_len=64, layer_pattern="DS",
                window=4, stride=4, n_global=1, ffn="moe", n_experts=4)
    return ModelConfig(**{**base, **fields})


def _layer(**fields) -> MoEFeedForward:
    """Layer 0's MoE FFN with its experts' weights scaled up from the 0.02 init, so outputs are O(1)."""
    torch.manual_seed(0)
    layer = HybridLM(_cfg(**fields)).blocks[0].ffn
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.mul_(30)
    return layer


@torch.no_grad()
def _by_hand(layer: MoEFeedForward, x_BTC: torch.Tensor, capacity: int) -> torch.Tensor:
    """Token by token: softmax router, top-k, renormalised gates, an expert skipped once it has
    taken `capacity` earlier tokens of the row."""
    B, T, C = x_BTC.shape
    out = torch.zeros(B, T, C, dtype=torch.float64)
    for b in range(B):
        taken = [0] * layer.n_experts
        for t in range(T):
            probs = torch.softmax(x_BTC[b, t].double() @ layer.router.weight.double().T, -1)
            top = torch.topk(probs, layer.top_k).indices.tolist()
            gates = probs[top] / (probs[top].sum() if layer.top_k > 1 else 1)
            for e, gate in zip(top, gates):
                if taken[e] < capacity:
                    out[b, t] += float(gate) * layer.experts[e](x_BTC[b, t][None, None])[0, 0].double()
                taken[e] += 1
    return out


@pytest.mark.parametrize("top_k,factor", [(1, 0.5), (2, 0.75), (2, 4.0)])
def test_routing_and_capacity_match_a_token_by_token_computation(top_k, factor):
    layer = _layer(top_k=top_k, capacity_factor=factor).train()
    with torch.no_grad():
        layer.router.weight.mul_(40)  # decisive routing, so several tokens pick the same expert
    x = torch.randn(2, 12, 16)
    with torch.no_grad():
        got = layer(x)
    capacity = math.ceil(factor * 12 * top_k / 4)
    want = _by_hand(layer, x, capacity)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    if factor < 1:  # some assignment must have been over capacity for the test to mean anything
        assert (want - _by_hand(layer, x, 10**6)).abs().max() > 0.1 * want.abs().max()


def test_router_losses_by_hand():
    layer = _layer(top_k=2, moe_aux_loss=0.5, moe_z_loss=0.25)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        chosen, _, logits, probs = layer.route(x.reshape(15, 16))
    experts = chosen.reshape(-1)
    share = torch.tensor([(experts == e).float().mean() for e in range(4)])
    balance = 4 * sum(share[e] * probs[:, e].mean() for e in range(4))
    z = (torch.log(torch.exp(logits.double()).sum(-1)) ** 2).mean()
    want = 0.5 * balance + 0.25 * z
    assert float(layer.router_loss(experts, logits, probs)) == pytest.approx(float(want), rel=1e-5)
    layer.train()
    layer(x)
    assert float(layer.pop_router_loss().detach()) == pytest.approx(float(want), rel=1e-5)
    assert layer.pop_router_loss() is None  # popped


def test_router_runs_in_fp32_under_bf16_autocast_and_every_expert_gets_a_gradient():
    torch.manual_seed(0)
    model = HybridLM(_cfg(moe_pattern="MF"))
    ids = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, targets_BT=ids)
        _, _, logits, _ = model.blocks[0].ffn.route(torch.randn(4, 16))
    assert logits.dtype == torch.float32
    (loss + pop_router_loss(model)).backward()
    assert all(p.grad is not None for p in model.parameters())  # DDP needs every parameter used
    stats = pop_moe_stats(model)
    assert set(stats["moe_load"]) == {"0"} and sum(stats["moe_load"]["0"]) == pytest.approx(1.0)


def test_cached_decoding_equals_the_full_forward():
    torch.manual_seed(0)
    model = HybridLM(_cfg(top_k=2, n_shared_experts=1, moe_balance="bias", eval_capacity_factor=2.0)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        model.blocks[1].ffn.balance_bias.copy_(torch.tensor([0.1, -0.1, 0.0, 0.05]))
        ids = torch.randint(0, 64, (1, 24))
        full = model(ids)[0]
        cache = model.new_cache()
        stepped = torch.cat([model(ids[:, i : i + 1], cache)[0] for i in range(24)])
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-4)


def _balance_run(tmp_path, tiny_shards, name: str, extra: list[str]) -> list[float]:
    out = tmp_path / name
    train(load_run_config(None, TINY_MODEL + ['model.ffn="moe"', "model.n_experts=4", f"data.path={tiny_shards}",
                                             f"train.out={out}", "train.steps=40", "data.batch_size=8",
                                             "data.seq_len=64", "eval.every=0", "eval.tokens=512",
                                             "checkpoint.every=40", "train.dtype=fp32", "optim.lr=3e-3",
                                             "schedule.warmup_steps=4", "train.log_every=40", *extra]),
          progress=False)
    record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "moe_load" in line][-1]
    assert set(record["moe_dropped"]) == {"0", "1"} and all(0 < h < math.log(4) for h in
                                                           record["moe_router_entropy"].values())
    return [max(load) for load in record["moe_load"].values()]


def test_balancing_evens_the_expert_load_of_a_short_run(tmp_path, tiny_shards):
    unbalanced = _balance_run(tmp_path, tiny_shards, "none", ["model.moe_aux_loss=0", "model.moe_z_loss=0"])
    with_loss = _balance_run(tmp_path, tiny_shards, "aux", ["model.moe_aux_loss=0.1"])
    with_bias = _balance_run(tmp_path, tiny_shards, "bias", ["model.moe_aux_loss=0", 'model.moe_balance="bias"',
                                                             "model.moe_bias_rate=0.01"])
    assert max(unbalanced) > 0.45  # one expert took almost half the tokens or more (even: 0.25)
    assert max(with_loss) < 0.35 and max(with_bias) < 0.4
    moe_plot = Path(write_report(tmp_path / "aux")["files"]["moe"]).read_bytes()
    placeholder = plot_moe([])  # the page of a run without mixtures
    assert moe_plot[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(moe_plot[20:24], "big") > 700  # IHDR height
    assert len(moe_plot) > 2 * len(placeholder)


def test_total_and_active_parameters_and_flops():
    cfg = _cfg(top_k=2, moe_pattern="FM", bias=True, n_shared_experts=1)
    model = HybridLM(cfg)
    expert = sum(p.numel() for p in model.blocks[1].ffn.experts[0].parameters())
    total, _ = count_params(cfg)
    assert total == sum(p.numel() for p in model.parameters())
    assert active_params(cfg)[0] == total - (4 - 2) * expert
    assert flops_per_token(cfg, 64) < flops_per_token(_cfg(top_k=4, moe_pattern="FM", bias=True,
                                                           n_shared_experts=1), 64)


def test_experts_quantize_and_the_router_does_not():
    model = HybridLM(_cfg(d_model=32, d_ff=64))
    names = quantizable_layers(model)
    assert "blocks.0.ffn.experts.3.down" in names and not any(n.endswith("router") for n in names)
    from hybridlm.model.converters.quant import quantize_linears

    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        before = model.eval()(ids)
    quantize_linears(model, names, "int8", 0)
    assert isinstance(model.blocks[1].ffn.experts[0].up, QuantizedLinear)
    assert isinstance(model.blocks[1].ffn.router, torch.nn.Linear)
    with torch.no_grad():
        after = model(ids)
    assert F.kl_div(after.log_softmax(-1), before.log_softmax(-1), log_target=True, reduction="batchmean") < 1e-3


@pytest.mark.parametrize("fields,words", [
    ({"top_k": 5}, "model.top_k must be in 1..model.n_experts (4)"),
    ({"capacity_factor": 0.0}, "model.capacity_factor must be > 0"),
    ({"eval_capacity_factor": -1.0}, "model.eval_capacity_factor must be > 0"),
    ({"n_experts": 1}, "model.n_experts must be >= 2"),
    ({"moe_pattern": "MX"}, "model.moe_pattern must have one letter M or F per layer"),
    ({"moe_balance": "loss"}, "model.moe_balance must be one of aux, bias"),
    ({"ffn": "swiglu"}, "model.n_experts applies to mixture-of-experts layers; set model.ffn = \"moe\""),
])
def test_bad_moe_configs_are_refused_by_name(fields, words):
    with pytest.raises(UserError, match=re.escape(words)):
        _cfg(**fields)
