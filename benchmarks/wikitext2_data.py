"""WikiText-2 prepared for training benchmarks: a byte-level BPE (8192) on train.txt, then shards.

Shared by the benchmarks that train on WikiText-2; reuses OUT/data when it already exists.
"""

from __future__ import annotations

from pathlib import Path

from hybridlm.data.prepare import prepare
from hybridlm.data.sources import iter_documents, resolve_source
from hybridlm.tokenizer import train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


def prepared_wikitext2(out: Path) -> Path:
    """OUT/data: WikiText-2 train tokenized with its own BPE, 2% of documents held out for validation."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "data" / "meta.json").exists():
        tok = train_tokenizer(iter_documents(resolve_source(str(DATA / "train.txt"))), vocab_size=8192)
        tok.save(out / "tokenizer.json")
        prepare([str(DATA / "train.txt")], out / "tokenizer.json", out / "data", val_fraction=0.02)
    return out / "data"
