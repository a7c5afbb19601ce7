"""Hugging Face export and import: same logits (fp32, atol 1e-4), same greedy tokens, same token
ids, and one-line errors for bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from conftest import one_line_error, shared_file
from hf_families import REMOTE_CONFIGS, family_run, make_run

from hybridlm.config import ModelConfig
from hybridlm.errors import UserError
from hybridlm.inference.decode import generate_ids
from hybridlm.inference.sampling import SamplingParams
from hybridlm.interop.hf_export import export_hf
from hybridlm.interop.hf_import import import_hf
from hybridlm.run import load_run
from hybridlm.tokenizer import TextTokenizer

transformers = pytest.importorskip("transformers")

ATOL = 1e-4


def hybridlm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybridlm", *args], capture_output=True, text=True, timeout=300,
                          check=False)


def _bad(cli, needle: str, *args: str) -> None:
    """The CLI's entry point in this process (the same code as the console script): exit 2 and one
    line on stderr that names the problem."""
    result = cli(*args)
    one_line_error(result, needle)
    assert not result[1], result[1]


def _load_remote(out: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, local_files_only=True,
                                                dtype=torch.float32).eval()


def _random_ids(vocab: int, batch: int = 2, length: int = 48) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _assert_same_logits(run_dir: Path, hf_model, length: int = 48) -> None:
    model = load_run(run_dir).model
    ids = _random_ids(model.cfg.vocab_size, length=length)
    ours = model(ids)
    theirs = hf_model(ids).logits
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    masked = hf_model(ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(masked, ours, atol=ATOL, rtol=0)


@torch.no_grad()
def _assert_left_padding_is_transparent(run_dir: Path, hf_model, length: int = 40, pad: int = 9) -> None:
    """A left-padded row (attention_mask 0 on the padding) gives the logits of its tokens alone."""
    model = load_run(run_dir).model
    ids = _random_ids(model.cfg.vocab_size, batch=1, length=length)
    padded = torch.cat([torch.zeros(1, pad, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(ids)], dim=1)
    logits = hf_model(padded, attention_mask=mask).logits
    torch.testing.assert_close(logits[:, pad:], model(ids), atol=ATOL, rtol=0)
    assert torch.isfinite(logits).all()


@torch.no_grad()
def _assert_cache_continues_the_sequence(hf_model, vocab: int, length: int = 40, pad: int = 7) -> None:
    """Feeding a left-padded batch through the KV cache (a prefix, then single tokens and a chunk)
    gives the logits of one whole forward pass, and cached greedy generation equals uncached."""
    from transformers import DynamicCache

    ids = _random_ids(vocab, batch=2, length=length)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0  # row 0 is left-padded
    whole = hf_model(ids, attention_mask=mask).logits
    cache, pieces, at = DynamicCache(config=hf_model.config), [], 0
    for end in (pad + 5, pad + 6, pad + 7, length - 3, length - 2, length):
        pieces.append(hf_model(ids[:, at:end], attention_mask=mask[:, :end], past_key_values=cache,
                               use_cache=True).logits)
        at = end
    assert cache.get_seq_length() == length
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="give the mask of every token so far"):
        hf_model(ids[:, -1:], attention_mask=mask[:, -1:], past_key_values=cache, use_cache=True)
    fed = []  # tokens per forward call: generate() must feed the prompt once, then one token per step
    hook = hf_model.register_forward_pre_hook(lambda _, args, kwargs: fed.append(kwargs["input_ids"].shape[1]),
                                              with_kwargs=True)
    try:
        cached = hf_model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    finally:
        hook.remove()
    assert fed == [length, 1, 1, 1, 1, 1]
    uncached = hf_model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, min_new_tokens=6,
                                 use_cache=False)
    assert torch.equal(cached, uncached)


def test_remote_export_of_the_trained_run_matches_logits_and_greedy_decoding(tiny_run, tmp_path):
    out = tmp_path / "remote_tiny"
    result = export_hf(tiny_run, out)
    assert result["format"] == "remote" and "layer_pattern" in result["gpt2_blocker"]
    for name in ("config.json", "model.safetensors", "configuration_hybridlm.py", "modeling_hybridlm.py",
                 "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert (out / name).is_file(), name
    assert ModelCard.load(out / "README.md").data.library_name == "hybridlm"  # the model card, as the Hub reads it
    for name in ("configuration_hybridlm.py", "modeling_hybridlm.py"):  # loadable without hybridlm installed
        assert not re.search(r"^\s*(from|import)\s+hybridlm\b", (out / name).read_text(), re.MULTILINE)
    hf_model = _load_remote(out)
    _assert_same_logits(tiny_run, hf_model)
    _assert_left_padding_is_transparent(tiny_run, hf_model)
    _assert_cache_continues_the_sequence(hf_model, hf_model.config.vocab_size)

    run = load_run(tiny_run)
    tok = run.tokenizer
    prompt = [tok.eos_id] + tok.encode("Paragraph 12: the value of")
    ours = list(generate_ids(run.model, prompt, SamplingParams(temperature=0, max_new_tokens=8), eos_id=tok.eos_id))
    generated = hf_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    assert generated[0, len(prompt):].tolist() == ours


@pytest.mark.parametrize("name", list(REMOTE_CONFIGS))
def test_remote_export_matches_logits_for_each_config_family(name, tiny_run, tmp_path):
    run = family_run(name, tiny_run, tmp_path)
    out = tmp_path / f"remote_{name.replace('-', '_')}"
    assert export_hf(run, out, "auto")["format"] == "remote"
    hf_model = _load_remote(out)
    _assert_same_logits(run, hf_model, length=60)
    _assert_left_padding_is_transparent(run, hf_model)
    _assert_cache_continues_the_sequence(hf_model, hf_model.config.vocab_size)


def test_remote_moe_drops_the_tokens_hybridlm_drops_when_capacity_binds(tiny_run, tmp_path):
    run = family_run("moe-top2-shared-bias", tiny_run, tmp_path, eval_capacity_factor=0.5)
    out = tmp_path / "remote_moe"
    export_hf(run, out, "remote")
    hf_model = _load_remote(out)
    model = load_run(run).model
    ids = _random_ids(model.cfg.vocab_size, length=60)
    with torch.no_grad():
        unlimited = model.blocks[0].ffn(model.blocks[0].norm2(model.embed(ids, torch.arange(60))), limited=False)
        limited = model.blocks[0].ffn(model.blocks[0].norm2(model.embed(ids, torch.arange(60))))
    assert (unlimited - limited).abs().max() > 1e-3  # the limit binds: some tokens skip an expert
    _assert_same_logits(run, hf_model, length=60)
    _assert_left_padding_is_transparent(run, hf_model)


def test_exported_tokenizer_encodes_like_hybridlm(tiny_run, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out = tmp_path / "tok_export"
    export_hf(tiny_run, out, "remote")
    text = shared_file("tokenizer/UTF-8-demo.txt").read_text(encoding="utf-8")
    ours = TextTokenizer.load(tiny_run / "tokenizer.json")
    theirs = AutoTokenizer.from_pretrained(out, trust_remote_code=True, local_files_only=True)
    assert isinstance(theirs, PreTrainedTokenizerFast)
    ids = ours.encode(text)
    assert theirs(text)["input_ids"] == [ours.eos_id, *ids]  # <|eos|> before the text, as in training
    assert theirs.encode(text, add_special_tokens=False) == ids
    assert theirs.decode(ids) == ours.decode(ids) == text
    assert (theirs.eos_token_id, theirs.bos_token_id, theirs.pad_token_id) == (ours.eos_id, ours.eos_id,
                                                                             ours.special_ids["pad"])
    assert theirs("")["input_ids"] == [ours.eos_id]


GPT2_SHAPED = {"n_layer": 2, "n_head": 4, "d_model": 32, "d_ff": 48, "max_seq_len": 64, "layer_pattern": "DD",
               "position": "learned", "norm": "layernorm", "ffn": "gelu", "bias": True}


def test_gpt2_export_loads_as_plain_gpt2(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    tokenizer = TextTokenizer.load(tiny_run / "tokenizer.json")
    run = make_run(tmp_path, ModelConfig(vocab_size=tokenizer.vocab_size, **GPT2_SHAPED), tiny_run / "tokenizer.json")
    out = tmp_path / "gpt2_export"
    result = export_hf(run, out)
    assert result["format"] == "gpt2" and not result["trust_remote_code"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    assert not list(out.glob("*.py"))
    model = GPT2LMHeadModel.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    _assert_same_logits(run, model, length=64)
    assert isinstance(AutoModelForCausalLM.from_pretrained(out, local_files_only=True), GPT2LMHeadModel)
    text = "Paragraph 7: the value of x7 is 10. naïve 😀"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == [tokenizer.eos_id, *tokenizer.encode(text)]


def test_gpt2_format_names_the_first_field_in_the_way(tiny_run, tmp_path):
    with pytest.raises(UserError, match="model.layer_pattern"):
        export_hf(tiny_run, tmp_path / "a", "gpt2")
    tokenizer = TextTokenizer.load(tiny_run / "tokenizer.json")
    rope = ModelConfig(vocab_size=tokenizer.vocab_size, **{**GPT2_SHAPED, "position": "rope"})
    with pytest.raises(UserError, match="model.position"):
        export_hf(make_run(tmp_path, rope, tiny_run / "tokenizer.json"), tmp_path / "b", "gpt2")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _gpt2_checkpoint(root: Path, weights: str) -> tuple[Path, object, object]:
    """A random GPT2LMHeadModel (every tensor perturbed) saved with a byte-level BPE tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([f"Sentence {i}: the quick brown fox jumps over {i % 7} lazy dogs." for i in range(300)],
                            trainer=trainer)
    eos = tok.token_to_id("<|endoftext|>")
    config = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    src = root / f"gpt2_{weights}"
    if weights == "safetensors":
        model.save_pretrained(src)
    else:
        config.save_pretrained(src)
        torch.save(model.state_dict(), src / "pytorch_model.bin")
    tok.save(str(src / "tokenizer.json"))
    return src, model, tok


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
@torch.no_grad()
def test_import_gpt2_checkpoint_gives_the_same_logits(weights, tmp_path):
    src, gpt2, tok = _gpt2_checkpoint(tmp_path, weights)
    result = import_hf(src, tmp_path / "imported")
    run = load_run(tmp_path / "imported")
    vocab = gpt2.config.vocab_size
    assert result["eos_token"] == "<|endoftext|>" and run.tokenizer.eos_id == gpt2.config.eos_token_id
    assert run.model.cfg.vocab_size == vocab + len(result["added_special_tokens"]) == vocab + 7
    ids = _random_ids(vocab, length=64)
    torch.testing.assert_close(run.model(ids)[..., :vocab], gpt2(ids).logits, atol=ATOL, rtol=0)
    text = "Sentence 12: the quick brown fox, naïve café 😀"
    assert run.tokenizer.encode(text) == tok.encode(text, add_special_tokens=False).ids


def test_imported_run_generates_from_the_cli(tmp_path):
    src, _, _ = _gpt2_checkpoint(tmp_path, "safetensors")
    out = tmp_path / "imported_cli"
    result = hybridlm("import", "hf", str(src), str(out), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["out"] == str(out)
    for name in ("config.json", "tokenizer.json", "model.safetensors", "manifest.json", "lineage.json"):
        assert (out / name).is_file(), name
    generated = hybridlm("generate", "--model", str(out), "--prompt", "Sentence 3", "--max-new-tokens", "4",
                         "--temperature", "0", "--dtype", "fp32", "--json")
    assert generated.returncode == 0, generated.stderr
    assert "text" in json.loads(generated.stdout)


def test_bad_input_gets_one_line_and_exit_2(tiny_run, tmp_path, cli):
    _bad(cli, "not a hybridlm run directory", "export", "hf", str(tmp_path / "nothing"), str(tmp_path / "o1"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    _bad(cli, "not an empty directory", "export", "hf", str(tiny_run), str(full))
    _bad(cli, "model.layer_pattern", "export", "hf", str(tiny_run), str(tmp_path / "o2"), "--format", "gpt2")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _bad(cli, "'llama'", "import", "hf", str(llama), str(tmp_path / "o3"))
    src, _, _ = _gpt2_checkpoint(tmp_path, "safetensors")
    (src / "tokenizer.json").unlink()
    _bad(cli, "tokenizer.json", "import", "hf", str(src), str(tmp_path / "o4"))
    _bad(cli, "no config.json", "import", "hf", str(tmp_path / "nothing"), str(tmp_path / "o5"))
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))
    assert not list(tmp_path.glob(".o*"))  # no staging directory left behind


@torch.no_grad()
def test_the_export_takes_the_cache_under_either_name_and_refuses_what_it_does_not_implement(tiny_run, tmp_path):
    """`cache` (transformers >= 5.24) and `past_key_values` (earlier) both continue a sequence;
    anything else (another cache name, attention outputs, a cache_position that does not follow
    the cache) is an error, never dropped."""
    from transformers import DynamicCache

    out = tmp_path / "remote_args"
    export_hf(tiny_run, out, "remote")
    hf_model = _load_remote(out)
    ids = _random_ids(hf_model.config.vocab_size, batch=1, length=12)
    whole = hf_model(ids).logits
    for name in ("cache", "past_key_values"):
        cache = DynamicCache(config=hf_model.config)
        head = hf_model(ids[:, :8], use_cache=True, **{name: cache}).logits
        tail = hf_model(ids[:, 8:], use_cache=True, **{name: cache}).logits
        torch.testing.assert_close(torch.cat([head, tail], dim=1), whole, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="pass the cache once"):
        hf_model(ids, cache=DynamicCache(config=hf_model.config), past_key_values=DynamicCache(config=hf_model.config))
    with pytest.raises(TypeError, match=r"unsupported argument\(s\) \['cache_params'\]"):
        hf_model(ids, cache_params=DynamicCache(config=hf_model.config))
    with pytest.raises(ValueError, match="output_attentions=True is not implemented"):
        hf_model(ids, output_attentions=True)
    with pytest.raises(ValueError, match="does not continue the 0 cached tokens"):
        hf_model(ids, cache_position=torch.arange(3, 3 + ids.shape[1]))
    torch.testing.assert_close(hf_model(ids, cache_position=torch.arange(ids.shape[1])).logits, whole)


def test_the_special_tokens_map_names_tokens_only(tiny_run, tmp_path):
    out = tmp_path / "map_export"
    export_hf(tiny_run, out, "remote")
    special = json.loads((out / "special_tokens_map.json").read_text())
    assert special == {"bos_token": "<|eos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "mask_token": "<|mask|>"}
