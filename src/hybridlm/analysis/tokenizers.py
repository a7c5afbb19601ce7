"""`hybridlm analyze tokenizer`: BPE vs Unigram at several vocabulary sizes on one corpus.

The corpus's documents are split deterministically: every HELD_OUT_PERIOD-th document is held
out, the rest train each tokenizer. On the held-out text: UTF-8 bytes per token, tokens per
whitespace-separated word, the share of the vocabulary that appears, and encode speed (MB/s,
median of 3, Hugging Face tokenizers' batch encoder as `prepare` uses it). With `train`, the same
model is trained on each tokenizer's shards for the same steps of the same sequence length (equal
compute outside the embedding tables) and scored in bits per byte on the held-out text, the one
unit that compares across vocabularies.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from hybridlm.data.prepare import prepare
from hybridlm.data.sources import iter_documents, resolve_source
from hybridlm.errors import UserError
from hybridlm.report_format import format_figure, markdown_table
from hybridlm.tokenizer import train_tokenizer

HELD_OUT_PERIOD = 10
KINDS = ("bpe", "unigram")


def split_corpus(specs: list[str]) -> tuple[list[str], list[str]]:
    documents = [d for spec in specs for d in iter_documents(resolve_source(spec))]
    held_out = documents[HELD_OUT_PERIOD - 1 :: HELD_OUT_PERIOD]
    if not held_out:
        raise UserError(f"the corpus has {len(documents)} documents; it needs at least {HELD_OUT_PERIOD} to hold one "
                        "out")
    train = [d for i, d in enumerate(documents) if i % HELD_OUT_PERIOD != HELD_OUT_PERIOD - 1]
    return train, held_out


def encode_speed(tokenizer, texts: list[str], repeats: int = 3) -> float:
    size = sum(len(t.encode("utf-8")) for t in texts)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokenizer.encode_batch(texts)
        times.append(time.perf_counter() - start)
    return size / statistics.median(times) / 1e6


def tokenizer_figures(tokenizer, held_out: list[str]) -> dict:
    ids = tokenizer.encode_batch(held_out)
    tokens = sum(len(i) for i in ids)
    words = sum(len(t.split()) for t in held_out)
    used = len({token for row in ids for token in row})
    return {"vocab_size": tokenizer.vocab_size, "bytes_per_token": sum(len(t.encode("utf-8")) for t in held_out) / tokens,
            "tokens_per_word": tokens / max(words, 1), "vocab_used": used / tokenizer.vocab_size,
            "encode_mb_s": encode_speed(tokenizer, held_out)}


def trained_bpb(tokenizer, train_text: Path, held_out_text: Path, work: Path, overrides: list[str]) -> float:
    from hybridlm.eval.perplexity import evaluate_path
    from hybridlm.run import load_run
    from hybridlm.train.config import load_run_config
    from hybridlm.train.trainer import train

    tokenizer.save(work / "tokenizer.json")
    prepare([str(train_text)], work / "tokenizer.json", work / "data")
    train(load_run_config(None, [*overrides, f"data.path={work / 'data'}", f"train.out={work / 'run'}"]), progress=False)
    return float(evaluate_path(load_run(work / "run"), held_out_text, None)["bpb"])


def compare_tokenizers(specs: list[str], vocab_sizes: list[int], kinds: tuple[str, ...] = KINDS, *,
                       train_overrides: list[str] | None = None) -> dict:
    """One row per (kind, vocabulary size); with train_overrides (a run config's overrides, e.g.
    model.preset=tiny train.steps=200), also the held-out bits per byte of a model trained on it."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise UserError(f"--kinds must name some of {', '.join(KINDS)} (got {', '.join(kinds) or 'none'})")
    if not vocab_sizes:
        raise UserError("--vocab-sizes is empty; give e.g. 1024,4096")
    train_docs, held_out = split_corpus(specs)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hybridlm-tokenizers-") as scratch:
        root = Path(scratch)
        (root / "train.txt").write_text("\n\n".join(train_docs), encoding="utf-8")
        (root / "held_out.txt").write_text("\n\n".join(held_out), encoding="utf-8")
        for kind in kinds:
            for size in vocab_sizes:
                tokenizer = train_tokenizer(train_docs, kind=kind, vocab_size=size)
                row = {"kind": kind, "requested_vocab": size, **tokenizer_figures(tokenizer, held_out)}
                if train_overrides is not None:
                    work = root / f"{kind}-{size}"
                    work.mkdir()
                    row["val_bpb"] = trained_bpb(tokenizer, root / "train.txt", root / "held_out.txt", work,
                                                 train_overrides)
                rows.append(row)
    return {"sources": specs, "train_documents": len(train_docs), "held_out_documents": len(held_out),
            "held_out_bytes": sum(len(d.encode("utf-8")) for d in held_out), "rows": rows}


def format_comparison(document: dict) -> str:
    columns = ["kind", "requested_vocab", "vocab_size", "bytes_per_token", "tokens_per_word", "vocab_used",
               "encode_mb_s", *(["val_bpb"] if document["rows"] and "val_bpb" in document["rows"][0] else [])]
    rows = [[format_figure(row[c], 3) for c in columns] for row in document["rows"]]
    return "\n".join([f"{document['held_out_documents']:,} held-out documents ({document['held_out_bytes']:,} bytes) "
                      f"of {', '.join(document['sources'])}", *markdown_table(columns, rows, 1)])
