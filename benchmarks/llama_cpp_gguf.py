"""llama.cpp on our GGUF exports: the same greedy tokens, and decode speed beside hybridlm's.

Needs llama-cpp-python (`.venv/bin/pip install llama-cpp-python`: it builds llama.cpp from source,
about 4.5 minutes on 2 cores; not in the lock, not in the test command).

1. Trains (or reuses) a dense GPT-2-shaped model on WikiText-2: 6 layers, d = 384, 6 heads,
   learned positions, LayerNorm, GELU, biases, tied embeddings, vocab 8192, context 1024.
2. Exports it with `hybridlm export gguf` as f16, q8_0 and q4_0.
3. Tokens: for each file, llama.cpp's greedy continuation of WikiText-2 prompts against hybridlm's
   greedy continuation with the weights read back from the same file (gguf's reader and
   dequantizer), so both sides decode exactly the same numbers; a mismatch is a wrong export.
4. Speed, batch 1, --threads threads, after a --prompt-tokens prompt: llama.cpp's prefill and decode
   tokens/s per file, and hybridlm's (bf16, int8 and int4-g64 runs of the same model) through the
   same decode loop as `hybridlm eval efficiency`.

Usage: .venv/bin/python benchmarks/llama_cpp_gguf.py --out DIR [--steps 150] [--threads 2] [--types f16 ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from wikitext2_data import DATA, prepared_wikitext2

from hybridlm.inference.decode import generate_ids
from hybridlm.inference.sampling import SamplingParams
from hybridlm.interop.gguf_export import export_gguf, tensor_names
from hybridlm.model.converters.quant import QuantSpec
from hybridlm.model.cpu_kernels import machine
from hybridlm.quantize.writer import quantize_run
from hybridlm.run import load_run
from hybridlm.train.config import run_config_from_dict
from hybridlm.train.trainer import train

GPT2_SHAPED = {"preset": "gpt2-124m", "n_layer": 6, "layer_pattern": "DDDDDD", "d_model": 384, "n_head": 6,
               "vocab_size": 8192}
TYPES = ("f16", "q8_0", "q4_0")


def _model(out: Path, steps: int) -> Path:
    run_dir = out / "gpt2-small"
    if not (run_dir / "model.safetensors").exists():
        train(run_config_from_dict({
            "model": GPT2_SHAPED, "train": {"out": str(run_dir), "steps": steps, "log_every": 10},
            "data": {"path": str(prepared_wikitext2(out)), "batch_size": 8, "seq_len": 512}, "optim": {"lr": 1e-3},
            "schedule": {"warmup_steps": 20}, "eval": {"every": 0}, "checkpoint": {"every": steps}}), progress=False)
    return run_dir


def _from_gguf(run_dir: Path, path: Path):
    """The run's model with every weight replaced by the GGUF file's (dequantized) tensor."""
    import gguf

    run = load_run(run_dir)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    state = run.model.state_dict()
    for ours, theirs in tensor_names(run.model.cfg.n_layer):
        tensor = tensors[theirs]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(state[ours].shape)
        state[ours] = torch.from_numpy(values.copy()).float()
    run.model.load_state_dict(state)
    return run.model


def _prompts(run, count: int, length: int) -> list[list[int]]:
    ids = run.tokenizer.encode((DATA / "test.txt").read_text(encoding="utf-8"))
    return [[run.tokenizer.eos_id] + ids[i * 997 : i * 997 + length - 1] for i in range(count)]


def same_tokens(run_dir: Path, path: Path, prompts: list[list[int]], new: int, threads: int) -> dict:
    from llama_cpp import Llama

    model = _from_gguf(run_dir, path)
    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=threads, verbose=False)
    matched, total, first_mismatch = 0, 0, []
    for prompt in prompts:
        ours = list(generate_ids(model, prompt, SamplingParams(temperature=0, max_new_tokens=new), eos_id=None))
        llm.reset()
        theirs = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            theirs.append(token)
            if len(theirs) == new:
                break
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), new)
        matched += same
        total += new
        first_mismatch.append(same)
    return {"prompts": len(prompts), "new_tokens": new, "identical_prefix": first_mismatch,
            "share_identical": matched / total}


def llama_speed(path: Path, prompt: list[int], new: int, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=threads, n_batch=512, verbose=False)
    llm.eval(prompt[:8])  # warm-up
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new):
        token = llm.sample(top_k=1, temp=0.0)
        llm.eval([token])
    decode = time.perf_counter() - start
    return {"prefill_tokens_per_s": len(prompt) / prefill, "decode_tokens_per_s": new / decode}


def hybridlm_speed(run_dir: Path, dtype: str, prompt: list[int], new: int) -> dict:
    from hybridlm.eval.efficiency import EnergyMeter, measure_speed

    model = load_run(run_dir, dtype).model
    speed = measure_speed(model, prompt, new, 3, EnergyMeter())
    return {"prefill_tokens_per_s": len(prompt) / speed["prefill_s"],
            "decode_tokens_per_s": (new - 1) / speed["decode_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--types", nargs="+", choices=TYPES, default=list(TYPES),
                        help="GGUF types llama.cpp runs (llama-cpp-python 0.3.36 segfaults on q8_0 and q4_0 on an AMX Xeon)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run_dir = _model(args.out, args.steps)
    run = load_run(run_dir)
    files = {}
    for kind in args.types:
        files[kind] = args.out / f"gpt2-small-{kind}.gguf"
        if not files[kind].exists():
            export_gguf(run_dir, files[kind], kind)
    for kind in ("int8", "int4"):
        target = args.out / f"gpt2-small-{kind}"
        if not (target / "manifest.json").exists():
            quantize_run(run_dir, QuantSpec(to=kind, group_size=64), target)
    prompts = _prompts(run, 4, 64)
    speed_prompt = _prompts(run, 1, args.prompt_tokens)[0]
    results = {"machine": machine(), "threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
               "tokens": {}, "llama_cpp": {}, "hybridlm": {}}
    for kind, path in files.items():
        results["tokens"][kind] = same_tokens(run_dir, path, prompts, 32, args.threads)
        results["llama_cpp"][kind] = {**llama_speed(path, speed_prompt, args.new_tokens, args.threads),
                                      "bytes": path.stat().st_size}
    for name, directory, dtype in [("bf16", run_dir, "bf16"), ("fp32", run_dir, "fp32"),
                                   ("int8", args.out / "gpt2-small-int8", "bf16"),
                                   ("int4-g64", args.out / "gpt2-small-int4", "bf16")]:
        results["hybridlm"][name] = hybridlm_speed(directory, dtype, speed_prompt, args.new_tokens)
    (args.out / "llama_cpp_gguf.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
