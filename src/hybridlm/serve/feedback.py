"""Human preferences from the chat page: thumbs up/down on a reply, or the reply picked of two,
kept in a SQLite file with the exact conversation, the replies, the model and the key id (never
the key); `hybridlm feedback export` turns them into preference pairs for an rm or dpo stage.

Export: every comparison is a pair (picked over the other); for ratings, every reply rated up is
paired with every reply rated down after the same conversation on the same model.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from itertools import product
from pathlib import Path

from hybridlm.errors import UserError
from hybridlm.fileio import atomic_write_text
from hybridlm.sqlitedb import connect
from hybridlm.sqlitedb import create as create_db

RATINGS = ("up", "down")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    kind TEXT NOT NULL,
    messages TEXT NOT NULL,
    reply TEXT,
    rating TEXT,
    chosen TEXT,
    rejected TEXT
)"""


class FeedbackStore:
    def __init__(self, path: Path, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise UserError(f"feedback database not found: {self.path} (the server writes it; pass --db)")
        create_db(self.path, _SCHEMA, "feedback database")

    def _connect(self) -> sqlite3.Connection:
        return connect(self.path)

    def add(self, *, key_id: str, model: str, version: str, messages: list[dict], reply: str | None = None,
            rating: str | None = None, chosen: str | None = None, rejected: str | None = None) -> int:
        """Store one rating (reply + rating) or one comparison (chosen + rejected); return its id."""
        kind = "rating" if rating is not None else "comparison"
        with closing(self._connect()) as db, db:
            cursor = db.execute(
                "INSERT INTO feedback (created, key_id, model, version, kind, messages, reply, rating, chosen, rejected)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), key_id, model, version, kind, json.dumps(messages, ensure_ascii=False), reply, rating,
                 chosen, rejected))
            return int(cursor.lastrowid)

    def rows(self) -> list[dict]:
        with closing(self._connect()) as db:
            return [dict(row) for row in db.execute("SELECT * FROM feedback ORDER BY id")]


def preference_pairs(rows: list[dict], model: str | None = None) -> list[dict]:
    """{"prompt", "chosen", "rejected", "model", "source_ids"} pairs from feedback rows (of one model)."""
    rows = [r for r in rows if model is None or r["model"] == model]
    pairs = [{"prompt": json.loads(r["messages"]), "chosen": r["chosen"], "rejected": r["rejected"],
              "model": r["model"], "source_ids": [r["id"]]} for r in rows if r["kind"] == "comparison"]
    rated: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for r in rows:
        if r["kind"] == "rating":
            rated.setdefault((r["model"], r["messages"]), {"up": [], "down": []})[r["rating"]].append(r)
    for (name, messages), by in rated.items():
        for up, down in product(by["up"], by["down"]):
            if up["reply"] != down["reply"]:
                pairs.append({"prompt": json.loads(messages), "chosen": up["reply"], "rejected": down["reply"],
                              "model": name, "source_ids": [up["id"], down["id"]]})
    return pairs


def export_feedback(db: Path, out: Path, model: str | None = None) -> dict:
    """Write the pairs as JSONL (prompt as messages, chosen, rejected) atomically; return counts."""
    store = FeedbackStore(db, create=False)
    rows = store.rows()
    pairs = preference_pairs(rows, model)
    atomic_write_text(Path(out), "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    kinds = [r["kind"] for r in rows if model is None or r["model"] == model]
    return {"out": str(out), "pairs": len(pairs), "ratings": kinds.count("rating"),
            "comparisons": kinds.count("comparison")}
