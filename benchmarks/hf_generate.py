"""Greedy decoding of an exported model in Hugging Face transformers, with and without the KV cache.

`hybridlm export hf RUN DIR` writes remote code that transformers' `generate()` runs. This times
`generate(max_new_tokens=N, do_sample=False)` on one prompt of P random token ids in fp32, as
exported (the cache is the default) and with `use_cache=False` (every step recomputes the whole
sequence), in the same process, median of --repeats. It checks the two produce the same tokens, and
reports hybridlm's own cached greedy decode of the same prompt (`inference.decode.generate_ids`,
fp32) as the peer.

Usage: .venv/bin/python benchmarks/hf_generate.py RUN_DIR [--prompt 512] [--new 128] [--repeats 3]
One JSON document goes to stdout; needs the [hf] extra.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from hybridlm.inference.decode import generate_ids
from hybridlm.inference.sampling import SamplingParams
from hybridlm.interop.hf_export import export_hf
from hybridlm.run import load_run
from hybridlm.timing import median_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM

    run = load_run(args.run)
    prompt = torch.randint(10, run.tokenizer.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(args.run, Path(tmp) / "hf")
        hf_model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", trust_remote_code=True, local_files_only=True,
                                                        dtype=torch.float32).eval()
    greedy = {"max_new_tokens": args.new, "min_new_tokens": args.new, "do_sample": False}
    outputs = {}

    @torch.no_grad()
    def hf(use_cache: bool) -> None:
        """generate() as users call it (the cache is its default), or with use_cache=False."""
        flags = {} if use_cache else {"use_cache": False}
        outputs[use_cache] = hf_model.generate(prompt, **greedy, **flags)[0, args.prompt:].tolist()

    @torch.no_grad()
    def ours() -> None:
        outputs["hybridlm"] = list(generate_ids(run.model.eval(), prompt[0].tolist(),
                                                SamplingParams(temperature=0, max_new_tokens=args.new), eos_id=None))

    cached = median_seconds(lambda: hf(True), args.repeats, warmup=0)
    uncached = median_seconds(lambda: hf(False), args.repeats, warmup=0)
    native = median_seconds(ours, args.repeats, warmup=0)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "transformers": transformers.__version__},
        "prompt_tokens": args.prompt, "new_tokens": args.new, "repeats": args.repeats, "dtype": "fp32",
        "hf_cached_tokens_per_s": args.new / cached,
        "hf_uncached_tokens_per_s": args.new / uncached,
        "hybridlm_tokens_per_s": args.new / native,
        "cached_over_uncached": uncached / cached,
        "hf_cached_over_hybridlm": native / cached,
        "same_tokens_cached_uncached": outputs[True] == outputs[False],
        "same_tokens_hf_hybridlm": outputs[True] == outputs["hybridlm"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
