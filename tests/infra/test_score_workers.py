"""Scoring spread over Ray tasks (``score.workers``): same rows and metrics as one process,
parts committed at once, a failed part leaves no output (real local Ray, no mocks)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mdlora.infra.logs import LogDataset
from mdlora.infra.score import Scorer
from mdlora.infra.score_output import SUCCESS, domains_needed, local_file, partition, staged_output
from mdlora.jobs.cli import main
from mdlora.trainer.config import ScoreConfig

SCORES = ("auc", "logloss", "ne", "calibration")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny backbone with one random (non-zero) production bundle per domain, and its rows as
    one file per domain (row groups of 1,250 rows: each row group holds one domain)."""
    import ray

    from benchmarks.common import Reference
    from benchmarks.scoring import publish_fixture

    base = tmp_path_factory.mktemp("score-workers")
    root, model, data = publish_fixture(base, Reference(rows=1000, domains=4, features=3, hidden=[16, 8]), 10_000)
    table = pq.read_table(data)
    logs = base / "logs"
    logs.mkdir()
    for d in sorted(set(table.column("domain").to_pylist())):
        pq.write_table(table.filter(pc.equal(table.column("domain"), d)), logs / f"{d}.parquet", row_group_size=1250)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield {"base": base, "root": root, "model": model, "logs": logs, "scorer": Scorer(root, model)}
    ray.shutdown()


def test_two_workers_give_one_process_rows_and_exact_metrics(world):
    scorer, base = world["scorer"], world["base"]
    one = scorer.score_dataset(str(world["logs"]), str(base / "one.parquet"))
    two = scorer.score_dataset(str(world["logs"]), str(base / "two"), ScoreConfig(workers=2))
    assert sorted(p.name for p in (base / "two").iterdir()) == ["_SUCCESS", "part-00000.parquet", "part-00001.parquet"]
    assert not [p for p in base.iterdir() if p.name.startswith(".")]  # no staging left behind
    a, b = pq.read_table(base / "one.parquet"), pq.read_table(base / "two")  # parts by name: input order
    assert a.equals(b)  # row for row, every column, bit for bit
    assert a.column("click").equals(pq.read_table(world["logs"]).column("click"))  # the input's row order
    assert sum(w["rows"] for w in two["workers"]) == one["workers"][0]["rows"] == 10_000
    for k in (*SCORES, "wauc", "rows", "fallback_rows"):
        assert one[k] == two[k], k
    assert json.dumps(one["domains"], sort_keys=True) == json.dumps(two["domains"], sort_keys=True)
    assert set(a.column("adapter_version").to_pylist()) == {"v0001"}


def test_a_task_loads_only_the_bundles_of_its_row_groups(world):
    scorer = world["scorer"]
    pieces = LogDataset(str(world["logs"]), scorer.schema).fragments()
    shares = partition(pieces, 2)
    files = [{p.path.rsplit("/", 1)[1].removesuffix(".parquet") for p in s} for s in shares]  # dN.parquet
    assert [domains_needed(s, "domain") for s in shares] == files and files[1] != {"d0", "d1", "d2", "d3"}
    assert set(scorer._spec(shares[1], {}, "x", 1)["bundles"]) == files[1]
    mixed = LogDataset(str(world["base"] / "data" / "train"), scorer.schema).fragments()
    assert domains_needed(mixed, "domain") is None  # mixed row groups: every bundle


def test_a_failed_part_leaves_the_old_output_and_names_its_file(world, capsys):
    base, logs = world["base"], world["base"] / "bad-logs"
    logs.mkdir()
    for f in sorted(world["logs"].iterdir()):
        t = pq.read_table(f)
        if f.name == "d3.parquet":  # the last task's file: ids beyond the table
            t = t.set_column(t.schema.get_field_index("f0"), "f0", pa.array(np.full(t.num_rows, 10**9)))
        pq.write_table(t, logs / f.name, row_group_size=1250)
    out = base / "kept"
    out.mkdir()
    (out / "part-00000.parquet").write_bytes(b"old")
    config = base / "score.yaml"
    config.write_text(f"output: {{root: {world['root']}, model: {world['model']}}}\nscore: {{workers: 2}}\n")
    code = main(["score", "--config", str(config), "--data", str(logs), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{logs}/d3.parquet" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet"]  # untouched: no partial parts
    assert (out / "part-00000.parquet").read_bytes() == b"old"
    assert not [p for p in base.iterdir() if p.name.startswith(".")]


def test_s3_parts_appear_with_success_last_and_a_failure_leaves_nothing(s3_env):
    from mdlora.infra.storage import open_fs

    out = f"{s3_env}/preds"
    with pytest.raises(RuntimeError), staged_output(out, 2) as dests:
        with local_file(dests[0]) as p:
            pq.write_table(pa.table({"x": [1]}), p)
        raise RuntimeError("part 1 failed")
    fs, _ = open_fs(out)
    assert fs.find(s3_env[len("s3://"):]) == []  # neither the parts nor the staging prefix
    with staged_output(out, 2) as dests:
        for i, d in enumerate(dests):
            with local_file(d) as p:
                pq.write_table(pa.table({"x": [i]}), p)
    fs.invalidate_cache()
    assert sorted(f.rsplit("/", 1)[1] for f in fs.find(s3_env[len("s3://"):])) == \
        [SUCCESS, "part-00000.parquet", "part-00001.parquet"]
