"""Tensor parallelism (parallel.strategy = "tp"), Megatron-style, on torch.distributed.tensor.parallel.

Every process of the torchrun world holds 1/N of each block: the q/k/v projection and the FFN's
input projection column-wise (each rank computes its own heads and its own hidden units), the
attention output and the FFN's output projection row-wise (partial sums all-reduced), the sparse
layers' global key/value slots split by head. Embeddings, norms and the head stay replicated, and
every rank reads the same batch (data parallelism across ranks is DDP/FSDP's job).

Our q/k/v projection is one Linear whose rows are [q heads | k heads | v heads], and SwiGLU's input
projection one Linear of [gate | up]; a plain column split would hand rank 0 all of q. So their rows
are first reordered rank-major ([q_0 k_0 v_0 | q_1 k_1 v_1 | ...]), which makes each rank's
contiguous shard self-contained, and the module's head counts become the local ones. The reordering
is recorded on the parameter (`tp_segments`): `canonical` undoes it for saving weights and AdamW
moments, `rank_major` redoes it for loading moments, so checkpoints keep the single-process layout
and any layout resumes any other.
"""

from __future__ import annotations

import torch
from torch import nn

from hybridlm.config import ModelConfig
from hybridlm.errors import UserError
from hybridlm.tensors import rank_major


def check_tensor_parallel(cfg: ModelConfig, lora_rank: int, degree: int) -> None:
    """Refuse, by name, what cannot be split `degree` ways (before any process trains)."""
    for name, value in (("n_head", cfg.n_head), ("n_kv_head", cfg.n_kv_head), ("d_ff", cfg.d_ff)):
        if value % degree:
            raise UserError(f"parallel.strategy = \"tp\" splits model.{name} ({value}) across {degree} processes; "
                            f"it must be divisible by {degree}")
    if cfg.ffn == "moe":
        raise UserError("tensor parallelism of mixture-of-experts layers is not implemented; use ddp or fsdp")
    if lora_rank:
        raise UserError("tensor parallelism with LoRA adapters (lora.r > 0) is not implemented; use ddp or fsdp")


def _reorder(linear: nn.Linear, segments: list[int], degree: int) -> None:
    with torch.no_grad():
        for tensor in (linear.weight, linear.bias):
            if tensor is not None:
                tensor.copy_(rank_major(tensor, segments, degree))


def mark_layouts(model: nn.Module, layouts: dict[str, tuple[list[int], int]]) -> None:
    """Record each reordered parameter's row order on it (again, after FSDP2 replaced them)."""
    for name, param in model.named_parameters():
        if name in layouts:
            param.tp_segments = layouts[name]


def apply_tensor_parallel(model: nn.Module, mesh) -> dict[str, tuple[list[int], int]]:
    """Shard every block of `model` in place over the 1-D device mesh `mesh`; return the row order
    of each reordered parameter by name."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    degree, cfg = mesh.size(), model.cfg
    qkv_segments = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
    marks: dict[str, tuple[list[int], int]] = {}
    for index, block in enumerate(model.blocks):
        attn, ffn = block.attn, block.ffn
        layouts = {"attn.qkv": qkv_segments}
        if ffn.gated:
            layouts["ffn.up"] = [cfg.d_ff, cfg.d_ff]
        for name, segments in layouts.items():
            _reorder(block.get_submodule(name), segments, degree)
        parallelize_module(block, mesh, {"attn.qkv": ColwiseParallel(), "attn.proj": RowwiseParallel(),
                                         "ffn.up": ColwiseParallel(), "ffn.down": RowwiseParallel()})
        for name, segments in layouts.items():
            for param_name, _ in block.get_submodule(name).named_parameters():
                marks[f"blocks.{index}.{name}.{param_name}"] = (segments, degree)
        attn.n_head, attn.n_kv_head = cfg.n_head // degree, cfg.n_kv_head // degree
        for slot in ("k_global", "v_global"):
            if getattr(attn, slot) is not None:
                setattr(attn, slot, nn.Parameter(distribute_tensor(getattr(attn, slot).data, mesh, [Shard(0)])))
    mark_layouts(model, marks)
    return marks
