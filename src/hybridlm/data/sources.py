"""Document sources: text files, directories, globs, JSONL files and the built-in corpus.

A source spec is a string: `stdlib-docs` (or `stdlib-docs:docstrings|reference|qa`), a path to
a file or a directory, or a glob. Documents stream one at a time, so inputs larger than memory
are fine. Text files are cut into documents at blank lines (`paragraph`), per line, or whole.
"""

from __future__ import annotations

import glob
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from hybridlm.data import stdlib_docs
from hybridlm.errors import UserError
from hybridlm.fileio import jsonl_records, sha256_file

BUILTIN = "stdlib-docs"
DOC_SPLITS = ("paragraph", "line", "file")
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".jsonl"}


@dataclass(frozen=True)
class Source:
    """A resolved source: what it is and which files it reads."""

    spec: str
    paths: tuple[Path, ...] = ()
    part: str | None = None  # builtin corpus part
    field: str = "text"  # JSONL field holding the document
    doc_split: str = "paragraph"

    @property
    def builtin(self) -> bool:
        return not self.paths


def resolve_source(spec: str, *, field: str = "text", doc_split: str = "paragraph") -> Source:
    """Check that a source spec names something readable; raise UserError saying what is wrong."""
    if doc_split not in DOC_SPLITS:
        raise UserError(f"document split must be one of {', '.join(DOC_SPLITS)} (got {doc_split!r})")
    if spec == BUILTIN or spec.startswith(BUILTIN + ":"):
        part = spec.partition(":")[2] or None
        if part is not None and part not in stdlib_docs.PARTS:
            raise UserError(f"unknown part {part!r} of {BUILTIN}; parts: {', '.join(stdlib_docs.PARTS)}")
        return Source(spec, part=part)
    path = Path(spec).expanduser()
    if path.is_dir():
        paths = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        where = f"directory {spec} has no text files ({', '.join(sorted(TEXT_SUFFIXES))})"
    elif path.is_file():
        paths, where = [path], ""
    else:
        paths = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        where = f"source {spec!r} is not a file, directory or glob that matches files; check the path"
    if not paths:
        raise UserError(where)
    empty = [p for p in paths if p.stat().st_size == 0]
    if len(empty) == len(paths):
        raise UserError(f"source {spec!r} is empty ({len(paths)} file(s) of 0 bytes)")
    return Source(spec, paths=tuple(paths), field=field, doc_split=doc_split)


def iter_documents(source: Source) -> Iterator[str]:
    """The source's non-empty documents, in a fixed order."""
    if source.builtin:
        yield from stdlib_docs.documents(source.part)
        return
    for path in source.paths:
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, source.field)
        else:
            yield from _text_documents(path, source.doc_split)


def builtin_digest(source: Source) -> "hashlib._Hash":
    """The digest a builtin source's fingerprint starts from; feed it each document's UTF-8 bytes."""
    return hashlib.sha256(f"{source.spec} python {sys.version_info[:3]}".encode())


def source_fingerprint(source: Source) -> str:
    """sha256 of what the source reads: file bytes, or the builtin corpus's text."""
    if source.builtin:
        digest = builtin_digest(source)
        for doc in iter_documents(source):
            digest.update(doc.encode("utf-8"))
        return digest.hexdigest()
    digest = hashlib.sha256()
    for path in source.paths:
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def _text_documents(path: Path, doc_split: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        if doc_split == "file":
            text = f.read()
            if text.strip():
                yield text
            return
        paragraph: list[str] = []
        for line in f:
            if doc_split == "line":
                if line.strip():
                    yield line.rstrip("\r\n")
            elif line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "".join(paragraph).rstrip("\r\n")
                paragraph = []
        if paragraph:
            yield "".join(paragraph).rstrip("\r\n")


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    for number, record in jsonl_records(path):
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise UserError(f"{path}: line {number} has no string field {field!r}; pick the field with --field")
        if record[field].strip():
            yield record[field]
