"""Weight-only quantization of the blocks' Linear layers: per-channel int8 and group-wise int4.

A converter like LoRA (DESIGN.md convention 5): `quantize_linears` swaps chosen `nn.Linear`
modules for `QuantizedLinear` in place; nothing else in the model changes. Embeddings, norms, the
global slots, MoE routers and the output projection stay in their own precision (llama.cpp's choice
too for norms and embeddings: they are small and sensitive).

Stored form (portable, what model.safetensors holds): int8 keeps `qweight` int8 (out, in) and a
bf16 `scales` (out,), w = q * s; int4 keeps two 4-bit codes per byte, `qweight` uint8
(out, in / 2), low nibble first, and bf16 `scales` and `zeros` (out, in / group): w = (q - 8) * s
+ z, asymmetric min-max per group as torchao's int4 weight-only config does. The CPU kernels'
packed layout depends on the machine and torch build, so it is made at first use, never saved.

Which kernel runs (measured in benchmarks/quantization.py, docs/benchmarks.md "Quantization"): on
a CPU, a call with few rows (decoding) goes through `aten._weight_int8pack_mm` /
`aten._weight_int4pack_mm_for_cpu` with bf16 activations, which read the small integer weights
directly; a call with many rows (prefill, scoring) dequantizes the layer once to the activation
dtype and runs one dense matmul, which was faster there than either integer kernel.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from hybridlm.errors import UserError
from hybridlm.model.decode_kernel_bf16 import widens_bf16

KINDS = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what aten's int4 CPU kernel takes
INT4_OUT_MULTIPLE = 16  # aten's int4 CPU packing takes output widths in multiples of 16
DEFAULT_GROUP_SIZE = 64
KERNEL_MAX_ROWS = {"int8": 16, "int4": 64}
"""Calls with at most this many rows use the integer kernels; more rows dequantize and matmul
(int4's unpacking costs more, so its kernel pays off for longer)."""


@dataclass(kw_only=True)
class QuantSpec:
    """What `hybridlm quantize` was asked for: the kind, int4's group size, the layers left alone."""

    to: str
    group_size: int = DEFAULT_GROUP_SIZE
    skip: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.to not in KINDS:
            raise UserError(f"--to must be one of {', '.join(KINDS)} (got {self.to!r})")
        if self.to == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise UserError(f"--group-size for int4 must be one of {', '.join(map(str, INT4_GROUP_SIZES))} "
                            f"(got {self.group_size})")

    def to_dict(self) -> dict:
        return {"to": self.to, "group_size": self.group_size if self.to == "int4" else None, "skip": list(self.skip)}


def quantizable_layers(model: nn.Module) -> list[str]:
    """The blocks' Linear layers (attention qkv/proj, FFN and expert up/down) in model order; an MoE
    router stays in full precision (its small logits decide where every token goes)."""
    return [name for name, module in model.named_modules()
            if name.startswith("blocks.") and isinstance(module, nn.Linear) and not name.endswith(".router")]


def chosen_layers(model: nn.Module, spec: QuantSpec) -> list[str]:
    """The layers `spec` quantizes; a --skip pattern that matches no layer is refused (a typo would
    otherwise quantize everything silently), as is a width int4's groups do not divide."""
    names = quantizable_layers(model)
    for pattern in spec.skip:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise UserError(f"--skip {pattern!r} matches no quantizable layer; they are named like "
                            f"{names[0]} ... {names[-1]} (glob patterns such as 'blocks.*.ffn.*' work)")
    chosen = [name for name in names if not any(fnmatch.fnmatchcase(name, p) for p in spec.skip)]
    if not chosen:
        raise UserError("--skip leaves no layer to quantize")
    if spec.to == "int4":
        for name in chosen:
            layer = model.get_submodule(name)
            if layer.in_features % spec.group_size:
                raise UserError(f"--group-size {spec.group_size} does not divide the input width "
                                f"{layer.in_features} of {name}; choose a group size that divides it, or --skip it")
            if layer.out_features % INT4_OUT_MULTIPLE:
                raise UserError(f"int4 needs output widths divisible by {INT4_OUT_MULTIPLE} (aten's CPU kernel); "
                                f"{name} has {layer.out_features}: --skip it or use --to int8")
    return chosen


def quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric per-output-channel int8: scale = max |w| / 127 (rounded to bf16 before use)."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)
    qweight = torch.round(w / scales.float()[:, None]).clamp(-128, 127).to(torch.int8)
    return {"qweight": qweight, "scales": scales}


def quantize_int4(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """Asymmetric min-max int4 per group of `group_size` inputs, codes 0..15 around 8."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    groups = w.view(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-12).to(torch.bfloat16)
    zeros = (low + 8 * scales.float()).to(torch.bfloat16)
    codes = torch.round((groups - zeros.float()[..., None]) / scales.float()[..., None] + 8).clamp(0, 15)
    codes = codes.to(torch.uint8).view(out_features, in_features)
    return {"qweight": codes[:, 0::2] | (codes[:, 1::2] << 4), "scales": scales, "zeros": zeros}


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """(out, in / 2) uint8 -> (out, in) codes 0..15."""
    return torch.stack([qweight & 0xF, qweight >> 4], dim=-1).flatten(1)


class QuantizedLinear(nn.Module):
    """A Linear layer whose weight is stored as int8 or int4 codes with scales (see the module doc)."""

    def __init__(self, in_features: int, out_features: int, kind: str, group_size: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.kind, self.group_size = in_features, out_features, kind, group_size
        if kind == "int8":
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(out_features, dtype=torch.bfloat16))
        else:
            groups = in_features // group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.bfloat16))
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.bfloat16))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._packed: tuple[torch.device, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str, group_size: int) -> "QuantizedLinear":
        layer = cls(linear.in_features, linear.out_features, kind, group_size, linear.bias is not None)
        codes = quantize_int8(linear.weight) if kind == "int8" else quantize_int4(linear.weight, group_size)
        for name, tensor in codes.items():
            getattr(layer, name).copy_(tensor)
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().clone()
        return layer.to(linear.weight.device)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the codes stand for, (out, in), computed in fp32 and then cast."""
        if self.kind == "int8":
            weight = self.qweight.float() * self.scales.float()[:, None]
        else:
            codes = unpack_int4(self.qweight).float().view(self.out_features, -1, self.group_size)
            weight = (codes - 8) * self.scales.float()[..., None] + self.zeros.float()[..., None]
            weight = weight.view(self.out_features, self.in_features)
        return weight.to(dtype)

    def _kernel_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int4: aten's packed layout of the codes for this CPU and its (groups, out, 2) bf16 scales
        and zeros, made once per device (not at every decoding step)."""
        if self._packed is None or self._packed[0] != self.qweight.device:
            codes = unpack_int4(self.qweight).to(torch.int32)
            scales_and_zeros = torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1).to(torch.bfloat16)
            self._packed = (self.qweight.device, torch._convert_weight_to_int4pack_for_cpu(codes, 1),
                            scales_and_zeros.contiguous())
        return self._packed[1], self._packed[2]

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._packed = None  # new codes: pack again at the next call
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if x.device.type != "cpu" or rows > KERNEL_MAX_ROWS[self.kind]:
            dtype = torch.float32 if widens_bf16(x) else x.dtype  # a prefill in bf16 on a CPU without it
            bias = None if self.bias is None else self.bias.to(dtype)
            return F.linear(x.to(dtype), self.dequantized(dtype), bias).to(x.dtype)
        flat = x.reshape(rows, self.in_features).to(torch.bfloat16)
        if self.kind == "int8":
            y = torch._weight_int8pack_mm(flat, self.qweight, self.scales.to(torch.bfloat16))
        else:
            packed, scales_and_zeros = self._kernel_weight()
            y = torch._weight_int4pack_mm_for_cpu(flat, packed, self.group_size, scales_and_zeros)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.kind == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}{group}"


def quantize_linears(model: nn.Module, layers: list[str], kind: str, group_size: int) -> nn.Module:
    """Replace each named nn.Linear of `model` by its QuantizedLinear, in place."""
    for name in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, QuantizedLinear.from_linear(getattr(parent, child), kind, group_size))
    return model


def empty_quantized(model: nn.Module, layers: list[str], kind: str, group_size: int) -> nn.Module:
    """The structure of a quantized model, codes still zero: what a saved quantized run loads into."""
    for name in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        setattr(parent, child, QuantizedLinear(linear.in_features, linear.out_features, kind, group_size,
                                               linear.bias is not None))
    return model


def dequantize_linears(model: nn.Module) -> nn.Module:
    """Every QuantizedLinear back to an nn.Linear holding the weight its codes stand for (exports)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            parent_name, _, child = name.rpartition(".")
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = module.dequantized()
            if module.bias is not None:
                linear.bias.data = module.bias.detach().float().clone()
            setattr(model.get_submodule(parent_name), child, linear)
    return model


EMBEDDING_TENSORS = ("tok_emb.weight", "pos_emb.weight", "lm_head.weight")
"""Stored in bf16 in a quantized run (in fp32 they would be most of its size); norms, biases, global
slots and routers, all small, keep their precision."""


@torch.no_grad()
def round_embeddings_to_bf16(model: nn.Module) -> None:
    """Give the embedding tables the values their bf16 storage keeps, so what is measured before
    saving is what loads."""
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in EMBEDDING_TENSORS and tensor.is_floating_point():
            tensor.copy_(tensor.to(torch.bfloat16))


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(module, QuantizedLinear) for module in model.modules())
