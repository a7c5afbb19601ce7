"""`hybridlm export gguf`: a dense GPT-2-shaped run as a GGUF file for the llama.cpp family of tools.

The file uses llama.cpp's `gpt2` architecture, written through the `gguf` package (llama.cpp's
own writer) with metadata set here rather than by llama.cpp's converter, which cannot read our
Hugging Face export (no `n_ctx`, an unknown pre-tokenizer). Our tokenizer is byte-level BPE with
GPT-2's split regex, so the file says `tokenizer.ggml.model = gpt2`, `pre = gpt-2`, and carries
the vocabulary in id order (special tokens as control tokens) and the merges.

Types: the blocks' matrices take the chosen type (f16, q8_0 or q4_0: 32-weight blocks, one fp16
scale each); token and position embeddings stay f16 (hybridlm's own quantizer keeps embeddings
too); norms and biases f32, as llama.cpp stores them. The tied output projection is written as
`output.weight` (a copy of the embeddings), as llama.cpp's GPT-2 converter does. A quantized run
is exported from the weights its codes stand for.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from hybridlm.errors import UserError
from hybridlm.interop.hf_export import gpt2_blocker
from hybridlm.model.converters.quant import dequantize_linears, is_quantized
from hybridlm.run import LoadedRun, load_run
from hybridlm.tokenizer import TextTokenizer

TYPES = ("f16", "q8_0", "q4_0")
BLOCK = 32  # weights per q8_0 / q4_0 block
_LAYER_TENSORS = (  # (hybridlm module, llama.cpp tensor)
    ("norm1", "attn_norm"), ("attn.qkv", "attn_qkv"), ("attn.proj", "attn_output"),
    ("norm2", "ffn_norm"), ("ffn.up", "ffn_up"), ("ffn.down", "ffn_down"),
)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the gguf package: pip install 'hybridlm[gguf]'") from None
    return gguf


def tensor_names(n_layer: int) -> list[tuple[str, str]]:
    """(hybridlm tensor, GGUF tensor) for every tensor of a GPT-2-shaped model."""
    names = [("tok_emb.weight", "token_embd.weight"), ("pos_emb.weight", "position_embd.weight"),
             ("norm_f.weight", "output_norm.weight"), ("norm_f.bias", "output_norm.bias"),
             ("tok_emb.weight", "output.weight")]
    for i in range(n_layer):
        for ours, theirs in _LAYER_TENSORS:
            names += [(f"blocks.{i}.{ours}.weight", f"blk.{i}.{theirs}.weight"),
                      (f"blocks.{i}.{ours}.bias", f"blk.{i}.{theirs}.bias")]
    return names


def _tensor_type(gguf, name: str, tensor: torch.Tensor, kind: str):
    types = gguf.GGMLQuantizationType
    if tensor.dim() == 1:
        return types.F32
    if not name.startswith("blk.") or kind == "f16":
        return types.F16
    if tensor.shape[1] % BLOCK:
        raise UserError(f"--type {kind} packs rows in blocks of {BLOCK}; {name} has rows of {tensor.shape[1]}: "
                        "use --type f16")
    return types.Q8_0 if kind == "q8_0" else types.Q4_0


def _add_tokenizer(writer, tokenizer: TextTokenizer) -> None:
    spec = json.loads(tokenizer.to_json())
    vocab = spec["model"]["vocab"]
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = {entry["id"] for entry in spec.get("added_tokens", []) if entry.get("special")}
    token_type = _gguf().TokenType
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([token_type.CONTROL if i in special else token_type.NORMAL for i in range(len(tokens))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    ids = tokenizer.special_ids
    writer.add_bos_token_id(ids["eos"])  # hybridlm starts every document with <|eos|> (see hf_export)
    writer.add_eos_token_id(ids["eos"])
    writer.add_pad_token_id(ids["pad"])
    writer.add_add_bos_token(True)


def _write(run: LoadedRun, path: Path, kind: str, name: str) -> dict:
    gguf = _gguf()
    cfg, state = run.model.cfg, run.model.state_dict()
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_name(name)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(cfg.norm_eps)
    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                  "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    writer.add_file_type(file_types[kind])
    _add_tokenizer(writer, run.tokenizer)
    counts: dict[str, int] = {}
    for ours, theirs in tensor_names(cfg.n_layer):
        tensor = state[ours].detach().float().cpu()
        qtype = _tensor_type(gguf, theirs, tensor, kind)
        data = tensor.numpy()
        if qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(theirs, data.astype(np.float16))
        elif qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(theirs, data.astype(np.float32))
        else:
            writer.add_tensor(theirs, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def export_gguf(run_path: Path, out: Path, kind: str = "f16") -> dict:
    """Write the run at `run_path` as the GGUF file `out` (atomically); returns a summary."""
    if kind not in TYPES:
        raise UserError(f"--type must be one of {', '.join(TYPES)} (got {kind!r})")
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; choose a new file name")
    run = load_run(Path(run_path))
    cfg = run.model.cfg
    if "S" in cfg.layer_pattern:
        raise UserError(f"GGUF export needs an all-dense model: model.layer_pattern = {cfg.layer_pattern!r} has "
                        "sparse layers, which llama.cpp cannot run (it has no sliding-window + strided attention); "
                        "`hybridlm export hf --format remote` keeps them")
    if blocker := gpt2_blocker(cfg):
        raise UserError(f"GGUF export writes llama.cpp's gpt2 architecture, which cannot express this model: {blocker}")
    quantized = is_quantized(run.model)
    dequantize_linears(run.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    os.close(fd)
    try:
        counts = _write(run, Path(tmp), kind, run.path.name)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"run": str(run.path), "out": str(out), "type": kind, "bytes": out.stat().st_size,
            "tensor_types": counts, "dequantized": quantized}
