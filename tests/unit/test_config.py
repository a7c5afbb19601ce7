"""ModelConfig validation, presets, TOML + override parsing."""

from __future__ import annotations

import pytest

from hybridlm.config import PRESETS, ModelConfig, preset
from hybridlm.errors import UserError
from hybridlm.train.config import load_run_config
from hybridlm.train.distributed import check_world


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
    cfg = load_run_config(toml, ["optim.lr=1e-3", "model.window=16", "train.dtype=fp32", "train.steps=7"])
    assert (cfg.optim.lr, cfg.model.window, cfg.train.dtype, cfg.train.steps) == (1e-3, 16, "fp32", 7)


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.steps=abc", "train.steps must be int"),
        ("data.seq_len=4096", "exceeds model.max_seq_len"),
        ("nosection=1", "unknown config section"),
        ("train.lr", "not of the form"),
        ("train.dtype=fp16", "train.dtype must be one of"),
        ("parallel.tp_degree=2", "parallel.tp_degree \\(2\\) applies to parallel.strategy = \"tp\""),
        ("parallel.pp_microbatches=8", "apply to parallel.strategy = \"pp\""),
        ("parallel.pp_degree=2", "parallel.pp_degree \\(2\\) applies to parallel.strategy = \"pp\""),
        ("parallel.strategy=\"zero3\"", "parallel.strategy must be one of ddp, fsdp, tp, pp"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(UserError, match=message):
        load_run_config(None, ['model.preset="tiny"', override])


@pytest.mark.parametrize(
    "overrides,size,message",
    [
        (["parallel.pp_degree=3"], 4, "parallel.pp_degree \\(3\\) must divide the number of processes \\(4\\)"),
        (["parallel.pp_degree=2", "data.batch_size=6", "parallel.pp_microbatches=2"], 4,
         "data.batch_size \\(6\\) must be divisible by parallel.pp_microbatches \\(2\\) times the 2 processes"),
        (["parallel.pp_degree=4"], 4, "the model has 2 blocks"),
    ],
)
def test_pipeline_layouts_a_world_cannot_run_are_refused_before_training(overrides, size, message):
    cfg = load_run_config(None, ['model.preset="tiny"', "model.n_layer=2", "parallel.strategy=\"pp\"",
                                 "data.batch_size=8", *overrides])
    with pytest.raises(UserError, match=message):
        check_world(cfg, size)


def test_help_config_prints_every_key_at_its_default_as_loadable_toml(tmp_path):
    """`hybridlm train --help-config` lists each section's keys with docstrings; the text is TOML
    that loads back into the default config (so every default it shows is the real one)."""
    import dataclasses
    import subprocess
    import sys

    from hybridlm.train.config import SECTIONS, RunConfig

    shown = subprocess.run([sys.executable, "-m", "hybridlm", "train", "--help-config"], capture_output=True,
                           text=True, timeout=120, check=False)
    assert shown.returncode == 0, shown.stderr
    for name, cls in SECTIONS.items():
        assert f"[{name}]" in shown.stdout
        for f in dataclasses.fields(cls):
            line = next(line for line in shown.stdout.splitlines() if line.startswith(f"{f.name} = "))
            assert len(line.split("# ", 1)[1]) > 10, line  # a type and a docstring after the default
    (tmp_path / "all.toml").write_text(shown.stdout)
    assert load_run_config(tmp_path / "all.toml", []).to_dict() == RunConfig(model=ModelConfig()).to_dict()


def test_a_key_of_the_old_single_train_section_names_its_new_place():
    with pytest.raises(UserError, match=r"train\.lr is now optim\.lr, train\.seq_len is now data\.seq_len"):
        load_run_config(None, ["train.lr=1e-3", "train.seq_len=64"])


def test_a_run_directory_from_before_the_sections_still_reads(tmp_path):
    """config.json of earlier releases kept every training key in [train]: resume reads it."""
    from hybridlm.train.config import saved_run_config

    legacy = {"model": {"preset": "tiny"}, "train": {"data": "d", "out": "o", "steps": 9, "lr": 1e-3, "seq_len": 64,
                                                     "schedule": "linear", "eval_every": 3, "parallel": "fsdp"}}
    now = load_run_config(None, ['model.preset="tiny"', "data.path=d", "train.out=o", "train.steps=9", "optim.lr=1e-3",
                                 "data.seq_len=64", "schedule.decay=linear", "eval.every=3", "parallel.strategy=fsdp"])
    assert saved_run_config(legacy) == now
