"""Synthetic logs: layout, determinism, schema/id ranges, domain spread, the default data pinned,
shift families in truth.json, errors, CLI, S3 (the click model: test_synth_world.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from mdlora.atomic import sha256_tree
from mdlora.embeddings.schema import Schema
from mdlora.infra import synth, synth_world
from mdlora.jobs.cli import main

ARGS = dict(rows=60_000, domains=5, seed=3, holdout_domains=1, days=3, users=5000, items=3000)


def _read(path: Path):
    return ds.dataset(path, format="parquet", partitioning="hive").to_table()


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "logs"
    summary = synth.generate(str(out), **ARGS)
    return out, summary


def test_layout_and_schema(logs):
    out, summary = logs
    schema = Schema.load(out / "schema.yaml")
    assert schema.domain.values == ["d00", "d01", "d02", "d03"]  # d04 is held out
    assert schema.aux[0].values == ["F", "M"] and schema.date_column == "date"
    assert {f.policy for f in schema.sparse} == {"index", "hash"}
    assert any(f.multi for f in schema.sparse) and len(schema.dense) >= 2
    for split in ("train", "val", "test"):
        days = sorted(p.name for p in (out / split).iterdir())
        assert days == ["date=2026-01-01", "date=2026-01-02", "date=2026-01-03"]
        assert (out / split / days[0] / "part-00000.parquet").is_file()
        assert (out / "heldout" / "d04" / split / days[0] / "part-00000.parquet").is_file()
    train = _read(out / "train")
    assert set(schema.columns()) <= set(train.column_names) and "date" in train.column_names
    assert set(train["domain"].unique().to_pylist()) == set(schema.domain.values)
    assert set(train["gender"].unique().to_pylist()) == {"F", "M"}
    assert set(train["click"].unique().to_pylist()) == {0, 1}
    for f in schema.sparse:
        if f.policy == "index":
            col = train[f.column].combine_chunks()
            vals = col.flatten().to_numpy() if f.multi else col.to_numpy()
            assert vals.min() >= 0 and vals.max() < schema.table(f.table).num_embeddings, f.name
    assert train["city"].type == "string"
    assert summary["rows"] == ARGS["rows"]


def test_heldout_rows_written_separately(logs):
    out, _ = logs
    truth = json.loads((out / "truth.json").read_text())
    main_rows = sum(_read(out / s).num_rows for s in ("train", "val", "test"))
    held = _read(out / "heldout" / "d04")
    assert set(held["domain"].unique().to_pylist()) == {"d04"}
    assert held.num_rows == truth["domains"]["d04"]["rows"]
    assert main_rows + held.num_rows == ARGS["rows"]
    assert truth["domains"]["d04"]["heldout"] and not truth["domains"]["d00"]["heldout"]


def test_domain_sizes_ctr_and_aux_mix(logs):
    out, _ = logs
    truth = json.loads((out / "truth.json").read_text())
    t = _read(out / "train").to_pandas()
    rows = {k: v["rows"] for k, v in truth["domains"].items()}
    shares = np.array(list(rows.values())) / ARGS["rows"]
    assert 0.44 < shares.max() < 0.46 and 0.009 < shares.min() < 0.012
    assert t.groupby("domain").size().to_dict() == {
        k: v["rows_per_split"]["train"] for k, v in truth["domains"].items() if not v["heldout"]
    }
    split_share = (
        sum(v["rows_per_split"]["train"] for v in truth["domains"].values()) / ARGS["rows"]
    )
    assert 0.79 < split_share < 0.81
    assert 0.2 < truth["ctr"] < 0.4 and 0.7 < truth["oracle_auc"] < 0.9
    ctr = t.groupby("domain")["click"].mean()
    assert ctr.max() - ctr.min() > 0.05  # domain biases make CTRs differ
    female = t.groupby("domain")["gender"].apply(lambda g: (g == "F").mean())
    for d, v in female.items():
        assert abs(v - truth["domains"][d]["p_female"]) < 0.05
    assert female.max() - female.min() > 0.1


def test_deterministic_per_seed(logs, tmp_path):
    out, _ = logs
    synth.generate(str(tmp_path / "same"), **ARGS)
    synth.generate(str(tmp_path / "other"), **{**ARGS, "seed": 4})
    assert sha256_tree(tmp_path / "same") == sha256_tree(out)
    other = sha256_tree(tmp_path / "other")[1]
    assert all(other[k] != v for k, v in sha256_tree(out)[1].items() if k.endswith(".parquet"))


def _content(out: Path) -> str:
    """sha256 of the rows of every split (values, not Parquet bytes, which name the writer's
    version); ``price`` (a float32 exp, whose last bit depends on the CPU's SIMD path) rounded."""
    h = hashlib.sha256()
    for split in ("train", "val", "test"):
        rows = _read(out / split).to_pydict()
        rows["price"] = [round(p, 3) for p in rows["price"]]
        h.update(json.dumps(rows, sort_keys=True, default=str).encode())
    return h.hexdigest()


def test_default_data_unchanged(tmp_path):
    """``shifts=("a",)`` is the default and writes the data the generator wrote before the
    families b-e existed: the same files as the default, and the row values recorded then."""
    small = dict(rows=3000, domains=3, seed=7, days=2, users=400, items=300)
    synth.generate(str(tmp_path / "default"), **small)
    synth.generate(str(tmp_path / "a"), **small, shifts=("a",))
    synth.generate(str(tmp_path / "str"), **small, shifts="a")
    ref = sha256_tree(tmp_path / "default")[0]
    assert sha256_tree(tmp_path / "a")[0] == ref == sha256_tree(tmp_path / "str")[0]
    assert _content(tmp_path / "default") == (
        "68678342092eaed3d06cdc9e607cd91e9be85026510ba8850ae13674315592d3")  # recorded at ded4888
    truth = json.loads((tmp_path / "default" / "truth.json").read_text())
    assert truth["ctr"] == 0.29733333333333334  # a ratio of two counts
    assert truth["beta0"] == pytest.approx(-1.3981531275867698, rel=1e-9)
    assert truth["oracle_auc"] == pytest.approx(0.7779593096551363, rel=1e-9)
    assert truth["shifts"] == ["a"] and truth["params"]["shifts"] == ["a"]
    assert set(truth["shift_scales"]) == {"a"}
    for v in truth["domains"].values():
        assert set(v["auc_lost"]) == {"a", "all"} and v["auc_lost"]["a"] == v["auc_lost"]["all"]
        assert v["shift"] == {"a": {"strength": v["shift_strength"]}} and v["shift_strength"] > 0


def test_truth_records_families_and_headroom(tmp_path):
    """With every family on, truth.json names them with their scales and per-domain parameters,
    and per domain: oracle >= shared-only AUC, each family's term loses AUC when dropped (the city
    term nothing where city does not matter), all of them together more than any one."""
    out = tmp_path / "all"
    synth.generate(str(out), rows=20_000, domains=4, seed=2, days=1, users=2000, items=2000,
                   shifts="a,b,c,d,e")
    truth = json.loads(out.joinpath("truth.json").read_text())
    assert truth["shifts"] == list("abcde") and set(truth["shift_scales"]) == set("abcde")
    assert truth["shift_scales"]["b"]["category_sd"] == synth_world.SCALES.b_category_sd
    assert truth["oracle_auc"] > truth["oracle_auc_shared_only"] + 0.03
    for nm, v in truth["domains"].items():
        assert set(v["shift"]) == set(v["auc_lost"]) - {"all"} == set(v["term_sd"]) == set("abcde")
        assert 0.6 < v["oracle_auc"] < 0.95, nm
        assert v["oracle_auc"] > v["oracle_auc_shared_only"] + 0.02, nm
        lost = v["auc_lost"]
        assert all(x > -0.003 for x in lost.values()), (nm, lost)
        assert lost["all"] > max(lost[f] for f in "abcde") and lost["all"] > 0.03, (nm, lost)
        assert lost["b"] > 0.005 and lost["c"] > 0.002 and lost["e"] > 0.002, (nm, lost)
        if v["shift"]["d"]["matters"]:
            assert lost["d"] > 0.005 and v["term_sd"]["d"] > 0.3, nm
        else:
            assert lost["d"] == 0.0 and v["term_sd"]["d"] == 0.0, nm
        assert len(v["shift"]["b"]["category_bias"]) == synth_world.CATEGORIES
        assert len(set(v["shift"]["e"]["hot_items"])) == synth_world.SCALES.e_hot_items
    slopes = [v["shift"]["c"]["price_slope"] for v in truth["domains"].values()]
    assert min(slopes) < 0 < max(slopes)
    matters = [v["shift"]["d"]["matters"] for v in truth["domains"].values()]
    assert sum(matters) == 2


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(rows=20, domains=3), "--rows"),
        (dict(rows=100, domains=0), "--domains"),
        (dict(rows=100, domains=3, holdout_domains=3), "--holdout-domains"),
        (dict(rows=100, domains=3, days=0), "--days"),
        (dict(rows=100, domains=3, users=1), "--users"),
        (dict(rows=100, domains=3, shifts="a,x"), "--shifts: unknown family 'x' in 'a,x'"),
        (dict(rows=100, domains=3, shifts=("a", "a")), "--shifts: a family repeated"),
    ],
)
def test_bad_arguments(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        synth.generate(str(tmp_path / "out"), seed=0, **kw)
    assert not (tmp_path / "out").exists()


def test_refuses_non_empty_out_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(FileExistsError, match="full"):
        synth.generate(str(tmp_path / "full"), rows=100, domains=2, seed=0, users=50, items=50)
    assert (tmp_path / "full" / "x").read_text() == "keep"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "_truth", boom)
    with pytest.raises(RuntimeError):
        synth.generate(str(tmp_path / "out"), rows=100, domains=2, seed=0, users=50, items=50)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no output, no staging dir


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        main(
            [
                "gen-logs",
                "--out",
                str(out),
                "--rows",
                "200",
                "--domains",
                "2",
                "--users",
                "100",
                "--items",
                "100",
                "--days",
                "1",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["rows"] == 200
    assert Schema.load(out / "schema.yaml").domain.values == ["d00", "d01"]
    assert main(["gen-logs", "--out", str(out), "--rows", "200", "--domains", "2"]) == 2
    assert "not an empty directory" in capsys.readouterr().err


def test_cli_shifts(tmp_path, capsys):
    tiny = ["--rows", "300", "--domains", "2", "--users", "100", "--items", "100", "--days", "1"]
    out = tmp_path / "be"
    assert main(["gen-logs", "--out", str(out), *tiny, "--shifts", "e,b"]) == 0
    truth = json.loads((out / "truth.json").read_text())
    assert truth["shifts"] == ["b", "e"] and set(truth["domains"]["d00"]["auc_lost"]) == {
        "b", "e", "all"}
    assert truth["domains"]["d00"]["shift_strength"] == 0.0  # (a) off
    capsys.readouterr()
    for bad in ("a,x", "a,,b", "abc", "a,a"):
        assert main(["gen-logs", "--out", str(tmp_path / "bad"), *tiny, "--shifts", bad]) == 2
        err = capsys.readouterr().err
        assert "--shifts:" in err and repr(bad) in err and err.count("\n") == 1, err
        assert not (tmp_path / "bad").exists()


@pytest.mark.integration
def test_s3_round_trip(s3_env, tmp_path):
    from mdlora.infra.storage import open_fs

    args = dict(rows=3000, domains=3, seed=1, holdout_domains=1, days=2, users=500, items=500)
    uri = f"{s3_env}/logs"
    synth.generate(uri, **args)
    synth.generate(str(tmp_path / "local"), **args)
    fs, path = open_fs(uri)
    _, local = sha256_tree(tmp_path / "local")
    remote = {p[len(path) + 1 :]: p for p in fs.find(path)}
    assert sorted(remote) == sorted(local)
    for rel, p in remote.items():
        assert fs.cat_file(p) == (tmp_path / "local" / rel).read_bytes(), rel
    table = ds.dataset(
        f"{path}/train", filesystem=fs, format="parquet", partitioning="hive"
    ).to_table()
    assert table.num_rows == pq.ParquetDataset(tmp_path / "local" / "train").read().num_rows
    with pytest.raises(FileExistsError, match="logs"):
        synth.generate(uri, **args)
