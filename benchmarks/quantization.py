"""Weight-only quantization of a trained run: kernels, quality, size and decoding memory and speed.

Three parts (--part, default all), each printed as a table and saved in OUT/quantization.json:
- kernels: one Linear of each shape the model has, at 1 / 4 / 16 / 64 / 512 rows of bf16
  activations: bf16 F.linear (the unquantized peer), aten's int8 and int4 weight-pack kernels, and
  dequantize-then-matmul; median microseconds. This is what chose KERNEL_MAX_ROWS in
  model/converters/quant.py.
- quality: `hybridlm quantize --data` for int8 and int4 at group sizes 32 / 64 / 128 (perplexity,
  its change, mean KL against the fp32 model, top-token agreement; llama.cpp's perplexity-tool
  figures), beside the fp32 model cast to bf16 for scale; size of model.safetensors.
- speed: `hybridlm eval efficiency` in a fresh process per variant (fp32, bf16, int8, int4 g64):
  prefill and batch-1 decode tokens/s, and peak RSS while decoding, with the RSS of a process that
  has only imported hybridlm and torch for comparison.

Usage: .venv/bin/python benchmarks/quantization.py --run RUN --data ../shared/data/wikitext-2/test.txt --out DIR
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save as st_save

from hybridlm.model.converters.quant import QuantizedLinear, QuantSpec, quantizable_layers
from hybridlm.quantize.quality import compare_models, text_windows
from hybridlm.quantize.writer import quantize_run
from hybridlm.run import load_run
from hybridlm.timing import median_seconds

ROWS = (1, 4, 16, 64, 512)
VARIANTS = {"int8": QuantSpec(to="int8"), "int4-g32": QuantSpec(to="int4", group_size=32),
            "int4-g64": QuantSpec(to="int4", group_size=64), "int4-g128": QuantSpec(to="int4", group_size=128)}


def _median_us(fn) -> float:
    return median_seconds(fn, 30, warmup=3) * 1e6


def kernels(run_dir: Path) -> list[dict]:
    model = load_run(run_dir).model
    shapes = sorted({(model.get_submodule(n).in_features, model.get_submodule(n).out_features)
                     for n in quantizable_layers(model)})
    rows_out = []
    for in_features, out_features in shapes:
        linear = torch.nn.Linear(in_features, out_features, bias=False)
        weight = linear.weight.detach().to(torch.bfloat16)
        int8, int4 = (QuantizedLinear.from_linear(linear, kind, 64) for kind in ("int8", "int4"))
        packed, scales_zeros = int4._kernel_weight()
        for rows in ROWS:
            x = torch.randn(rows, in_features, dtype=torch.bfloat16)
            rows_out.append({"shape": f"{in_features}x{out_features}", "rows": rows,
                             "bf16_linear_us": _median_us(lambda: F.linear(x, weight)),
                             "int8_kernel_us": _median_us(lambda: torch._weight_int8pack_mm(x, int8.qweight, int8.scales)),
                             "int4_kernel_us": _median_us(lambda: torch._weight_int4pack_mm_for_cpu(
                                 x, packed, 64, scales_zeros)),
                             "int8_dequant_us": _median_us(lambda: F.linear(x, int8.dequantized(torch.bfloat16))),
                             "int4_dequant_us": _median_us(lambda: F.linear(x, int4.dequantized(torch.bfloat16)))})
    return rows_out


def quality(run_dir: Path, data: Path, out: Path, tokens: int) -> dict:
    run = load_run(run_dir)
    windows = text_windows(run.tokenizer, data, run.model.cfg.max_seq_len, tokens)
    results = {"bf16-cast": {**compare_models(run.model, load_run(run_dir, "bf16").model, windows),
                             "bytes": None}}
    for name, spec in VARIANTS.items():
        target = out / name
        if not (target / "manifest.json").is_file():
            quantize_run(run_dir, spec, target, data=data, tokens=tokens)
        figures = json.loads((target / "quantization_quality.json").read_text())
        results[name] = {**figures, "bytes": (target / "model.safetensors").stat().st_size}
    results["source_bytes"] = (Path(run_dir) / "model.safetensors").stat().st_size
    state = {k: v.to(torch.bfloat16) for k, v in run.model.state_dict().items() if k != "lm_head.weight"}
    results["bf16_bytes"] = len(st_save(state))  # the same run saved in bf16 (tied head once, as run.py does)
    return results


def _efficiency(model: Path, dtype: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "hybridlm", "eval", "efficiency", "--model", str(model), "--dtype", dtype,
                           "--prompt-tokens", "512", "--new-tokens", "128", "--repeats", "3", "--json"],
                          capture_output=True, text=True, check=True)
    fields = json.loads(done.stdout)["efficiency"]
    return {key: fields[key]["value"] for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory",
                                                   "size_on_disk")}


def speed(run_dir: Path, out: Path) -> dict:
    baseline = subprocess.run([sys.executable, "-c", "import re, torch, hybridlm.cli, hybridlm.run; "
                               "print(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"],
                              capture_output=True, text=True, check=True)
    results = {"import_rss_bytes": int(baseline.stdout) * 1024}
    for name, model, dtype in [("fp32", run_dir, "fp32"), ("bf16", run_dir, "bf16"), ("int8", out / "int8", "bf16"),
                               ("int4-g64", out / "int4-g64", "bf16")]:
        results[name] = _efficiency(model, dtype)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--part", choices=["kernels", "quality", "speed", "all"], default="all")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    record_path = args.out / "quantization.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record.update(threads=torch.get_num_threads(), torch=torch.__version__)
    if args.part in ("kernels", "all"):
        record["kernels"] = kernels(args.run)
    if args.part in ("quality", "all"):
        record["quality"] = quality(args.run, args.data, args.out, args.tokens)
    if args.part in ("speed", "all"):
        record["speed"] = speed(args.run, args.out)
    record_path.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
