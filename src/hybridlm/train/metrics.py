"""metrics.jsonl: one JSON record per line, appended during training, read by resume and reports."""

from __future__ import annotations

import json
from pathlib import Path

from hybridlm.errors import UserError
from hybridlm.fileio import atomic_write_text


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A last line cut off by a kill is skipped; a bad line before
    it means the file was damaged, which a report should not paper over."""
    if not path.is_file():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1)
             if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        elif index < len(lines) - 1:
            raise UserError(f"{path}: line {number} is not a metrics record; the file is damaged "
                            "(only a cut-off last line is skipped)")
    return records


class MetricsLog:
    """Append-only metrics.jsonl; on resume, records after the checkpoint are dropped first."""

    def __init__(self, path: Path, keep_until_step: int | None, write: bool = True) -> None:
        self.path, self.active = path, write
        if not write:
            return
        if keep_until_step is not None and path.exists():
            kept = [r for r in read_metrics(path) if r["step"] <= keep_until_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        elif keep_until_step is None:
            atomic_write_text(path, "")

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
