"""A human-evaluation study in one SQLite file: its settings, the cards people see and their ratings.

Why SQLite: one file that the rating page writes while `report` reads it (WAL mode), with no
service to run, as the serving review queue. A card is what one screen shows: in a pairwise study
a prompt with both replies in a random order; in a rating study a prompt with one reply. Which
run wrote a reply is kept beside the card and never sent to the page, so ratings are blind.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from hybridlm.errors import UserError
from hybridlm.sqlitedb import connect

CRITERIA = ("fluency", "coherence", "helpfulness")
MODES = ("pairwise", "rating")
PAIRWISE_CHOICES = ("first", "second", "tie")
RATING_SCALE = range(1, 6)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS study (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cards (
    id INTEGER PRIMARY KEY,
    prompt TEXT NOT NULL,
    first_reply TEXT NOT NULL,
    second_reply TEXT,
    first_side TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ratings (
    card_id INTEGER NOT NULL REFERENCES cards(id),
    rater TEXT NOT NULL,
    criterion TEXT NOT NULL,
    value TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (card_id, rater, criterion)
);
"""


@dataclass(frozen=True)
class Card:
    id: int
    prompt: list[dict]
    """The conversation so far, as {"role", "content"} messages."""
    first_reply: str
    second_reply: str | None
    """None in a rating study."""
    first_side: str
    """"a" or "b": the run that wrote first_reply (the second is the other run's)."""


@dataclass(frozen=True)
class Rating:
    card: Card
    rater: str
    criterion: str
    value: str


class Study:
    """An existing study file; each call opens its own connection, so the page's threads may share it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"study not found: {self.path} (make one with `hybridlm eval human build`)")
        try:
            with closing(self._connect()) as db:
                settings = dict(db.execute("SELECT key, value FROM study").fetchall())
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{self.path} is not a human-evaluation study ({exc})") from None
        self.mode, self.label_a, self.label_b = settings["mode"], settings["label_a"], settings["label_b"]

    def _connect(self) -> sqlite3.Connection:
        return connect(self.path)

    def cards(self) -> list[Card]:
        with closing(self._connect()) as db:
            return [_card(row) for row in db.execute("SELECT * FROM cards ORDER BY id")]

    def card(self, card_id: int) -> Card:
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM cards WHERE id = ?", (card_id,)).fetchone()
        if row is None:
            raise UserError(f"no card {card_id} in this study")
        return _card(row)

    def next_card(self, rater: str) -> Card | None:
        """The first card this rater has not rated, or None when they have rated them all."""
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM cards WHERE id NOT IN (SELECT card_id FROM ratings WHERE rater = ?) "
                             "ORDER BY id LIMIT 1", (rater,)).fetchone()
        return None if row is None else _card(row)

    def progress(self, rater: str) -> tuple[int, int]:
        """(cards this rater has rated, cards in the study)."""
        with closing(self._connect()) as db:
            done = db.execute("SELECT COUNT(DISTINCT card_id) FROM ratings WHERE rater = ?", (rater,)).fetchone()[0]
            total = db.execute("SELECT COUNT(*) FROM cards").fetchone()[0]
        return int(done), int(total)

    def rate(self, card_id: int, rater: str, values: dict[str, str]) -> None:
        """One rater's verdict on every criterion of a card (a second verdict replaces the first)."""
        self.card(card_id)
        rater = rater.strip()
        if not rater or len(rater) > 64:
            raise UserError("give a rater name of 1 to 64 characters")
        allowed = PAIRWISE_CHOICES if self.mode == "pairwise" else tuple(str(v) for v in RATING_SCALE)
        missing = [c for c in CRITERIA if c not in values]
        unknown = [k for k in values if k not in CRITERIA]
        if missing or unknown:
            raise UserError(f"rate every criterion ({', '.join(CRITERIA)}): missing {missing or 'none'}, "
                            f"unknown {unknown or 'none'}")
        for criterion, value in values.items():
            if value not in allowed:
                raise UserError(f"{criterion} must be one of {', '.join(allowed)} (got {value!r})")
        now = time.time()
        with closing(self._connect()) as db, db:
            db.executemany("INSERT OR REPLACE INTO ratings VALUES (?, ?, ?, ?, ?)",
                           [(card_id, rater, c, values[c], now) for c in CRITERIA])

    def ratings(self) -> list[Rating]:
        cards = {card.id: card for card in self.cards()}
        with closing(self._connect()) as db:
            rows = db.execute("SELECT * FROM ratings ORDER BY card_id, rater, criterion").fetchall()
        return [Rating(cards[row["card_id"]], row["rater"], row["criterion"], row["value"]) for row in rows]


def _card(row: sqlite3.Row) -> Card:
    return Card(row["id"], json.loads(row["prompt"]), row["first_reply"], row["second_reply"], row["first_side"])


def write_study(path: Path, mode: str, labels: tuple[str, str], cards: list[Card]) -> Study:
    """A new study file, written beside its final name and renamed into place (never half-written)."""
    if mode not in MODES:
        raise UserError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
    path = Path(path)
    if path.exists():
        raise UserError(f"{path} exists; give a new --out (a study's ratings are never overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    with closing(sqlite3.connect(partial)) as db, db:
        db.executescript(_SCHEMA)
        db.executemany("INSERT INTO study VALUES (?, ?)", [("mode", mode), ("label_a", labels[0]),
                                                           ("label_b", labels[1]), ("created", str(time.time()))])
        db.executemany("INSERT INTO cards VALUES (?, ?, ?, ?, ?)",
                       [(c.id, json.dumps(c.prompt), c.first_reply, c.second_reply, c.first_side) for c in cards])
    with closing(sqlite3.connect(partial)) as db:
        db.execute("PRAGMA journal_mode=WAL")
    partial.replace(path)
    return Study(path)
