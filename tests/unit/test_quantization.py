"""Weight-only int8/int4 quantization: the layer against a dequantized reference matmul, the
quantizer's error bound, quantized runs (save/load with hashes, greedy decode against the full
forward, quality figures, sensitivity) and `hybridlm quantize`'s bad input."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY_MODEL
from hybridlm.config import ModelConfig
from hybridlm.errors import UserError
from hybridlm.model.converters.quant import (
    KERNEL_MAX_ROWS,
    QuantizedLinear,
    QuantSpec,
    chosen_layers,
    quantizable_layers,
    quantize_int4,
    quantize_int8,
    quantize_linears,
    round_embeddings_to_bf16,
    unpack_int4,
)
from hybridlm.quantize.quality import compare_models, text_windows
from hybridlm.quantize.sensitivity import layer_sensitivity
from hybridlm.quantize.writer import QUALITY_FILE, quantize_run
from hybridlm.fileio import atomic_write_json
from hybridlm.model import HybridLM
from hybridlm.run import load_run, save_final
from hybridlm.train.config import DataConfig, RunConfig, TrainConfig

CASES = [("int8", 0, (64, 96)), ("int8", 0, (128, 40)), ("int8", 0, (256, 384)),
         ("int4", 32, (64, 96)), ("int4", 64, (128, 48)), ("int4", 128, (256, 384)), ("int4", 256, (256, 32))]
"""(kind, group size, (in, out)): odd and even widths, with and without bias, every int4 group size."""


def _reference(x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
    """fp32 matmul with the weight rebuilt by hand from the stored codes (not layer.dequantized)."""
    if layer.kind == "int8":
        weight = layer.qweight.double() * layer.scales.double()[:, None]
    else:
        low, high = layer.qweight & 0xF, layer.qweight >> 4
        codes = torch.empty(layer.out_features, layer.in_features, dtype=torch.float64)
        codes[:, 0::2], codes[:, 1::2] = low.double(), high.double()
        scales = layer.scales.double().repeat_interleave(layer.group_size, dim=1)
        zeros = layer.zeros.double().repeat_interleave(layer.group_size, dim=1)
        weight = (codes - 8) * scales + zeros
    out = x.double() @ weight.T
    return out if layer.bias is None else out + layer.bias.double()


@pytest.mark.parametrize("kind,group_size,shape", CASES)
def test_quantized_linear_matches_the_dequantized_matmul(kind, group_size, shape):
    in_features, out_features = shape
    torch.manual_seed(in_features)
    linear = nn.Linear(in_features, out_features, bias=out_features % 2 == 0)
    layer = QuantizedLinear.from_linear(linear, kind, group_size)
    for rows in (1, 3, KERNEL_MAX_ROWS[kind] + 5):  # the integer kernel, then the dequantize-and-matmul path
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, rows, in_features).to(dtype)
            got, want = layer(x), _reference(x, layer)
            assert got.dtype == dtype and got.shape == (2, rows, out_features)
            scale = want.abs().max().item()
            tol = 1e-5 if dtype == torch.float32 and rows > KERNEL_MAX_ROWS[kind] else 2e-2
            assert (got.double() - want).abs().max().item() <= tol * scale, (kind, rows, dtype)


def test_int4_refuses_widths_its_kernel_cannot_take():
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Linear(64, 40), nn.Linear(64, 48)])
    with pytest.raises(UserError, match="blocks.0 has 40: --skip it"):
        chosen_layers(model, QuantSpec(to="int4", group_size=32))
    assert chosen_layers(model, QuantSpec(to="int4", group_size=32, skip=["blocks.0"])) == ["blocks.1"]
    assert chosen_layers(model, QuantSpec(to="int8")) == ["blocks.0", "blocks.1"]


def test_the_quantizers_error_is_within_half_a_step():
    torch.manual_seed(0)
    weight = torch.randn(48, 256) * torch.linspace(0.1, 3, 48)[:, None]
    int8 = quantize_int8(weight)
    step = int8["scales"].float()[:, None]
    assert ((int8["qweight"].float() * step - weight).abs() <= step / 2 + 1e-6).all()
    int4 = quantize_int4(weight, 64)
    codes = unpack_int4(int4["qweight"])
    assert codes.min() >= 0 and codes.max() <= 15 and codes.shape == weight.shape
    step = int4["scales"].float().repeat_interleave(64, dim=1)
    rebuilt = (codes.float() - 8) * step + int4["zeros"].float().repeat_interleave(64, dim=1)
    assert ((rebuilt - weight).abs() <= step * 0.51 + 1e-3).all()  # bf16 zeros shift the grid a little
    assert (rebuilt - weight).abs().mean() < (int8["qweight"].float() * int8["scales"].float()[:, None]
                                             - weight).abs().mean() * 40


def test_a_quantized_run_round_trips_decodes_like_its_forward_and_reports_quality(tiny_run, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text("".join(f"Paragraph {i}: the value of x{i} is {i * 5 % 11}.\n\n" for i in range(300)))
    results = {}
    for kind in ("int8", "int4"):
        out = tmp_path / kind
        results[kind] = quantize_run(tiny_run, QuantSpec(to=kind, group_size=32), out, data=text, tokens=2048)
        run = load_run(out)
        config = json.loads((out / "config.json").read_text())["quantization"]
        assert config["to"] == kind and len(config["layers"]) == 8 and config["source_weights_sha256"]
        assert sum(isinstance(m, QuantizedLinear) for m in run.model.modules()) == 8
        assert json.loads((out / QUALITY_FILE).read_text())["mean_kl"] == results[kind]["quality"]["mean_kl"]
        ids = torch.tensor(run.tokenizer.encode("Paragraph 12: the value of"))[None]
        with torch.no_grad():
            full = run.model(ids)[0]
            cache = run.model.new_cache()
            stepped = torch.cat([run.model(ids[:, i : i + 1], cache)[0] for i in range(ids.shape[1])])
        # the cached path runs the integer kernels in bf16, the full forward dequantizes in fp32
        assert (stepped - full).abs().max() < 0.05 * full.abs().max()
        assert (stepped.argmax(-1) == full.argmax(-1)).float().mean() >= 0.9
        with torch.no_grad():  # the scheduler's batched step: rows at different positions, each its own cache
            caches = [run.model.new_cache(), run.model.new_cache()]
            run.model(ids, caches[0])
            run.model(ids[:, :4], caches[1])
            single = copy.deepcopy(caches[1])
            batched = run.model.decode_rows([5, 6], caches)
            alone = run.model(torch.tensor([[6]]), single)[0, -1]
        assert (batched[1] - alone).abs().max() < 1e-3 * alone.abs().max()
    assert 0 <= results["int8"]["quality"]["mean_kl"] < results["int4"]["quality"]["mean_kl"]
    assert results["int4"]["bytes"] < results["int8"]["bytes"] < results["int8"]["source_bytes"]
    data = bytearray((tmp_path / "int8" / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "int8" / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(Exception, match="does not match its recorded sha256"):
        load_run(tmp_path / "int8")


@pytest.mark.parametrize("fields", [{"position": "sinusoidal"}, {"position": "learned", "ffn": "moe", "n_experts": 4}])
def test_a_saved_quantized_run_loads_the_model_that_was_quantized(tiny_run, tmp_path, fields):
    """Built on the meta device at load, so every table must be recomputed and every code loaded:
    the loaded run's logits equal the in-memory quantized model's."""
    tokenizer = load_run(tiny_run).tokenizer
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, d_model=64, max_seq_len=64,
                      layer_pattern="DS", window=8, stride=8, n_global=2, **fields)
    source = tmp_path / "src"
    source.mkdir()
    atomic_write_json(source / "config.json", RunConfig(model=cfg, train=TrainConfig(out=str(source)),
                                                       data=DataConfig(seq_len=64)).to_dict())
    shutil.copy(tiny_run / "tokenizer.json", source / "tokenizer.json")
    save_final(source, HybridLM(cfg))
    quantize_run(source, QuantSpec(to="int4", group_size=32), tmp_path / "q")
    in_memory = load_run(source).model
    quantize_linears(in_memory, quantizable_layers(in_memory), "int4", 32)
    round_embeddings_to_bf16(in_memory)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 40))
    with torch.no_grad():
        assert torch.equal(load_run(tmp_path / "q").model(ids), in_memory(ids))


def test_quality_of_a_model_against_itself_is_exact_and_sensitivity_ranks_every_layer(tiny_run, tmp_path):
    run = load_run(tiny_run)
    text = tmp_path / "eval.txt"
    text.write_text("".join(f"Paragraph {i}: the value of x{i} is {i * 3 % 7}.\n\n" for i in range(200)))
    windows = text_windows(run.tokenizer, text, 64, 1024)
    same = compare_models(run.model, run.model, windows)
    assert same["mean_kl"] == pytest.approx(0, abs=1e-9) and same["same_top_token"] == 1.0
    assert same["delta_ppl"] == 0 and same["tokens_scored"] == len(windows) * 32
    nll = -sum(float(F.log_softmax(run.model(w[None, :-1])[0, 32:].detach(), -1).gather(1, w[33:, None]).sum())
               for w in windows) / same["tokens_scored"]
    assert same["ppl"] == pytest.approx(float(torch.tensor(nll).exp()), rel=1e-5)
    ranked = layer_sensitivity(tiny_run, QuantSpec(to="int4", group_size=32, skip=["blocks.1.attn.*"]), text, 1024)
    layers = [row["layer"] for row in ranked["layers"]]
    assert len(layers) == 6 and not any(name.startswith("blocks.1.attn") for name in layers)
    kls = [row["mean_kl"] for row in ranked["layers"]]
    assert kls == sorted(kls, reverse=True) and kls[0] > 0


def test_quantized_runs_refuse_training_from_them(tiny_run, tiny_shards, tmp_path):
    from hybridlm.train.config import load_run_config
    from hybridlm.train.trainer import train
    quantize_run(tiny_run, QuantSpec(to="int8"), tmp_path / "q")
    cfg = load_run_config(None, TINY_MODEL + [f"data.path={tiny_shards}", f"train.out={tmp_path / 'next'}",
                                        f"train.init_from={tmp_path / 'q'}", "train.steps=1"])
    with pytest.raises(UserError, match="quantized run, made for inference"):
        train(cfg, progress=False)


def test_quantize_cli_and_its_bad_input(cli, tiny_run, tmp_path):
    out = tmp_path / "q4"
    code, stdout, err = cli("quantize", str(tiny_run), "--to", "int4", "--group-size", "32", "--out", str(out),
                            "--json")
    assert code == 0, err
    assert json.loads(stdout)["layers"] == 8 and (out / "manifest.json").is_file()
    code, stdout, err = cli("generate", "--model", str(out), "--prompt", "Paragraph 3:", "--temperature", "0",
                            "--max-new-tokens", "5")
    assert code == 0 and stdout.strip(), err
    text = tmp_path / "eval.txt"
    text.write_text("".join(f"Paragraph {i}: the value of x{i} is {i * 7 % 13}.\n\n" for i in range(40)))
    code, stdout, err = cli("eval", "perplexity", "--model", str(out), "--data", str(text), "--json")
    assert code == 0, err
    quantized_bpb = json.loads(stdout)["bpb"]
    code, stdout, err = cli("eval", "perplexity", "--model", str(tiny_run), "--data", str(text), "--json")
    assert quantized_bpb == pytest.approx(json.loads(stdout)["bpb"], rel=0.05) and quantized_bpb != json.loads(stdout)["bpb"]
    for args, words in [
        (("--to", "int3", "--out", str(tmp_path / "a")), "'int3' is not one of"),
        (("--to", "int4", "--group-size", "48", "--out", str(tmp_path / "a")), "--group-size for int4 must be one of"),
        (("--to", "int4", "--group-size", "256", "--out", str(tmp_path / "a")),
         "does not divide the input width 64 of blocks.0.attn.qkv"),
        (("--to", "int8", "--skip", "blocks.9.*", "--out", str(tmp_path / "a")), "--skip 'blocks.9.*' matches no"),
        (("--to", "int8", "--out", str(out)), "already exists and is not an empty directory"),
        (("--to", "int8", "--sensitivity"), "--sensitivity needs --data"),
        (("--to", "int8"), "give --out DIR"),
    ]:
        code, stdout, err = cli("quantize", str(tiny_run), *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, (args, err)
        assert not (tmp_path / "a").exists()
    code, _, err = cli("quantize", str(out), "--to", "int8", "--out", str(tmp_path / "a"))
    assert code == 2 and "is already quantized (int4)" in err and not (tmp_path / "a").exists()


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_bf16_prefill_through_a_quantized_layer_is_the_fp32_product_rounded_once(kind):
    """More rows than aten's quantized kernels take: the dequantized weight times the rows, in fp32
    and rounded once where the CPU has no native bf16 (widened). Elsewhere the weight is
    dequantized to bf16 first: each weight within a rounding (2^-9 relative), so the product within
    2^-9 of sum |x w|, plus the output's own rounding."""
    from hybridlm.model.decode_kernel_bf16 import widens_bf16

    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(nn.Linear(64, 24), kind, 32)
    x = torch.randn(2, KERNEL_MAX_ROWS[kind], 64).to(torch.bfloat16)
    with torch.no_grad():
        got = layer(x)
        exact = F.linear(x.float(), layer.dequantized(torch.float32), layer.bias.float()).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    if widens_bf16(x):
        assert torch.equal(got, exact)
    weight_rounding = 2**-9 * (x.float().abs() @ layer.dequantized(torch.float32).abs().T)
    assert ((got.float() - exact.float()).abs() <= weight_rounding + 2**-8 * exact.float().abs() + 1e-6).all()
