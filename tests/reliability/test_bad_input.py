"""Bad input, table-driven, through the real CLI (``mdlora.jobs.cli.main``): every case exits 2 with one
error line naming the problem, and writes nothing.

Cases: schema/log mismatches (pretrain), configs with unknown keys, wrong types and impossible
values (pretrain, adapt), damaged bundles (score), and domain names with path characters
(add-domain, bundles). Pretrain cases must be refused before Ray starts: ``init_ray`` is a
tripwire here, so a case that slips through fails fast instead of training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

from mdlora.jobs.cli import main
from tests.reliability.conftest import adapt_overrides, run_overrides, sets


def _table(logs: Path) -> pa.Table:
    return ds.dataset(str(logs / "train"), format="parquet", partitioning="hive").to_table()


def _col(t: pa.Table, name: str, values) -> pa.Table:
    return t.set_column(t.schema.get_field_index(name), name, values)


# ---- mutations: (table) -> table, each one kind of schema/log mismatch -------------------------
LOGS = {
    "missing_column": (lambda t: t.drop_columns(["price"]), ["missing column", "'price'"]),
    "wrong_dtype": (lambda t: _col(t, "item_id", pc.cast(t["item_id"], pa.string())),
                    ["'item_id'", "wrong type string"]),
    "unknown_domain": (lambda t: _col(t, "domain", pa.array(["zz"] * t.num_rows)), ["'domain'", "zz"]),
    "null_label": (lambda t: _col(t, "click", pa.array([None] * t.num_rows, pa.int8())), ["'click'", "null"]),
    "label_not_01": (lambda t: _col(t, "click", pa.array(np.full(t.num_rows, 2, np.int8))), ["'click'", "2"]),
    "id_out_of_range": (lambda t: _col(t, "item_id", pa.array(np.full(t.num_rows, 10**6))),
                        ["'item_id'", "1000000"]),
    "dense_null": (lambda t: _col(t, "price", pa.array([None] * t.num_rows, pa.float32())),
                   ["'price'", "null"]),
}

# ---- schema edits: (schema dict) -> None ---------------------------------------------------------
SCHEMAS = {
    "table_dim_0": (lambda s: s["tables"][0].update(dim=0), ["dim", "0"]),
    "schema_unknown_key": (lambda s: s["tables"][0].update(dims=8), ["dims", "unknown key"]),
    "domain_value_path": (lambda s: s["domain"].update(values=["d00", "../x", "d02"]), ["'../x'"]),
    "dim_not_shardable": (lambda s: s["tables"][0].update(dim=6), ["table 'user'", "6 columns", "multiple of 4"]),
}

# ---- config overrides on pretrain / adapt --------------------------------------------------------
CONFIGS = {
    "unknown_key": ("pretrain", ["loop.epoch=3"], ["epoch", "unknown key"]),
    "wrong_type": ("pretrain", ["data.batch_size=many"], ["batch_size", "many"]),
    "batch_size_0": ("pretrain", ["data.batch_size=0"], ["batch_size", ">= 1"]),
    "lora_rank_0": ("adapt", ["lora.ranks=[0,4]"], ["ranks", "[0, 4]"]),
    "lora_alpha_0": ("adapt", ["lora.alpha=0"], ["alpha", "> 0"]),
    "lora_alpha_negative": ("adapt", ["lora.alpha=-2"], ["alpha", "-2"]),
    "world_size_over_cpus": ("pretrain", ["dist.world_size=64"], ["dist.world_size", "64", "CPUs"]),
    "adapt_world_size_over_cpus": ("adapt", ["dist.world_size=64"], ["dist.world_size", "64", "CPUs"]),
    "row_wise_on_cpu": ("pretrain", ["dist.world_size=2", "dist.sharding_types=[row_wise]"],
                        ["row_wise", "cuda"]),
    "shard_unknown_table": ("pretrain", ["dist.table_sharding={nosuch: [column_wise]}"], ["nosuch"]),
}


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Tripwire: bad input must be refused before any Ray start."""
    import mdlora.infra.ray_backend

    def refuse(*_, **__):
        raise AssertionError("bad input reached Ray")

    monkeypatch.setattr(mdlora.infra.ray_backend, "init_ray", refuse)


def _refused(capsys, argv: list[str], expect: list[str]) -> str:
    """Run the CLI; assert exit 2 and one error line holding every string of ``expect``."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mdlora {argv[0]}: error: "), err
    for part in expect:
        assert part in err[0], (part, err[0])
    return err[0]


def _config(tmp_path: Path) -> str:
    path = tmp_path / "run.yaml"
    path.write_text("{}\n")
    return str(path)


@pytest.mark.parametrize("case", sorted(LOGS))
def test_pretrain_refuses_bad_logs(case, tiny_logs, tmp_path, capsys):
    mutate, expect = LOGS[case]
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(mutate(_table(tiny_logs)), bad / "part-0.parquet")
    out = tmp_path / "out"
    over = run_overrides(tiny_logs, out) + [f"data.train={bad}", "data.val="]
    line = _refused(capsys, ["pretrain", "--config", _config(tmp_path), *sets(over)], expect)
    assert "bad/part-0.parquet" in line or str(bad) in line  # names the file
    assert not out.exists()


@pytest.mark.parametrize("case", sorted(SCHEMAS))
def test_pretrain_refuses_bad_schema(case, tiny_logs, tmp_path, capsys):
    edit, expect = SCHEMAS[case]
    schema = yaml.safe_load((tiny_logs / "schema.yaml").read_text())
    edit(schema)
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(schema))
    out = tmp_path / "out"
    over = run_overrides(tiny_logs, out) + [f"data.schema={path}"]
    line = _refused(capsys, ["pretrain", "--config", _config(tmp_path), *sets(over)], expect)
    assert str(path) in line
    assert not out.exists()


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_refuses_bad_config(case, world, tmp_path, capsys):
    job, extra, expect = CONFIGS[case]
    root = tmp_path / "out" if job == "pretrain" else world["root"]
    before = sorted(p.as_posix() for p in Path(world["root"]).rglob("*"))
    base = run_overrides(world["logs"], root) if job == "pretrain" else adapt_overrides(world["logs"], root)
    _refused(capsys, [job, "--config", _config(tmp_path), *sets(base + extra)], expect)
    assert not (tmp_path / "out").exists()
    assert sorted(p.as_posix() for p in Path(world["root"]).rglob("*")) == before


# ---- damaged bundles: (version dir) -> None; scored with --bundles d00=<version> ------------------
def _tamper(d: Path) -> None:
    data = bytearray((d / "adapter.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor's bytes
    (d / "adapter.safetensors").write_bytes(bytes(data))


def _manifest_edit(change):
    def edit(d: Path) -> None:
        m = json.loads((d / "manifest.json").read_text())
        change(m)
        (d / "manifest.json").write_text(json.dumps(m))
    return edit


BUNDLES = {
    "tampered_weights": (_tamper, ["adapter.safetensors", "sha256 mismatch"]),
    "wrong_backbone_hash": (_manifest_edit(lambda m: m["backbone"].update(content_hash="0" * 64)),
                            ["backbone", "0" * 64]),
    "newer_format": (_manifest_edit(lambda m: m.update(format_version=99)), ["format_version 99", "newer"]),
    "missing_manifest": (lambda d: (d / "manifest.json").unlink(), ["adapters/d00 v0001", "incomplete, no manifest.json"]),
}


@pytest.mark.parametrize("case", sorted(BUNDLES))
def test_score_refuses_damaged_bundle(case, world, tmp_path, capsys):
    damage, expect = BUNDLES[case]
    root = tmp_path / "registry"
    shutil.copytree(world["root"], root)
    damage(root / "adapters" / "d00" / "v0001")
    out = tmp_path / "preds.parquet"
    argv = ["score", "--config", _config(tmp_path), "--data", str(world["logs"] / "test"), "--out", str(out),
            "--bundles", "d00=v0001", *sets(adapt_overrides(world["logs"], root))]
    _refused(capsys, argv, expect)
    assert not out.exists() and not list(tmp_path.glob(".preds*"))
    if case == "tampered_weights":  # `bundles verify` flags it too (exit 2, names the file)
        assert main(["bundles", "verify", "d00", "v0001", "--root", str(root)]) == 2
        assert "FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["../x", "a/b", "/etc", "two words", ".hidden", "..", "x\ny"])
def test_domain_names_with_path_characters_are_refused(name, world, tmp_path, capsys):
    root = Path(world["root"])
    before = sorted(p.as_posix() for p in root.parent.rglob("*"))
    argv = ["add-domain", "--config", _config(tmp_path), "--domain", name, "--data", str(world["logs"] / "heldout" / "d03"),
            *sets(adapt_overrides(world["logs"], root))]
    _refused(capsys, argv, ["domain", repr(name)])
    _refused(capsys, ["bundles", "show", name, "--root", str(root)], [repr(name)])
    assert sorted(p.as_posix() for p in root.parent.rglob("*")) == before  # nothing written anywhere
    assert not list(tmp_path.iterdir())[1:]  # only run.yaml


def test_demo_never_deletes_a_directory_it_did_not_make(tmp_path):
    from tests.reliability.conftest import py_argv

    (tmp_path / "mine.txt").write_text("precious\n")
    r = py_argv(["-m", "mdlora.jobs.demo", "--out", str(tmp_path)], env=None, timeout=120)
    assert r.returncode != 0 and "is not an earlier demo's output" in r.stderr and str(tmp_path) in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
    assert (tmp_path / "mine.txt").read_text() == "precious\n"


def test_bundles_verify_of_an_unknown_name_is_an_error(world, capsys):
    _refused(capsys, ["bundles", "verify", "d0O", "--root", str(world["root"])], ["adapters/d0O", "no published versions"])
