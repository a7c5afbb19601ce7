"""Cross-entropy fused with the output projection, computed a chunk of tokens at a time.

The plain way (logits = lm_head(h); F.cross_entropy(logits.float(), y)) materialises fp32 logits
of tokens x vocab, their log-softmax and its gradient: 0.5 GB each at 16,384 tokens and vocabulary
8192, and on the CPU the fresh pages alone cost more than the arithmetic (the profile of a `small`
training step at T = 16384 showed 2 of its 9 s in log-softmax, its backward, copies and fills).
Here each chunk's logits live only inside the loop; the backward pass recomputes them from the
saved log-sum-exp, as FlashAttention does for attention scores. bf16 logits on the avx512_bf16
path go through two C++ passes (glue_kernels_bf16.py) instead of an fp32 copy and five ops.
"""

from __future__ import annotations

import torch

from hybridlm.model.glue_kernels_bf16 import cross_entropy_grad, cross_entropy_kernel_applies, cross_entropy_rows

IGNORE_INDEX = -100  # targets with this value add no loss (prompt tokens, padding), as in PyTorch
CHUNK_ELEMENTS = 1 << 22  # logits per chunk (16 MB in fp32): tokens per chunk = this // vocab


def _chunks(n: int, vocab: int) -> list[tuple[int, int]]:
    size = max(1, CHUNK_ELEMENTS // vocab)
    return [(s, min(n, s + size)) for s in range(0, n, size)]


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of softmax(hidden @ weight.T) against targets; softmax math in fp32."""

    @staticmethod
    def forward(ctx, hidden_NC: torch.Tensor, weight_VC: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
        valid_N = targets_N != IGNORE_INDEX
        safe_N = targets_N.clamp(min=0)
        lse_N = torch.empty(hidden_NC.shape[0], dtype=torch.float32, device=hidden_NC.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden_NC.device)
        for s, e in _chunks(hidden_NC.shape[0], weight_VC.shape[0]):
            logits = hidden_NC[s:e] @ weight_VC.T
            if cross_entropy_kernel_applies(logits):  # bf16 logits read once, no fp32 copy
                lse_N[s:e], picked = cross_entropy_rows(logits, safe_N[s:e])
            else:
                logits = logits.float()
                lse_N[s:e] = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, safe_N[s:e, None])[:, 0]
            total += ((lse_N[s:e] - picked) * valid_N[s:e]).sum()
        count = valid_N.sum().clamp(min=1)
        ctx.save_for_backward(hidden_NC, weight_VC, safe_N, valid_N, lse_N, count)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        hidden_NC, weight_VC, safe_N, valid_N, lse_N, count = ctx.saved_tensors
        scale_N = valid_N.float() * (grad_loss / count)
        grad_hidden = torch.empty_like(hidden_NC)
        grad_weight = torch.zeros(weight_VC.shape, dtype=torch.float32, device=weight_VC.device)
        for s, e in _chunks(hidden_NC.shape[0], weight_VC.shape[0]):
            logits = hidden_NC[s:e] @ weight_VC.T
            if cross_entropy_kernel_applies(logits):
                dlogits = cross_entropy_grad(logits, safe_N[s:e], lse_N[s:e], scale_N[s:e])
            else:
                dlogits = torch.exp_(logits.float().sub_(lse_N[s:e, None]))  # softmax, in place
                dlogits.scatter_add_(1, safe_N[s:e, None], torch.full((e - s, 1), -1.0, device=dlogits.device))
                dlogits = dlogits.mul_(scale_N[s:e, None]).to(hidden_NC.dtype)
            grad_hidden[s:e] = dlogits @ weight_VC
            grad_weight += (dlogits.T @ hidden_NC[s:e]).float()
        return grad_hidden, grad_weight.to(weight_VC.dtype), None


@torch.compiler.disable
def chunked_cross_entropy(hidden_NC: torch.Tensor, weight_VC: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """Mean loss over targets that are not IGNORE_INDEX, in the autocast dtype when autocast is on.

    torch.compile leaves this call out of its graphs: the chunk loop is already one matmul per chunk.
    """
    device_type = hidden_NC.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden_NC, weight_VC = hidden_NC.to(dtype), weight_VC.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return ChunkedCrossEntropy.apply(hidden_NC, weight_VC, targets_N)


def target_log_probs(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """log p(target) at each position (B, T) in fp32, 0 where the target is IGNORE_INDEX: the
    per-token terms that DPO and RL sum over a reply."""
    valid_BT = targets_BT != IGNORE_INDEX
    logp_BTV = torch.log_softmax(logits_BTV.float(), dim=-1)
    picked_BT = logp_BTV.gather(-1, targets_BT.clamp(min=0)[..., None])[..., 0]
    return picked_BT * valid_BT
