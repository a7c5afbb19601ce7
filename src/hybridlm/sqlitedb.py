"""The SQLite files the server and the tools share (review queue, feedback, human studies): one
file that one process writes while others read (WAL mode), each call on its own connection so
any thread may call."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

from hybridlm.errors import UserError


def connect(path: Path) -> sqlite3.Connection:
    """A connection whose rows read by column name; waits up to 10 s for a writer."""
    db = sqlite3.connect(path, timeout=10)
    db.row_factory = sqlite3.Row
    return db


def create(path: Path, schema: str, what: str) -> None:
    """Create the file (and its folder) with `schema` in WAL mode, or check an existing one opens."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with closing(connect(path)) as db, db:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(schema)
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{path} is not a {what} ({exc})") from None
