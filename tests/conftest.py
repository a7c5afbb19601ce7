"""Shared test helpers: where the shared data lives, and a skip when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybridlm.data.prepare import prepare
from hybridlm.tokenizer import train_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(relative: str) -> Path:
    """A file under ../shared/data, or a skip that says why (CI always has it)."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared datasets sit beside the checkout")
    return path


TINY_MODEL = ['model.preset="tiny"', "model.n_layer=2", "model.d_model=64", "model.window=8", "model.stride=8"]
"""Overrides for a two-layer model that trains in milliseconds per step."""


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """A prepared data directory of short numbered paragraphs with its own 300-token tokenizer."""
    root = tmp_path_factory.mktemp("tiny_data")
    text = "".join(f"Paragraph {i}: the value of x{i} is {i * 7 % 13}.\n\n" for i in range(800))
    (root / "in.txt").write_text(text)
    train_tokenizer(text.split("\n\n"), vocab_size=300).save(root / "tokenizer.json")
    prepare([str(root / "in.txt")], root / "tokenizer.json", root / "shards")
    return root / "shards"
