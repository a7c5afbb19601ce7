"""`hybridlm export gguf`: every tensor and the tokenizer read back with gguf's own reader, and the
f16 file loaded by transformers' independent GGUF loader, which must give our logits and tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hf_families import make_run
from hybridlm.config import ModelConfig
from hybridlm.interop.gguf_export import export_gguf, tensor_names
from hybridlm.model.converters.quant import QuantSpec
from hybridlm.quantize.writer import quantize_run
from hybridlm.run import load_run
from hybridlm.tokenizer import TextTokenizer

gguf = pytest.importorskip("gguf", reason="the gguf package is in the [dev] extra the test command installs")

GPT2_SHAPED = {"n_layer": 2, "n_head": 4, "d_model": 64, "d_ff": 128, "max_seq_len": 64, "layer_pattern": "DD",
               "position": "learned", "norm": "layernorm", "ffn": "gelu", "bias": True}
BOUND = {"q8_0": (0.5 + 127 / 2048) / 127, "q4_0": (1 + 8 / 2048) / 8}
"""Largest error per block as a share of its largest |weight|. q8_0's step is max / 127: rounding errs
by half a step, plus the fp16 rounding of the scale (2^-11 of it on up to 127 steps). q4_0's step is
max / 8 with codes -8..7 signed towards the largest weight, so a weight of the other sign near that
size clamps at 7 and errs by up to a whole step."""


@pytest.fixture(scope="module")
def gpt2_run(tiny_run, tmp_path_factory):
    tokenizer = TextTokenizer.load(tiny_run / "tokenizer.json")
    root = tmp_path_factory.mktemp("gguf")
    return make_run(root, ModelConfig(vocab_size=tokenizer.vocab_size, **GPT2_SHAPED), tiny_run / "tokenizer.json")


def _field(reader, name):
    field = reader.fields[name]
    return field.contents()


@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0"])
def test_every_tensor_and_the_tokenizer_read_back(gpt2_run, tmp_path, kind):
    out = tmp_path / f"model-{kind}.gguf"
    result = export_gguf(gpt2_run, out, kind)
    assert out.is_file() and result["bytes"] == out.stat().st_size
    run = load_run(gpt2_run)
    state = run.model.state_dict()
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {theirs for _, theirs in tensor_names(2)}
    for ours, theirs in tensor_names(2):
        want = state[ours].float().numpy()
        tensor = tensors[theirs]
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
        if theirs.startswith("blk.") and want.ndim == 2 and kind != "f16":
            assert tensor.tensor_type.name == kind.upper()
            blocks = np.abs(want).reshape(-1, 32).max(axis=1, keepdims=True)
            error = np.abs(got - want).reshape(-1, 32)
            assert (error <= blocks * BOUND[kind] + 1e-7).all(), theirs
        else:
            assert tensor.tensor_type.name == ("F32" if want.ndim == 1 else "F16"), theirs
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    assert _field(reader, "general.architecture") == "gpt2"
    assert _field(reader, "gpt2.context_length") == 64 and _field(reader, "gpt2.block_count") == 2
    assert _field(reader, "gpt2.attention.head_count") == 4 and _field(reader, "gpt2.feed_forward_length") == 128
    assert _field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(run.model.cfg.norm_eps)
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    spec = json.loads(run.tokenizer.to_json())
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert {token: i for i, token in enumerate(tokens)} == spec["model"]["vocab"]
    assert _field(reader, "tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m
                                                       for m in spec["model"]["merges"]]
    assert _field(reader, "tokenizer.ggml.eos_token_id") == run.tokenizer.eos_id
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[run.tokenizer.eos_id] == gguf.TokenType.CONTROL and types[200] == gguf.TokenType.NORMAL


def test_transformers_reads_the_f16_file_as_our_model(gpt2_run, tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    export_gguf(gpt2_run, tmp_path / "model.gguf", "f16")
    # transformers' GGUF mapping reads gpt2.context_length and feed_forward_length into attributes
    # GPT2Config does not use (n_ctx, feed_forward_length), so those two go in by hand, from the file
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    config = GPT2Config.from_pretrained(tmp_path, gguf_file="model.gguf")
    config.n_positions, config.n_inner = _field(reader, "gpt2.context_length"), _field(reader, "gpt2.feed_forward_length")
    model = GPT2LMHeadModel.from_pretrained(tmp_path, gguf_file="model.gguf", config=config,
                                            dtype=torch.float32).eval()
    run = load_run(gpt2_run)
    text = "Paragraph 7: the value of x7 is 10."
    ids = torch.tensor(run.tokenizer.encode(text))[None]
    with torch.no_grad():
        theirs, ours = model(ids).logits, run.model(ids)
    assert (theirs - ours).abs().max() < 2e-2 * ours.abs().max()  # f16 weights
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == run.tokenizer.encode(text)


def test_a_quantized_run_exports_what_its_codes_stand_for(gpt2_run, tmp_path):
    quantize_run(gpt2_run, QuantSpec(to="int8"), tmp_path / "q8")
    result = export_gguf(tmp_path / "q8", tmp_path / "q8.gguf", "f16")
    assert result["dequantized"]
    reader = gguf.GGUFReader(str(tmp_path / "q8.gguf"))
    qkv = next(t for t in reader.tensors if t.name == "blk.0.attn_qkv.weight")
    want = load_run(tmp_path / "q8").model.blocks[0].attn.qkv.dequantized().numpy()
    np.testing.assert_allclose(gguf.quants.dequantize(qkv.data, qkv.tensor_type).reshape(want.shape), want,
                               rtol=1e-3, atol=1e-4)


def test_bad_input_is_refused_in_one_line_and_writes_nothing(cli, gpt2_run, tiny_run, tmp_path):
    narrow = make_run(tmp_path / "narrow", ModelConfig(vocab_size=load_run(tiny_run).tokenizer.vocab_size,
                                                       **{**GPT2_SHAPED, "d_ff": 48}), tiny_run / "tokenizer.json")
    taken = tmp_path / "taken.gguf"
    taken.write_bytes(b"x")
    for args, words in [
        ((str(tiny_run), str(tmp_path / "a.gguf")), "sparse layers, which llama.cpp cannot run"),
        ((str(narrow), str(tmp_path / "a.gguf"), "--type", "q4_0"), "blk.0.ffn_down.weight has rows of 48"),
        ((str(gpt2_run), str(tmp_path / "a.gguf"), "--type", "q5_1"), "'q5_1' is not one of"),
        ((str(gpt2_run), str(taken)), "already exists"),
    ]:
        code, out, err = cli("export", "gguf", *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["narrow", "taken.gguf"]
