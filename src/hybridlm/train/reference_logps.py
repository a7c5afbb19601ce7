"""The reference policy's log-probabilities of every preference pair, computed once and cached on
disk, so DPO keeps no second model in memory and a rerun (or another stage on the same data)
reads them back instead of recomputing.

The cache file is named by a sha256 over what determines the numbers: the reference weights'
hash (from its manifest), the tokenizer's hash, the encoded pairs (data, chat template and
truncation), the row length and the dtype the forward ran in. A file whose key matches is
exact by construction; anything else is a miss and is computed afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from hybridlm.data.pair_rows import EncodedPair
from hybridlm.device import default_device
from hybridlm.errors import UserError
from hybridlm.fileio import atomic_write_bytes
from hybridlm.model import HybridLM
from hybridlm.run import load_run, weights_sha256
from hybridlm.tokenizer import TextTokenizer
from hybridlm.train.validation import pair_scores


def cache_root(configured: str) -> Path:
    """dpo.reference_cache, else $HYBRIDLM_CACHE/reference-logps (default ~/.cache/hybridlm)."""
    if configured:
        return Path(configured)
    return Path(os.environ.get("HYBRIDLM_CACHE", Path.home() / ".cache" / "hybridlm")) / "reference-logps"


def pair_logps(model: HybridLM, pairs: list[EncodedPair], seq_len: int, pad_id: int, dtype: str) -> torch.Tensor:
    """Summed reply log-probabilities (N, 2) of (chosen, rejected) for each pair, in eval mode."""
    return pair_scores(model, pairs, seq_len, pad_id, dtype,
                       lambda m, ids, targets, _: m(ids, targets_BT=targets, per_token=True).sum(-1))


def cache_key(reference: Path, tokenizer: TextTokenizer, pairs: list[EncodedPair], seq_len: int, dtype: str) -> dict:
    weights = weights_sha256(reference)
    data = hashlib.sha256(json.dumps([[p.prompt, p.chosen, p.rejected] for p in pairs]).encode()).hexdigest()
    return {"reference_weights_sha256": weights, "tokenizer_sha256": tokenizer.sha256(), "pairs_sha256": data,
            "pairs": len(pairs), "seq_len": seq_len, "dtype": dtype}


def reference_logps(reference: Path, tokenizer: TextTokenizer, pairs: list[EncodedPair], seq_len: int, dtype: str,
                    cache_dir: str) -> tuple[torch.Tensor, dict]:
    """(log-probs (N, 2) float64, the cache record: key fields, file, hit or computed)."""
    key = cache_key(reference, tokenizer, pairs, seq_len, dtype)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    path = cache_root(cache_dir) / f"{digest}.safetensors"
    if path.is_file():
        return load_file(path)["logps"], {**key, "file": str(path), "hit": True}
    run = load_run(reference)
    if run.tokenizer.sha256() != tokenizer.sha256():
        raise UserError(f"the DPO reference {reference} has another tokenizer than this run; use a reference "
                        "trained with the same tokenizer.json")
    logps = pair_logps(run.model.to(default_device()), pairs, seq_len, tokenizer.special_ids["pad"], dtype)
    del run
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save({"logps": logps.contiguous()}, metadata={k: str(v) for k, v in key.items()}))
    return logps, {**key, "file": str(path), "hit": False}
