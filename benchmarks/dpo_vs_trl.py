"""DPO step time and peak memory: hybridlm against TRL's DPOTrainer on the same model and batch.

One GPT-2-shaped model (6 layers, d = 384, vocabulary 4096, dense; `export hf --format gpt2` turns it
into the GPT2LMHeadModel TRL trains) and one batch of 8 random-token pairs (prompt 64 tokens,
replies 96-192). Each configuration runs in its own process (so ru_maxrss is its own peak) for
--steps timed optimizer steps after 2 warm-up steps, all in fp32 (TRL on CPU) unless named bf16:
- hybridlm, cached reference: the objective's loss with reference log-probs from the disk cache;
- hybridlm, live reference: the same with the reference model in memory, run every step;
- hybridlm bf16 autocast, cached reference: our default training dtype on a bf16 CPU;
- TRL, live reference: DPOTrainer.compute_loss with ref_model (its default);
- TRL, precomputed reference: the same with ref_chosen_logps/ref_rejected_logps in the batch, the
  inputs its precompute_ref_log_probs path feeds.

Usage: .venv/bin/python benchmarks/dpo_vs_trl.py --out DIR [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from hybridlm.config import ModelConfig
from hybridlm.data.pair_rows import EncodedPair, pair_batches
from hybridlm.device import autocast
from hybridlm.fileio import atomic_write_json
from hybridlm.interop.hf_export import export_hf
from hybridlm.model import HybridLM
from hybridlm.run import load_run, save_final
from hybridlm.tokenizer import TextTokenizer, train_tokenizer
from hybridlm.train.config import DataConfig, DPOConfig, RunConfig, TrainConfig
from hybridlm.train.objectives import OBJECTIVES, StepContext
from hybridlm.train.reference_logps import pair_logps, reference_logps

SHAPE = {"n_layer": 6, "n_head": 6, "d_model": 384, "max_seq_len": 512, "layer_pattern": "DDDDDD",
         "position": "learned", "norm": "layernorm", "ffn": "gelu", "bias": True}
SEQ_LEN, PAIRS = 256, 8
MODES = ("ours-cached", "ours-live", "ours-bf16-cached", "trl-live", "trl-precomputed")


def _setup(out: Path) -> None:
    """The run (reference = initial policy), its GPT-2 export and a tokenizer, once."""
    if (out / "hf").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(5000)]
    train_tokenizer([" ".join(random.Random(i).sample(words, 50)) for i in range(400)], vocab_size=4096).save(
        out / "tokenizer.json")
    tokenizer = TextTokenizer.load(out / "tokenizer.json")
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, **SHAPE)
    torch.manual_seed(0)
    run = out / "run"
    run.mkdir()
    atomic_write_json(run / "config.json", RunConfig(model=cfg, train=TrainConfig(out=str(run)),
                                                     data=DataConfig(seq_len=SEQ_LEN)).to_dict())
    tokenizer.save(run / "tokenizer.json")
    save_final(run, HybridLM(cfg))
    export_hf(run, out / "hf", "gpt2")


def _pairs(vocab: int) -> list[EncodedPair]:
    rng = random.Random(0)
    ids = lambda n: [rng.randrange(8, vocab) for _ in range(n)]  # noqa: E731
    return [EncodedPair(ids(64), ids(rng.randint(96, 192)), ids(rng.randint(96, 192))) for _ in range(PAIRS)]


def _time_steps(step, steps: int) -> list[float]:
    times = []
    for i in range(steps + 2):
        started = time.perf_counter()
        step()
        if i >= 2:
            times.append(time.perf_counter() - started)
    return times


def _ours(out: Path, mode: str, steps: int) -> list[float]:
    run = load_run(out / "run")
    model, tokenizer = run.model.train(), run.tokenizer
    pairs, pad = _pairs(tokenizer.vocab_size), tokenizer.special_ids["pad"]
    dtype = "bf16" if "bf16" in mode else "fp32"
    ids, targets, last = next(pair_batches(pairs, SEQ_LEN, pad, PAIRS))
    reference = load_run(out / "run").model if mode == "ours-live" else None
    cached = None if reference else reference_logps(out / "run", tokenizer, pairs, SEQ_LEN, dtype, str(out / "cache"))[0]
    cfg = RunConfig(model=model.cfg, train=TrainConfig(objective="dpo"), data=DataConfig(seq_len=SEQ_LEN),
                    dpo=DPOConfig(beta=0.1))
    ctx = StepContext(cfg, tokenizer, model, {})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        ref = pair_logps(reference, pairs, SEQ_LEN, pad, dtype) if reference is not None else cached
        with autocast(dtype, ids.device):
            loss = OBJECTIVES["dpo"].loss(model, (ids, targets, last, ref), ctx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _time_steps(step, steps)


def _trl(out: Path, mode: str, steps: int) -> list[float]:
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, GPT2LMHeadModel

    policy = GPT2LMHeadModel.from_pretrained(out / "hf", dtype=torch.float32)
    reference = GPT2LMHeadModel.from_pretrained(out / "hf", dtype=torch.float32)
    args = trl.DPOConfig(output_dir=str(out / "trl"), beta=0.1, report_to="none", use_cpu=True, max_length=None,
                         bf16=False, precompute_ref_log_probs=False)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args,
                             processing_class=AutoTokenizer.from_pretrained(out / "hf"),
                             train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    pairs = _pairs(policy.config.vocab_size)
    examples = [{"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected} for p in pairs]
    if mode == "trl-precomputed":
        cached = reference_logps(out / "run", TextTokenizer.load(out / "run" / "tokenizer.json"), pairs, SEQ_LEN,
                                 "fp32", str(out / "cache"))[0]
        examples = [{**e, "ref_chosen_logps": float(r[0]), "ref_rejected_logps": float(r[1])}
                    for e, r in zip(examples, cached)]
        trainer.precompute_ref_logps = True
        trainer.ref_model = None
        del reference
    inputs = trainer.data_collator(examples)
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)

    def step() -> None:
        trainer.compute_loss(policy, inputs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _time_steps(step, steps)


def _child(out: Path, mode: str, steps: int) -> None:
    times = (_trl if mode.startswith("trl") else _ours)(out, mode, steps)
    print(json.dumps({"mode": mode, "step_s": sorted(times)[len(times) // 2], "steps": len(times),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args.out, args.child, args.steps)
    _setup(args.out)
    results = []
    for mode in MODES:
        done = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--steps", str(args.steps),
                               "--child", mode], capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    trl_live = next(r for r in results if r["mode"] == "trl-live")
    for r in results:
        r["speed_vs_trl_live"] = trl_live["step_s"] / r["step_s"]
    (args.out / "dpo_vs_trl.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
