"""`hybridlm import hf`: a local GPT-2-architecture checkpoint as a dense hybridlm run directory.

GPT-2 is a dense hybridlm model with learned positions, LayerNorm, GELU (tanh) and biases, so its
weights map one to one (gpt2_names in hf_export.py). The tokenizer needs hybridlm's special tokens:
the checkpoint's own end-of-text token (config eos_token_id) becomes <|eos|>, keeping its id, so
generation still starts and stops where GPT-2's documents do; the other special tokens are
appended, and the embedding grows by as many rows, each the mean of the existing rows (a neutral
start that leaves every other logit unchanged). Reading needs neither transformers nor a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer

from hybridlm.config import ModelConfig
from hybridlm.errors import UserError
from hybridlm.fileio import atomic_write_json, read_json, sha256_file
from hybridlm.interop.hf_export import check_empty_out, gpt2_names, staged_dir
from hybridlm.lineage import lineage_record
from hybridlm.model import HybridLM
from hybridlm.run import save_final
from hybridlm.tokenizer import TextTokenizer
from hybridlm.tokenizer.text_tokenizer import SPECIAL_TOKENS
from hybridlm.train.config import DataConfig, RunConfig, TrainConfig

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # hybridlm's GELU is the tanh approximation
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def import_hf(src: Path, out: Path) -> dict:
    """Convert the checkpoint in `src` into a new run directory `out`; returns a summary."""
    src, out = Path(src), Path(out)
    hf_config = read_gpt2_config(src)
    check_empty_out(out)
    if not (src / "tokenizer.json").is_file():
        raise UserError(f"{src} has no tokenizer.json; `hybridlm import hf` needs the fast-tokenizer file "
                        "(write it with AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))")
    weights_path, state = read_weights(src)
    tokenizer, renamed, added = adapt_tokenizer(src / "tokenizer.json", hf_config.get("eos_token_id"))
    cfg = model_config(hf_config, tokenizer.vocab_size)
    model = HybridLM(cfg)
    model.load_state_dict(converted_state(state, cfg), strict=True)
    model.eval()
    run_config = RunConfig(model=cfg, train=TrainConfig(out=str(out)), data=DataConfig(seq_len=min(256, cfg.max_seq_len)))
    with staged_dir(out) as tmp:
        atomic_write_json(tmp / "config.json", run_config.to_dict())
        tokenizer.save(tmp / "tokenizer.json")
        source = {"spec": str(src.resolve()), "kind": "hf-import", "architecture": "gpt2",
                  "weights": weights_path.name, "weights_sha256": sha256_file(weights_path),
                  "config_sha256": sha256_file(src / "config.json")}
        atomic_write_json(tmp / "lineage.json", lineage_record([source], tokenizer.sha256()))
        save_final(tmp, model)
    return {"source": str(src), "out": str(out), "n_layer": cfg.n_layer, "d_model": cfg.d_model,
            "vocab_size": cfg.vocab_size, "source_vocab_size": hf_config["vocab_size"],
            "eos_token": renamed, "added_special_tokens": added,
            "params": sum(p.numel() for p in model.parameters())}


def read_gpt2_config(src: Path) -> dict:
    """config.json of a GPT-2 checkpoint, refusing other architectures and GPT-2 options hybridlm
    does not compute."""
    if not (src / "config.json").is_file():
        raise UserError(f"{src} is not a Hugging Face checkpoint directory (no config.json)")
    config = read_json(src / "config.json", "Hugging Face config")
    model_type = config.get("model_type")
    if model_type != "gpt2":
        raise UserError(f"{src} holds a {model_type!r} checkpoint; `hybridlm import hf` reads GPT-2-architecture "
                        "checkpoints (model_type \"gpt2\") only")
    unsupported = [
        ("activation_function", config.get("activation_function", "gelu_new") in TANH_GELUS),
        ("scale_attn_weights", config.get("scale_attn_weights", True)),
        ("scale_attn_by_inverse_layer_idx", not config.get("scale_attn_by_inverse_layer_idx", False)),
        ("add_cross_attention", not config.get("add_cross_attention", False)),
    ]
    for name, fits in unsupported:
        if not fits:
            raise UserError(f"{src}/config.json sets {name} = {config.get(name)!r}, which hybridlm does not compute")
    return {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
            "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True, **config}


def read_weights(src: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The checkpoint's tensors (safetensors, sharded safetensors or a weights-only torch file),
    with names normalised to GPT2LMHeadModel's and old attention-mask buffers dropped."""
    path = next((src / name for name in WEIGHT_FILES if (src / name).is_file()), None)
    if path is None:
        raise UserError(f"{src} has no weights: looked for {', '.join(WEIGHT_FILES)}")
    try:
        if path.name.endswith(".index.json"):
            shards = sorted(set(read_json(path, "safetensors index")["weight_map"].values()))
            state = {k: v for shard in shards for k, v in load_file(src / shard).items()}
        elif path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, KeyError) as exc:
        raise UserError(f"cannot read the weights in {path} ({exc}); it may be truncated") from None
    normalised = {}
    for name, tensor in state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of older GPT-2 checkpoints, not weights
        if name != "lm_head.weight" and not name.startswith("transformer."):
            name = "transformer." + name  # checkpoints saved from GPT2Model lack the prefix
        normalised[name] = tensor.float()
    return path, normalised


def adapt_tokenizer(path: Path, eos_id: int | None) -> tuple[TextTokenizer, str | None, list[str]]:
    """The checkpoint's tokenizer with hybridlm's special tokens: the end-of-text token renamed
    <|eos|> (same id) when it is a special token, the others appended. Plain text encodes as before:
    hybridlm never matches special-token strings in text."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        hf = Tokenizer.from_str(json.dumps(doc))
    except Exception as exc:  # noqa: BLE001 - the Rust side raises plain Exception with its parse error
        raise UserError(f"{path} is not a valid tokenizer.json ({exc})") from None
    eos, renamed = SPECIAL_TOKENS["eos"], None
    if hf.token_to_id(eos) is None and isinstance(eos_id, int):
        entry = next((t for t in doc.get("added_tokens", []) if t["id"] == eos_id and t.get("special")), None)
        if entry is not None and _rename_in_vocab(doc.get("model", {}), entry["content"], eos):
            renamed, entry["content"] = entry["content"], eos
            hf = Tokenizer.from_str(json.dumps(doc))
    added = [tok for tok in SPECIAL_TOKENS.values() if hf.token_to_id(tok) is None]
    hf.add_special_tokens(added)
    return TextTokenizer(hf), renamed, added


def _rename_in_vocab(model: dict, old: str, new: str) -> bool:
    """Give the model's vocabulary entry `old` the name `new` (id kept); False when it has none."""
    vocab = model.get("vocab")
    if isinstance(vocab, dict) and old in vocab:
        vocab[new] = vocab.pop(old)
        return True
    if isinstance(vocab, list):  # Unigram: [piece, score] pairs, the index is the id
        for entry in vocab:
            if entry[0] == old:
                entry[0] = new
                return True
    return False


def model_config(hf: dict, tokenizer_vocab: int) -> ModelConfig:
    n_layer, d_model = hf["n_layer"], hf["n_embd"]
    return ModelConfig(
        vocab_size=max(hf["vocab_size"], tokenizer_vocab), n_layer=n_layer, n_head=hf["n_head"], d_model=d_model,
        d_ff=hf.get("n_inner") or 4 * d_model, max_seq_len=hf["n_positions"], layer_pattern="D" * n_layer,
        n_global=0, position="learned", norm="layernorm", norm_eps=hf["layer_norm_epsilon"], ffn="gelu",
        bias=True, tie_embeddings=bool(hf["tie_word_embeddings"]),
    )


def converted_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-2 tensors under hybridlm's names; embedding rows added for new tokens are the mean row."""
    missing = [theirs for _, theirs, _ in gpt2_names(cfg.n_layer) if theirs not in state]
    if missing:
        raise UserError(f"the checkpoint lacks {missing[:3]} (expected a GPT2LMHeadModel with {cfg.n_layer} layers)")
    ours = {mine: state[theirs].T if transposed else state[theirs]
            for mine, theirs, transposed in gpt2_names(cfg.n_layer)}
    ours["tok_emb.weight"] = _grow_rows(ours["tok_emb.weight"], cfg.vocab_size)
    if cfg.tie_embeddings:
        ours["lm_head.weight"] = ours["tok_emb.weight"]
    elif "lm_head.weight" in state:
        ours["lm_head.weight"] = _grow_rows(state["lm_head.weight"], cfg.vocab_size)
    else:
        raise UserError("the checkpoint sets tie_word_embeddings = false but has no lm_head.weight")
    return {name: t.contiguous() for name, t in ours.items()}


def _grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    extra = rows - weight.shape[0]
    if extra <= 0:
        return weight
    return torch.cat([weight, weight.mean(dim=0, keepdim=True).expand(extra, -1)])


def format_summary(result: dict) -> str:
    added = result["added_special_tokens"]
    tokens = f"; added special tokens {', '.join(added)}" if added else ""
    eos = f"; {result['eos_token']} is now <|eos|>" if result["eos_token"] else ""
    return (f"wrote {result['out']}: dense {result['n_layer']}-layer model, {result['params']:,} parameters, "
            f"vocab {result['vocab_size']}{eos}{tokens}")
