"""ModelConfig validation, presets, TOML + override parsing."""

from __future__ import annotations

import pytest

from hybridlm.config import PRESETS, ModelConfig, preset
from hybridlm.errors import UserError
from hybridlm.train.args import load_run_config


@pytest.mark.parametrize("name", PRESETS)
def test_presets_build(name):
    cfg = preset(name)
    assert len(cfg.layer_pattern) == cfg.n_layer


def test_pattern_from_dense_layer_count():
    assert ModelConfig(n_layer=6, n_dense_layers=2).layer_pattern == "DDSSSS"
    assert preset("small", n_layer=8).layer_pattern == "DDSSSSSS"  # the preset pattern is re-derived


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"n_layer": 4, "n_dense_layers": 5}, "n_dense_layers (5) is larger than model.n_layer (4)"),
        ({"window": 0}, "model.window must be > 0"),
        ({"stride": -3}, "model.stride must be > 0"),
        ({"layer_pattern": "DDX", "n_layer": 3}, "only D and S"),
        ({"layer_pattern": "DS", "n_layer": 3}, "has 2 letters"),
        ({"d_model": 100, "n_head": 3}, "divisible"),
        ({"position": "alibi"}, "model.position must be one of"),
        ({"n_head": 6, "n_kv_head": 4}, "multiple of model.n_kv_head"),
    ],
)
def test_bad_configs_say_what_to_fix(kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**kwargs)


def test_unknown_key_lists_the_known_ones(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[model]\npreset = "tiny"\nwindoww = 3\n')
    with pytest.raises(UserError) as err:
        load_run_config(toml, [])
    assert "unknown model key(s) windoww" in str(err.value) and "window" in str(err.value)


def test_overrides_parse_as_toml_values(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[model]\npreset = "tiny"\n[train]\nsteps = 5\n')
    cfg = load_run_config(toml, ["train.lr=1e-3", "model.window=16", "train.dtype=fp32", "train.steps=7"])
    assert (cfg.train.lr, cfg.model.window, cfg.train.dtype, cfg.train.steps) == (1e-3, 16, "fp32", 7)


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.steps=abc", "train.steps must be int"),
        ("train.seq_len=4096", "exceeds model.max_seq_len"),
        ("nosection=1", "unknown config section"),
        ("train.lr", "not of the form"),
        ("train.dtype=fp16", "train.dtype must be one of"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(UserError, match=message):
        load_run_config(None, ['model.preset="tiny"', override])
