"""The ``mdlora`` command line: top-level options and the ``config`` command."""

from __future__ import annotations

import re

import pytest
import yaml

import mdlora
from mdlora.jobs.cli import main
from mdlora.trainer.config import (
    AdaptConfig,
    GateConfig,
    RetrainConfig,
    RunConfig,
    load_adapt_config,
    load_retrain_config,
    load_run_config,
)

LOADERS = {"pretrain": load_run_config, "adapt": load_adapt_config, "retrain": load_retrain_config}
DEFAULTS = {
    "pretrain": RunConfig(),
    "adapt": AdaptConfig(),
    "retrain": RetrainConfig(gate=GateConfig(holdout="logs/holdout")),
}


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"mdlora {mdlora.__version__}"


@pytest.mark.parametrize("kind", ["pretrain", "adapt", "retrain"])
def test_config_show_prints_every_default_with_its_docstring(kind, capsys, tmp_path):
    assert main(["config", "show", kind]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    keys = [i for i, line in enumerate(lines) if re.match(r"\s*\w+:", line)]
    assert len(keys) > 30
    for i in keys:  # the field's docstring (a section's: its class's) is the comment above it
        assert lines[i - 1].lstrip().startswith("# ") and len(lines[i - 1].strip()) > 3, lines[i]
    assert "# Ray Train workers (each one rank).\n" in text  # dist.world_size's docstring
    data = yaml.safe_load(text)
    if kind == "retrain":
        assert data["gate"]["holdout"] is None and "(required)" in text
        data["gate"]["holdout"] = "logs/holdout"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    loaded = LOADERS[kind](str(tmp_path / "c.yaml"))
    assert loaded == DEFAULTS[kind]  # the text is the defaults (adapt's loop: 10 epochs)


def test_config_show_needs_a_known_kind(capsys):
    with pytest.raises(SystemExit) as e:
        main(["config", "show", "serve"])
    assert e.value.code == 2 and "invalid choice: 'serve'" in capsys.readouterr().err
