"""Synthetic logs: layout, determinism, schema/id ranges, domain spread and shift, errors, S3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from mdlora.embeddings.schema import Schema
from mdlora.infra import synth
from mdlora.jobs.cli import main
from mdlora.atomic import sha256_tree

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


def test_domain_shift_is_real():
    """A per-domain logistic regression on vec(p_u q_i^T) beats the pooled one most where the
    shift is strongest, and its coefficients point elsewhere."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    world = synth.make_world(5, domains=4, users=5000, items=3000)
    dom = np.repeat(np.arange(4), 12_000)
    c = synth.draw_rows(world, np.random.default_rng(0), dom)
    x = np.einsum("nd,ne->nde", world.user_lat[c["user_id"]], world.item_lat[c["item_id"]])
    x, y, tr = x.reshape(len(dom), -1), c["click"], c["split"] == 0
    pooled = LogisticRegression(max_iter=200).fit(x[tr], y[tr])
    gain, cos = {}, {}
    for k in (int(np.argmax(world.strength)), int(np.argmin(world.strength))):
        m = dom == k
        own = LogisticRegression(max_iter=200).fit(x[tr & m], y[tr & m])
        te = ~tr & m
        gain[k] = roc_auc_score(y[te], own.decision_function(x[te])) - roc_auc_score(
            y[te], pooled.decision_function(x[te])
        )
        a, b = own.coef_.ravel(), pooled.coef_.ravel()
        cos[k] = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    strong, weak = int(np.argmax(world.strength)), int(np.argmin(world.strength))
    assert gain[strong] > 0.05 and gain[strong] > gain[weak] + 0.03
    assert cos[strong] < 0.8 and cos[strong] < cos[weak]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(rows=20, domains=3), "--rows"),
        (dict(rows=100, domains=0), "--domains"),
        (dict(rows=100, domains=3, holdout_domains=3), "--holdout-domains"),
        (dict(rows=100, domains=3, days=0), "--days"),
        (dict(rows=100, domains=3, users=1), "--users"),
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
