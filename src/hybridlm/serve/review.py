"""The human review queue: flagged and blocked texts in a SQLite file, worked through with
`hybridlm review list|show|resolve`.

Why SQLite: one file the server appends to and a reviewer reads at the same time (WAL mode), with
no service to run. Each item keeps what a reviewer needs and no more: the key id (never the key),
the direction (prompt or output), the rule, an excerpt around the match, the time and a status.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

from hybridlm.errors import UserError
from hybridlm.sqlitedb import connect
from hybridlm.sqlitedb import create as create_db

EXCERPT_CHARS = 160
STATUSES = ("open", "resolved")
DECISIONS = ("allowed", "confirmed")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS review_items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    request_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    direction TEXT NOT NULL,
    rule TEXT NOT NULL,
    action TEXT NOT NULL,
    excerpt TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'open',
    decision TEXT,
    note TEXT,
    resolved REAL
)"""


@dataclass(frozen=True)
class ReviewItem:
    id: int
    created: float
    request_id: str
    key_id: str
    direction: str
    rule: str
    action: str
    excerpt: str
    status: str
    decision: str | None
    note: str | None
    resolved: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def excerpt(text: str, start: int, end: int, width: int = EXCERPT_CHARS) -> str:
    """The match with some context on each side, marked with >> <<, at most about `width` characters."""
    side = max(0, (width - (end - start)) // 2)
    match = text[start:end][:width]
    before, after = text[max(0, start - side):start], text[end:end + side]
    return f"{'...' if start > side else ''}{before}>>{match}<<{after}{'...' if end + side < len(text) else ''}"


def items_for(hits: list, direction: str, text: str, request_id: str, key_id: str | None) -> list[dict]:
    """Rows for the safety hits a person should see (flag and block; redactions are not reviewed)."""
    return [{"request_id": request_id, "key_id": key_id or "anonymous", "direction": direction, "rule": h.rule,
             "action": h.action, "excerpt": excerpt(text, h.start, h.end)} for h in hits if h.action in ("flag", "block")]


class ReviewQueue:
    """The queue in one SQLite file. Each call opens its own connection, so any thread may call."""

    def __init__(self, path: Path, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise UserError(f"review database not found: {self.path} (the server writes it; pass --db)")
        create_db(self.path, _SCHEMA, "review database")

    def _connect(self) -> sqlite3.Connection:
        return connect(self.path)

    def add(self, items: list[dict]) -> list[int]:
        """Store items (request_id, key_id, direction, rule, action, excerpt); return their ids."""
        now = time.time()
        ids = []
        with closing(self._connect()) as db, db:
            for item in items:
                cursor = db.execute(
                    "INSERT INTO review_items (created, request_id, key_id, direction, rule, action, excerpt) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (now, item["request_id"], item["key_id"], item["direction"], item["rule"], item["action"],
                     item["excerpt"]))
                ids.append(int(cursor.lastrowid))
        return ids

    def list(self, status: str | None = "open", limit: int = 50) -> list[ReviewItem]:
        if status is not None and status not in STATUSES:
            raise UserError(f"status must be one of {', '.join(STATUSES)} or all (got {status!r})")
        where, args = ("WHERE status = ?", (status,)) if status else ("", ())
        with closing(self._connect()) as db:
            rows = db.execute(f"SELECT * FROM review_items {where} ORDER BY id LIMIT ?", (*args, limit)).fetchall()
        return [ReviewItem(**dict(row)) for row in rows]

    def get(self, item_id: int) -> ReviewItem:
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM review_items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise UserError(f"no review item {item_id} in {self.path} (see `hybridlm review list`)")
        return ReviewItem(**dict(row))

    def resolve(self, item_id: int, decision: str, note: str = "") -> ReviewItem:
        """Close an item: `allowed` (the text was fine) or `confirmed` (the filter was right)."""
        if decision not in DECISIONS:
            raise UserError(f"decision must be one of {', '.join(DECISIONS)} (got {decision!r})")
        item = self.get(item_id)
        if item.status == "resolved":
            raise UserError(f"review item {item_id} is already resolved ({item.decision})")
        with closing(self._connect()) as db, db:
            db.execute("UPDATE review_items SET status = 'resolved', decision = ?, note = ?, resolved = ? WHERE id = ?",
                       (decision, note or None, time.time(), item_id))
        return self.get(item_id)

    def counts(self) -> dict[str, int]:
        with closing(self._connect()) as db:
            rows = db.execute("SELECT status, COUNT(*) FROM review_items GROUP BY status").fetchall()
        return {status: 0 for status in STATUSES} | {row[0]: row[1] for row in rows}


def format_item(item: ReviewItem, full: bool = False) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(item.created))
    line = f"#{item.id:<5} {when}  {item.status:<8} {item.direction:<6} {item.action:<6} {item.rule:<16} key {item.key_id}"
    if not full:
        return f"{line}\n       {item.excerpt!r}"
    extra = [f"request   {item.request_id}", f"excerpt   {item.excerpt}"]
    if item.status == "resolved":
        extra.append(f"decision  {item.decision}" + (f" ({item.note})" if item.note else ""))
    return "\n".join([line, *extra])
