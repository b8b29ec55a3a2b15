"""configs/: every file loads with the typed loaders, every run config plans (as ``mdlora plan``
does), README shows the top-level ones verbatim; ``mdlora plan`` without a config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mdlora.config import to_dict
from mdlora.embeddings.schema import Schema
from mdlora.jobs import plan
from mdlora.jobs.cli import main
from mdlora.trainer.config import load_adapt_config, load_retrain_config, load_run_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
LOADERS = {
    "pretrain.yaml": load_run_config,
    "adapt.yaml": load_adapt_config,
    "retrain.yaml": load_retrain_config,
}


@pytest.fixture
def tiny_schema(tiny_schema_dict, tmp_path) -> str:
    path = tmp_path / "tiny-schema.yaml"
    path.write_text(yaml.safe_dump(tiny_schema_dict))
    return str(path)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_loads_and_plans(path, tiny_schema, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # config paths are relative to where commands run: the checkout
    if path.name == "schema.yaml":
        assert Schema.load(path).tables
        return
    assert path.name in LOADERS, f"{path}: not a known config kind ({sorted(LOADERS)})"
    cfg = LOADERS[path.name](str(path))
    if path.name == "adapt.yaml":
        return  # no tables of its own: it adapts the backbone its sibling pretrain.yaml publishes
    if path.name == "retrain.yaml":
        run, path = cfg.pretrain, tmp_path / "retrain-pretrain.yaml"
        path.write_text(yaml.safe_dump(to_dict(cfg.pretrain)))
    else:
        run = cfg
    found = Path(run.data.schema).is_file()  # data from gen-logs / import-movielens, if there
    args = ["plan", "--config", str(path), "--json"]
    assert main(args + ([] if found else ["--set", f"data.schema={tiny_schema}"])) == 0, (
        capsys.readouterr().err
    )
    d = json.loads(capsys.readouterr().out)
    assert d["world_size"] == run.dist.world_size and d["tables"]


@pytest.mark.parametrize(
    "directory", sorted({p.parent for p in CONFIGS if p.name == "adapt.yaml"}), ids=lambda p: p.name
)
def test_a_sets_configs_agree_on_data_and_registry(directory):
    pre = load_run_config(str(directory / "pretrain.yaml"))
    adapt = load_adapt_config(str(directory / "adapt.yaml"))
    assert (adapt.data.schema, adapt.data.train, adapt.data.val) == (
        pre.data.schema,
        pre.data.train,
        pre.data.val,
    )
    assert (adapt.output.root, adapt.output.model) == (pre.output.root, pre.output.model)
    assert adapt.lora.ranks is None or len(adapt.lora.ranks) == len(pre.model.hidden)
    if (directory / "retrain.yaml").is_file():
        retrain = load_retrain_config(str(directory / "retrain.yaml")).pretrain
        assert (retrain.data.schema, retrain.output.root, retrain.output.model) == (
            pre.data.schema,
            pre.output.root,
            pre.output.model,
        )


@pytest.mark.parametrize("name", ["pretrain.yaml", "adapt.yaml", "retrain.yaml", "schema.yaml"])
def test_readme_shows_the_configs_verbatim(name):
    assert (
        f"```yaml\n{(ROOT / 'configs' / name).read_text()}```" in (ROOT / "README.md").read_text()
    )


def test_plan_without_a_config_plans_the_example_schema(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # found from the package, not the working directory
    assert main(["plan", "--world-size", "8", "--device", "cuda", "--hbm-gb", "80", "--json"]) == 0
    out, err = capsys.readouterr()
    d = json.loads(out)
    assert d["world_size"] == 8
    assert set(d["tables"]) == {
        t.name for t in Schema.load(ROOT / "configs" / "schema.yaml").tables
    }
    assert "configs/schema.yaml" in err
    monkeypatch.setattr(plan, "DEFAULT_SCHEMA", tmp_path / "none.yaml")  # an installed package
    assert main(["plan", "--world-size", "8"]) == 2
    assert (
        "no schema to plan; pass --config FILE (its data.schema) or --set"
        in capsys.readouterr().err
    )


def test_plan_reads_a_relative_schema_from_the_working_directory_first(
    tiny_schema, tmp_path, capsys, monkeypatch
):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "schema.yaml").write_text(Path(tiny_schema).read_text())
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "run.yaml").write_text("data: {schema: logs/schema.yaml}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--config", "configs/run.yaml", "--world-size", "2", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["tables"]) == {"user", "item", "cat"}
