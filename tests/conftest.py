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


@pytest.fixture(scope="session")
def tiny_run(tiny_shards, tmp_path_factory) -> Path:
    """A finished run directory: the two-layer model (one dense, one sparse layer) trained briefly
    on tiny_shards in fp32, for tests that need a real trained hybridlm run."""
    from hybridlm.train.args import load_run_config
    from hybridlm.train.trainer import train

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    train(load_run_config(None, TINY_MODEL + [
        f"train.data={tiny_shards}", f"train.out={out}", "train.steps=40", "train.batch_size=8", "train.seq_len=64",
        "train.eval_every=0", "train.eval_tokens=512", "train.checkpoint_every=40", "train.dtype=fp32",
        "train.lr=3e-3", "train.warmup_steps=4"]), progress=False)
    return out
