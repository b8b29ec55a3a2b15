"""Typed config loading: unknown keys, wrong types and bad values name the key."""

from __future__ import annotations

import dataclasses

import pytest

from mdlora.config import (
    ConfigError,
    apply_overrides,
    defaults_yaml,
    field_docs,
    from_dict,
    load_config,
    to_dict,
)
from mdlora.trainer.config import RunConfig, load_run_config


def test_defaults_round_trip():
    cfg = RunConfig()
    assert from_dict(RunConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": {"hiden": [1]}}, "model.hiden: unknown key"),
        ({"modle": {}}, "modle: unknown key"),
        ({"model": {"hidden": "256"}}, "model.hidden: expected a list"),
        ({"model": {"hidden": [256, "x"]}}, "model.hidden[1]: expected an integer"),
        ({"model": {"tower": "transformer"}}, "model.tower: 'transformer' is not one of"),
        ({"optim": {"dense_lr": "fast"}}, "optim.dense_lr: expected a number"),
        ({"optim": {"dense_lr": 0}}, "optim.dense_lr: must be > 0"),
        ({"data": {"batch_size": 0}}, "data.batch_size: must be >= 1"),
        ({"data": {"batch_size": True}}, "data.batch_size: expected an integer"),
        ({"dist": {"world_size": 0}}, "dist.world_size: must be >= 1"),
        ({"dist": {"sharding_types": ["diagonal"]}}, "unknown sharding type 'diagonal'"),
        ({"loop": {"shuffle": True}}, "loop.shuffle: unknown key"),
        ({"data": {"window": "2024-01-01"}}, "data.window: expected START..END"),
    ],
)
def test_bad_config_names_the_key(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(RunConfig, data)
    assert message in str(e.value)


def test_yaml_file_and_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("model:\n  hidden: [64, 32]\ndist:\n  world_size: 2\n")
    cfg = load_run_config(str(p), ["optim.dense_lr=5e-4", "model.tower=dcnv2", "data.domains=[a, b]"])
    assert cfg.model.hidden == [64, 32] and cfg.dist.world_size == 2
    assert cfg.optim.dense_lr == 5e-4 and cfg.model.tower == "dcnv2" and cfg.data.domains == ["a", "b"]
    # ints are accepted where floats are expected, and stay floats
    assert isinstance(load_run_config(str(p), ["optim.dense_lr=1"]).optim.dense_lr, float)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_run_config(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  dense_lr: 1e-3\n  sparse_lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: optim.sparse_lrr: unknown key"):
        load_run_config(str(typo))
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["model.tower"])


def test_load_config_without_file_uses_defaults():
    assert load_config(RunConfig, None, ["loop.epochs=3"]).loop.epochs == 3


@dataclasses.dataclass(kw_only=True)
class _Base:
    a: int = 1
    """The a.

    Two paragraphs."""
    b: str = ""


@dataclasses.dataclass(kw_only=True)
class _Child(_Base):
    c: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    """The c."""


@dataclasses.dataclass(kw_only=True)
class _Top:
    child: _Child = dataclasses.field(default_factory=lambda: _Child(a=5))
    need: str
    """Must be set."""


def test_field_docs_and_defaults_yaml():
    assert field_docs(_Child) == {"a": "The a.\n\nTwo paragraphs.", "c": "The c."}
    text = defaults_yaml(_Top, "head")
    assert text.splitlines()[:3] == ["# head", "", "child:"]
    assert "  # The a.\n  #\n  # Two paragraphs.\n  a: 5\n  b: ''\n  # The c.\n  c: [1, 2]\n" in text
    assert text.endswith("# (required) Must be set.\nneed: null\n")


def test_a_partial_section_keeps_the_defaults_its_parent_declares():
    from mdlora.trainer.config import load_adapt_config, load_retrain_config

    adapt = load_adapt_config(None, ["loop.seed=1"])
    assert (adapt.loop.seed, adapt.loop.epochs, adapt.loop.patience) == (1, 10, 2)  # not LoopConfig's 1 / 0
    assert load_adapt_config(None, []).loop.epochs == 10
    retrain = load_retrain_config(None, ["gate.holdout=h", "adapt.loop.seed=3"])
    assert (retrain.adapt.loop.seed, retrain.adapt.loop.epochs) == (3, 10)
