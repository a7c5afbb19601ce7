"""`hybridlm export hf`: a run directory as a Hugging Face transformers checkpoint.

Two layouts. `gpt2` writes a plain GPT-2 checkpoint (GPT2Config, weights renamed to GPT-2's
Conv1D layout) that needs no remote code; only dense models with learned positions, LayerNorm,
GELU, biases, full multi-head attention and tied embeddings fit it. `remote` works for every
config: hybridlm's own weights plus the modelling code (hf_remote/, which imports only torch and
transformers) loaded with trust_remote_code=True. Writing the files needs neither transformers nor
a GPU; the directory appears complete or not at all.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from hybridlm.config import ModelConfig
from hybridlm.errors import UserError
from hybridlm.model.converters.quant import dequantize_linears, is_quantized
from hybridlm.registry.card import render_card
from hybridlm.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from hybridlm.run import LoadedRun, load_run
from hybridlm.tokenizer import TextTokenizer
from hybridlm.tokenizer.text_tokenizer import SPECIAL_TOKENS

FORMATS = ("auto", "remote", "gpt2")
REMOTE_FILES = ("configuration_hybridlm.py", "modeling_hybridlm.py")
REMOTE_FIELDS = frozenset({  # ModelConfig fields the exports implement (gpt2: those gpt2_blocker allows)
    "vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "max_seq_len", "layer_pattern",
    "n_dense_layers", "window", "stride", "n_global", "position", "rope_theta", "norm", "norm_eps", "ffn", "bias",
    "tie_embeddings", "dropout", "moe_pattern", "n_experts", "top_k", "capacity_factor", "eval_capacity_factor",
    "n_shared_experts", "moe_balance",
    "moe_aux_loss", "moe_z_loss", "moe_bias_rate",  # training only: the forward pass does not read them
})
HF_NAMES = {"top_k": "num_experts_per_tok"}
"""ModelConfig fields written under another name (transformers reads `top_k` as a generation setting)."""
_GPT2_LAYER_NAMES = (  # (hybridlm module, GPT-2 module, stored transposed: GPT-2's Conv1D keeps (in, out))
    ("norm1", "ln_1", False), ("attn.qkv", "attn.c_attn", True), ("attn.proj", "attn.c_proj", True),
    ("norm2", "ln_2", False), ("ffn.up", "mlp.c_fc", True), ("ffn.down", "mlp.c_proj", True),
)


def gpt2_names(n_layer: int) -> list[tuple[str, str, bool]]:
    """(hybridlm tensor, GPT2LMHeadModel tensor, transposed) for a dense learned-position model;
    shared with the importer so both directions use one table."""
    names = [("tok_emb.weight", "transformer.wte.weight", False), ("pos_emb.weight", "transformer.wpe.weight", False),
             ("norm_f.weight", "transformer.ln_f.weight", False), ("norm_f.bias", "transformer.ln_f.bias", False)]
    for i in range(n_layer):
        for ours, theirs, transposed in _GPT2_LAYER_NAMES:
            names.append((f"blocks.{i}.{ours}.weight", f"transformer.h.{i}.{theirs}.weight", transposed))
            names.append((f"blocks.{i}.{ours}.bias", f"transformer.h.{i}.{theirs}.bias", False))
    return names


def gpt2_blocker(cfg: ModelConfig) -> str | None:
    """Why GPT-2 cannot express `cfg` (the first field in the way), or None when it can."""
    checks = [
        ("layer_pattern", set(cfg.layer_pattern) == {"D"}, "has sparse layers; GPT-2 layers are all dense"),
        ("position", cfg.position == "learned", "must be learned"),
        ("norm", cfg.norm == "layernorm", "must be layernorm"),
        ("ffn", cfg.ffn == "gelu", "must be gelu"),
        ("bias", cfg.bias, "must be true"),
        ("n_kv_head", cfg.n_kv_head == cfg.n_head, f"must equal model.n_head ({cfg.n_head}); GPT-2 has no GQA"),
        ("tie_embeddings", cfg.tie_embeddings, "must be true"),
    ]
    for name, fits, need in checks:
        if not fits:
            return f"model.{name} = {getattr(cfg, name)!r} {need}"
    return None


def export_hf(run_path: Path, out: Path, fmt: str = "auto") -> dict:
    """Write the run at `run_path` into the new (or empty) directory `out`; returns a summary."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    out = Path(out)
    check_empty_out(out)  # before load_run, which hashes and loads the whole model
    run = load_run(Path(run_path))
    quantized = is_quantized(run.model)
    dequantize_linears(run.model)  # a quantized run exports the weights its codes stand for, exactly
    if unknown := unexported_field(run.model.cfg):
        raise UserError(f"Hugging Face export does not implement {unknown} yet; it needs that field's default")
    blocker = gpt2_blocker(run.model.cfg)
    if fmt == "gpt2" and blocker:
        raise UserError(f"--format gpt2 cannot express this model: {blocker}; use --format remote")
    chosen = "gpt2" if fmt == "gpt2" or (fmt == "auto" and blocker is None) else "remote"
    with staged_dir(out) as tmp:
        write = _write_gpt2 if chosen == "gpt2" else _write_remote
        write(run, tmp)
        _write_tokenizer(run.tokenizer, run.model.cfg, tmp)
        atomic_write_json(tmp / "generation_config.json", _token_ids(run.tokenizer))
        atomic_write_text(tmp / "README.md", render_card(run.path, out.name))  # the model card the Hub shows
        names = sorted(p.name for p in tmp.iterdir())
    return {"run": str(run.path), "out": str(out), "format": chosen, "files": names,
            "gpt2_blocker": blocker, "trust_remote_code": chosen == "remote", "dequantized": quantized}


def check_empty_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty directory; choose a new output path")


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Files go into a hidden sibling directory, renamed to `out` only when all are written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o755)
    if out.is_dir():
        out.rmdir()  # empty (checked before), so the rename can take its place
    os.replace(tmp, out)


def _token_ids(tokenizer: TextTokenizer) -> dict:
    """The ids transformers and lm-eval start and end sequences with. hybridlm puts <|eos|> before
    every document in training and scoring, so it is also the export's BOS: an empty prompt in
    generate() and lm-eval's prefix for an empty context are then the token the model trained on."""
    ids = tokenizer.special_ids
    return {"bos_token_id": ids["eos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    data = {name: t.detach().to(torch.float32).contiguous().cpu() for name, t in tensors.items()}
    atomic_write_bytes(path, st_save(data, metadata={"format": "pt"}))


def unexported_field(cfg: ModelConfig) -> str | None:
    """A config field neither export implements, set away from its default (a field added to
    ModelConfig after this module and hf_remote/ were written must not be dropped silently)."""
    for field in dataclasses.fields(cfg):
        if field.name not in REMOTE_FIELDS and getattr(cfg, field.name) != field.default:
            return f"model.{field.name} = {getattr(cfg, field.name)!r}"
    return None


def _write_remote(run: LoadedRun, out: Path) -> None:
    cfg = run.model.cfg
    state = run.model.state_dict()
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")
    _save_tensors(out / "model.safetensors", state)
    fields = {HF_NAMES.get(k, k): v for k, v in cfg.to_dict().items() if k not in ("tie_embeddings", "n_dense_layers")}
    atomic_write_json(out / "config.json", {
        "model_type": "hybridlm", "architectures": ["HybridLMForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_hybridlm.HybridLMConfig",
                     "AutoModelForCausalLM": "modeling_hybridlm.HybridLMForCausalLM"},
        **fields, "tie_word_embeddings": cfg.tie_embeddings, "dtype": "float32", "torch_dtype": "float32",
        **_token_ids(run.tokenizer),
    })
    templates = files("hybridlm.interop").joinpath("hf_remote")
    for name in REMOTE_FILES:
        atomic_write_text(out / name, templates.joinpath(name).read_text(encoding="utf-8"))


def _write_gpt2(run: LoadedRun, out: Path) -> None:
    cfg = run.model.cfg
    state = run.model.state_dict()
    tensors = {theirs: state[ours].T if transposed else state[ours]
               for ours, theirs, transposed in gpt2_names(cfg.n_layer)}
    _save_tensors(out / "model.safetensors", tensors)
    atomic_write_json(out / "config.json", {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
        "n_inner": cfg.d_ff, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": 0.0,  # hybridlm drops no attention probs
        "scale_attn_weights": True, "tie_word_embeddings": True, "initializer_range": 0.02,
        "dtype": "float32", "torch_dtype": "float32", **_token_ids(run.tokenizer),
    })


def _write_tokenizer(tokenizer: TextTokenizer, cfg: ModelConfig, out: Path) -> None:
    """tokenizer.json and the files AutoTokenizer reads beside it, encoding as training did: a
    post-processor puts <|eos|> (the export's BOS) before the text, so `tok(text)` is <|eos|> +
    hybridlm's ids and `add_special_tokens=False` gives hybridlm's ids alone. add_bos_token makes
    transformers releases that rebuild the post-processor from the config build the same one.
    transformers does match special-token strings inside text, which hybridlm never does."""
    atomic_write_text(out / "tokenizer.json", tokenizer.with_document_prefix().to_str(pretty=True))
    eos = SPECIAL_TOKENS["eos"]
    config = {**tokenizer.hf_config(), "bos_token": eos, "add_bos_token": True, "add_eos_token": False,
              "model_max_length": cfg.max_seq_len, "clean_up_tokenization_spaces": False}
    atomic_write_json(out / "tokenizer_config.json", config)
    special = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
    atomic_write_json(out / "special_tokens_map.json", special)


def format_summary(result: dict) -> str:
    line = f"wrote {result['out']} ({result['format']} format: {', '.join(result['files'])})"
    if result["format"] == "remote":
        line += "\nload it with AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)"
    return line

