"""API keys: read once, kept only as sha256 hashes, named in logs by a short prefix of the hash.

Why hashes: a memory dump, a log line or a review record then never holds a usable key. A key file
may itself hold hashes (`sha256:<hex>` lines) so the plain keys need not sit on the server's disk.
The key id (first 12 hex characters of the hash) is what metrics, rate limits, audit lines and the
review queue use.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from hybridlm.errors import UserError

ENV_VAR = "HYBRIDLM_API_KEYS"
KEY_ID_CHARS = 12
_HASHED = re.compile(r"sha256:([0-9a-f]{64})")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id(digest: str) -> str:
    """The public name of a key: a prefix of its hash, safe to log."""
    return digest[:KEY_ID_CHARS]


@dataclass(frozen=True)
class KeyStore:
    """The accepted keys, as hashes only. An empty store means authentication is off."""

    hashes: frozenset[str]

    @property
    def enabled(self) -> bool:
        return bool(self.hashes)

    def identify(self, presented: str | None) -> str | None:
        """The key id of a presented key, or None when it is missing or unknown."""
        if not presented:
            return None
        digest = hash_key(presented)
        return key_id(digest) if digest in self.hashes else None


def parse_keys(text: str, where: str) -> frozenset[str]:
    """Hashes of the keys in `text`: one key (or `sha256:<hex>`) per line or comma-separated;
    blank lines and `#` comments are skipped."""
    hashes = set()
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        for item in (part.strip() for part in line.split(",")):
            if not item:
                continue
            hashed = _HASHED.fullmatch(item.lower()) if item.lower().startswith("sha256:") else None
            if item.lower().startswith("sha256:") and hashed is None:
                raise UserError(f"{where}: {item[:14]}... is not sha256: followed by 64 hex digits")
            if any(c.isspace() for c in item):
                raise UserError(f"{where}: a key may not contain spaces; put one key per line")
            hashes.add(hashed.group(1) if hashed else hash_key(item))
    return frozenset(hashes)


def load_keys(path: Path | None, env: dict[str, str] | None = None, variable: str = ENV_VAR) -> KeyStore:
    """Keys from the file `path` and the `variable` (HYBRIDLM_API_KEYS; comma-separated), together."""
    env = os.environ if env is None else env
    hashes: frozenset[str] = frozenset()
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"API key file not found: {path}") from None
        except (UnicodeDecodeError, IsADirectoryError):
            raise UserError(f"API key file {path} is not a text file with one key per line") from None
        hashes = parse_keys(text, str(path))
        if not hashes:
            raise UserError(f"API key file {path} holds no keys; put one key per line")
    if env.get(variable, "").strip():
        hashes |= parse_keys(env[variable], variable)
    return KeyStore(hashes)
