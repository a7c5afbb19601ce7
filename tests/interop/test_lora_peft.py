"""LoRA through peft: only adapters train and are saved, in peft's format, which peft itself loads
onto our Hugging Face export with the same logits; merged equals unmerged; bad input is named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hybridlm.data.instructions import BUILTIN_QA
from hybridlm.errors import UserError
from hybridlm.interop.hf_export import export_hf
from hybridlm.interop.lora_merge import merge_lora_run
from hybridlm.model.converters.lora import adapters_disabled, attach_lora, LoraSettings
from hybridlm.model.transformer import Linear
from hybridlm.run import load_run
from hybridlm.tokenizer import train_tokenizer
from hybridlm.train.config import run_config_from_dict
from hybridlm.train.trainer import train

peft = pytest.importorskip("peft")
MODEL = {"preset": "tiny", "n_layer": 2, "d_model": 64, "window": 8, "stride": 8}


def _train(root, name: str, steps: int, **sections) -> None:
    from hybridlm.data import stdlib_docs

    if not (root / "tok.json").exists():
        train_tokenizer([t for q, a in stdlib_docs.qa_pairs() for t in (q, a)], vocab_size=600).save(root / "tok.json")
    doc = {"model": MODEL, "train": {"objective": "sft", "out": str(root / name), "steps": steps, "dtype": "fp32",
                                     **sections.pop("train", {})},
           "data": {"mixture": {BUILTIN_QA: 1.0}, "tokenizer": str(root / "tok.json"), "batch_size": 8, "seq_len": 64},
           "optim": {"lr": 3e-3}, "schedule": {"warmup_steps": 2}, "eval": {"every": 0},
           "checkpoint": {"every": steps}, **sections}
    train(run_config_from_dict(doc), progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    _train(root, "base", 20)
    _train(root, "lora", 20, train={"init_from": str(root / "base")},
           lora={"r": 4, "alpha": 8.0, "targets": ["attn.qkv", "ffn.down"]}, optim={"lr": 1e-2})
    return root


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(8, vocab, (2, 40), generator=torch.Generator().manual_seed(0))


def test_only_adapters_train_and_only_they_are_saved(runs):
    base, adapted = load_run(runs / "base").model, load_run(runs / "lora").model
    saved = load_file(runs / "lora" / "adapter_model.safetensors")
    assert not (runs / "lora" / "model.safetensors").exists()
    assert sorted(saved) == sorted(f"base_model.model.blocks.{i}.{m}.lora_{ab}.weight"
                                   for i in range(2) for m in ("attn.qkv", "ffn.down") for ab in "AB")
    assert all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # training moved B off zero
    for name, value in base.state_dict().items():  # the base weights inside the LoRA model are untouched
        inside = name.replace("attn.qkv.", "attn.qkv.base_layer.").replace("ffn.down.", "ffn.down.base_layer.")
        assert torch.equal(adapted.state_dict()[inside], value), name
    config = json.loads((runs / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and sorted(config["target_modules"]) == [
        "attn.qkv", "ffn.down"] and config["base_model_name_or_path"] == str(runs / "base")

    fresh = attach_lora(load_run(runs / "base").model, LoraSettings(r=2, alpha=4.0, targets=["attn.proj"]))
    fresh(_ids(600), targets_BT=_ids(600)).backward()
    with_grad = {n for n, p in fresh.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_" in n for n in with_grad)


def test_peft_loads_the_adapters_onto_the_hf_export_with_the_same_logits(runs):
    from transformers import AutoModelForCausalLM

    export_hf(runs / "base", runs / "base_hf", "remote")
    hf = AutoModelForCausalLM.from_pretrained(runs / "base_hf", trust_remote_code=True, dtype=torch.float32)
    adapted_hf = peft.PeftModel.from_pretrained(hf, runs / "lora").eval()
    ours = load_run(runs / "lora").model
    ids = _ids(ours.cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(adapted_hf(input_ids=ids).logits, ours(ids), atol=1e-5, rtol=0)
        with adapted_hf.disable_adapter(), adapters_disabled(ours):
            torch.testing.assert_close(adapted_hf(input_ids=ids).logits, ours(ids), atol=1e-5, rtol=0)
            torch.testing.assert_close(ours(ids), load_run(runs / "base").model(ids), atol=1e-6, rtol=0)
        assert (ours(ids) - load_run(runs / "base").model(ids)).abs().max() > 1e-3  # adapters back on


def test_merged_run_gives_the_unmerged_logits(runs):
    result = merge_lora_run(runs / "lora", runs / "merged")
    merged, unmerged = load_run(runs / "merged").model, load_run(runs / "lora").model
    ids = _ids(merged.cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), unmerged(ids), atol=2e-5, rtol=0)
    assert result["base"] == str(runs / "base") and (runs / "merged" / "model.safetensors").is_file()
    assert type(merged.blocks[0].attn.qkv) is Linear  # the model's own layer, no adapter around it
    with pytest.raises(UserError, match="has no LoRA adapters"):
        merge_lora_run(runs / "merged", runs / "again")


def test_bad_lora_settings_are_named_before_training(runs):
    with pytest.raises(UserError, match=r"lora.targets 'attn.q' matches no Linear layer; the model has .*attn.qkv"):
        _train(runs, "bad1", 2, train={"init_from": str(runs / "base")}, lora={"r": 2, "targets": ["attn.q"]})
    with pytest.raises(UserError, match="lora.alpha is set but lora.r is 0"):
        _train(runs, "bad2", 2, lora={"alpha": 4.0})
    with pytest.raises(UserError, match="no base to adapt"):
        _train(runs, "bad3", 2, lora={"r": 2})


def test_adapters_refuse_a_base_whose_weights_changed(runs, tmp_path):
    import shutil

    for name in ("base", "lora"):
        shutil.copytree(runs / name, tmp_path / name)
    config = json.loads((tmp_path / "lora" / "config.json").read_text())
    config["train"]["init_from"] = str(tmp_path / "base")
    (tmp_path / "lora" / "config.json").write_text(json.dumps(config))
    from hybridlm.run import write_manifest

    write_manifest(tmp_path / "lora", ["adapter_model.safetensors", "adapter_config.json", "config.json",
                                       "tokenizer.json"])
    load_run(tmp_path / "lora")  # the same base weights, copied: fine
    shutil.rmtree(tmp_path / "base")
    _train(tmp_path, "base", 3)
    with pytest.raises(UserError, match="trained on other base weights"):
        load_run(tmp_path / "lora")
