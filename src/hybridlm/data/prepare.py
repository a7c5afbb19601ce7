"""Turn sources into token shards: `<split>_<n>.bin` (raw uint16/uint32) plus `meta.json`.

Documents stream through in batches that the tokenizer encodes on all cores; every document
ends with the eos token. Every `period`-th document (by global index) goes to validation, so
the split is by document and the same inputs always give the same shards. Shards are written
under a temporary directory and moved in only when everything succeeded, meta.json last.
"""

from __future__ import annotations

import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from hybridlm.data.sources import (
    Source,
    builtin_digest,
    iter_documents,
    resolve_source,
    source_fingerprint,
)
from hybridlm.errors import UserError
from hybridlm.fileio import atomic_write_json, read_json, sha256_file
from hybridlm.tokenizer import TextTokenizer

FORMAT = "hybridlm-shards/1"
SPLITS = ("train", "val")


@dataclass
class _SplitWriter:
    """Appends token arrays to numbered shard files of at most `shard_tokens` tokens."""

    directory: Path
    split: str
    dtype: np.dtype
    shard_tokens: int
    shards: list[dict] = field(default_factory=list)
    tokens: int = 0
    bytes: int = 0
    docs: int = 0
    _file = None
    _in_shard: int = 0

    def write(self, ids: np.ndarray, n_bytes: int) -> None:
        self.docs += 1
        self.bytes += n_bytes
        while ids.size:
            if self._file is None or self._in_shard >= self.shard_tokens:
                self._open_next()
            take = ids[: self.shard_tokens - self._in_shard]
            self._file.write(take.tobytes())
            self._in_shard += take.size
            self.shards[-1]["tokens"] += take.size
            self.tokens += take.size
            ids = ids[take.size :]

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):04d}.bin"
        self._file = open(self.directory / name, "wb")
        self._in_shard = 0
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def summary(self) -> dict:
        for shard in self.shards:
            shard["sha256"] = sha256_file(self.directory / shard["file"])
        return {"shards": self.shards, "tokens": self.tokens, "bytes": self.bytes, "docs": self.docs}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def prepare(
    specs: list[str],
    tokenizer_path: Path,
    out_dir: Path,
    *,
    val_fraction: float = 0.05,
    field: str = "text",
    doc_split: str = "paragraph",
    batch_docs: int = 512,
    shard_tokens: int = 1 << 26,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Encode the sources into `out_dir` and return the written meta.json content."""
    if not specs:
        raise UserError("no sources given; name files, directories, globs or stdlib-docs")
    if not 0.0 <= val_fraction < 0.5:
        raise UserError(f"validation fraction must be in [0, 0.5) (got {val_fraction})")
    sources = [resolve_source(s, field=field, doc_split=doc_split) for s in specs]
    tokenizer = TextTokenizer.load(tokenizer_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    period = round(1 / val_fraction) if val_fraction > 0 else 0
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".prepare-") as tmp:
        writers = {s: _SplitWriter(Path(tmp), s, dtype, shard_tokens) for s in SPLITS}
        source_meta = [_encode_source(src, tokenizer, writers, period, batch_docs, dtype, progress) for src in sources]
        for writer in writers.values():
            writer.close()
        if writers["train"].tokens == 0:
            raise UserError("the sources hold no documents to train on; check the inputs")
        meta = {
            "format": FORMAT,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "tokenizer_sha256": tokenizer.sha256(),
            "val_fraction": val_fraction,
            "doc_split": doc_split,
            "sources": source_meta,
            "splits": {s: w.summary() for s, w in writers.items()},
        }
        _install(Path(tmp), out_dir, meta, tokenizer)
    return meta


def _encode_source(
    source: Source,
    tokenizer: TextTokenizer,
    writers: dict[str, _SplitWriter],
    period: int,
    batch_docs: int,
    dtype: np.dtype,
    progress: Callable[[int], None] | None,
) -> dict:
    docs = 0
    n_bytes = 0
    digest = builtin_digest(source) if source.builtin else None  # hash the corpus as it streams by
    for batch, encoded in _encoded_ahead(_batched(iter_documents(source), batch_docs), tokenizer):
        for text, ids in zip(batch, encoded):
            index = writers["train"].docs + writers["val"].docs
            split = "val" if period and index % period == period - 1 else "train"
            raw = text.encode("utf-8")
            if digest is not None:
                digest.update(raw)
            size = len(raw)
            writers[split].write(np.asarray(ids + [tokenizer.eos_id], dtype=dtype), size)
            docs += 1
            n_bytes += size
        if progress:
            progress(sum(len(t) for t in batch))
    sha256 = digest.hexdigest() if digest is not None else source_fingerprint(source)
    return {"spec": source.spec, "sha256": sha256, "docs": docs, "bytes": n_bytes}


def _encoded_ahead(
    batches: Iterator[list[str]], tokenizer: TextTokenizer
) -> Iterator[tuple[list[str], list[list[int]]]]:
    """Yield (batch, ids) while the next batch is already encoding in a thread.

    The Rust encoder releases the GIL, so reading and writing shards overlaps with encoding.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: tuple[list[str], Future] | None = None
        for batch in batches:
            ahead = (batch, pool.submit(tokenizer.encode_batch, batch))
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = ahead
        if pending is not None:
            yield pending[0], pending[1].result()


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _install(tmp: Path, out_dir: Path, meta: dict, tokenizer: TextTokenizer) -> None:
    """Move new shards in, write tokenizer and meta.json, then drop shards of an older run."""
    old_meta = out_dir / "meta.json"
    old_files = {p.name for p in out_dir.glob("*_[0-9][0-9][0-9][0-9].bin")}
    new_files = set()
    for split in meta["splits"].values():
        for shard in split["shards"]:
            shutil.move(str(tmp / shard["file"]), out_dir / shard["file"])
            new_files.add(shard["file"])
    tokenizer.save(out_dir / "tokenizer.json")
    atomic_write_json(old_meta, meta)
    for name in old_files - new_files:
        (out_dir / name).unlink(missing_ok=True)


def load_meta(data_dir: Path) -> dict:
    """meta.json of a prepared data directory, with a clear error when it is not one."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise UserError(f"{data_dir} is not a prepared data directory (no meta.json); run `hybridlm prepare`")
    meta = read_json(path, "data meta")
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}; rerun `hybridlm prepare`")
    return meta
