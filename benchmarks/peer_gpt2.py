"""hybridlm against Hugging Face GPT2LMHeadModel on the same GPT-2-shaped config, in one run.

Measures, on this machine:
- the bf16 and fp32 matmul peak (a large square matmul), the yardstick for MFU;
- training tokens/s (forward + backward + AdamW, bf16 autocast) of HF GPT-2 (SDPA attention),
  hybridlm all-dense with the same shape, and hybridlm hybrid (2 dense + 4 sparse layers);
- batch-1 greedy decode tokens/s with KV caches (HF `generate` vs hybridlm's engine).

Usage: .venv/bin/python benchmarks/peer_gpt2.py [--seq 1024] [--batch 8] [--compile] [--json]
Needs the [bench] extra (transformers). Prints a markdown table, or one JSON object with --json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F

from hybridlm.config import ModelConfig
from hybridlm.inference.decode import generate_ids
from hybridlm.inference.sampling import SamplingParams
from hybridlm.model import HybridLM
from hybridlm.model.cpu_kernels import machine
from hybridlm.model.info import flops_per_token
from hybridlm.timing import median_seconds

VOCAB, LAYERS, HEADS, D_MODEL = 8192, 6, 6, 384


def matmul_peak(dtype: torch.dtype, size: int = 4096, repeats: int = 5) -> float:
    """FLOP/s of a size x size x size matmul (median of repeats)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / median_seconds(lambda: a @ b, repeats)


def hybridlm_config(seq: int, pattern: str) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, n_layer=LAYERS, n_head=HEADS, d_model=D_MODEL, max_seq_len=max(seq, 1024),
                       layer_pattern=pattern, position="learned", norm="layernorm", ffn="gelu", bias=True,
                       window=128, stride=128, n_global=8)


def hf_model(seq: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=max(seq, 1024), n_embd=D_MODEL, n_layer=LAYERS, n_head=HEADS,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                     attn_implementation="sdpa")
    return GPT2LMHeadModel(cfg)


def hf_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).logits.float().flatten(0, 1), y.flatten())


def hybridlm_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x, targets_BT=y)  # the fused chunked cross-entropy that hybridlm's trainer uses


def train_tokens_per_s(model, loss_of, seq: int, batch: int, repeats: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, VOCAB, (batch, seq + 1), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(model, ids[:, :-1], ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return batch * seq / median_seconds(step, repeats)


def decode_tokens_per_s_hf(model, prompt: torch.Tensor, new_tokens: int) -> float:
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
        elapsed = time.perf_counter() - start
    return (out.shape[1] - prompt.shape[1]) / elapsed


def decode_tokens_per_s_ours(model: HybridLM, prompt: torch.Tensor, new_tokens: int) -> float:
    model = copy.deepcopy(model).eval().to(torch.bfloat16)  # what `hybridlm generate --dtype bf16` runs
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    list(generate_ids(model, prompt[0].tolist(), SamplingParams(max_new_tokens=4, temperature=0), eos_id=None))
    start = time.perf_counter()
    produced = len(list(generate_ids(model, prompt[0].tolist(), params, eos_id=None)))
    return produced / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd models")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    peak = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    torch.manual_seed(0)
    models = {
        "hf-gpt2": (hf_model(args.seq), hf_loss),
        "hybridlm-dense": (HybridLM(hybridlm_config(args.seq, "D" * LAYERS)), hybridlm_loss),
        "hybridlm-hybrid": (HybridLM(hybridlm_config(args.seq, "DDSSSS")), hybridlm_loss),
    }
    prompt = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(1))
    rows = []
    for name, (model, loss_of) in models.items():
        variants = [(name, model)]
        if args.compile:
            variants.append((f"{name} (compiled)", torch.compile(model)))
        pattern = "DDSSSS" if name.endswith("hybrid") else "D" * LAYERS
        train_flops = 3 * flops_per_token(hybridlm_config(args.seq, pattern), args.seq)
        for label, runnable in variants:
            tok_s = train_tokens_per_s(runnable, loss_of, args.seq, args.batch, args.repeats)
            rows.append({"model": label, "train_tokens_per_s": tok_s, "mfu_bf16": tok_s * train_flops / peak["bf16"]})
        rows[-1 - args.compile]["decode_tokens_per_s"] = (
            decode_tokens_per_s_hf(model, prompt, args.new_tokens) if name == "hf-gpt2"
            else decode_tokens_per_s_ours(model, prompt, args.new_tokens)
        )
    result = {"machine": machine(), "seq": args.seq, "batch": args.batch, "peak_flops": peak, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"matmul peak: bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s, fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s; "
          f"T={args.seq}, batch {args.batch}; {result['machine']['cpu']} ({result['machine']['cpu_flags']}), "
          f"kernel path {result['machine']['kernel_path']}")
    print("| model | train tokens/s | MFU (bf16 peak) | decode tokens/s (batch 1) |")
    print("|---|---|---|---|")
    for row in rows:
        decode = f"{row['decode_tokens_per_s']:.0f}" if "decode_tokens_per_s" in row else ""
        print(f"| {row['model']} | {row['train_tokens_per_s']:,.0f} | {row['mfu_bf16']:.1%} | {decode} |")


if __name__ == "__main__":
    main()
