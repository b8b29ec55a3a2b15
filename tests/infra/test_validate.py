"""validate_dataset and the ``mdlora validate-logs`` command."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mdlora.embeddings.schema import Schema
from mdlora.infra.logs import validate_dataset
from mdlora.jobs.cli import main
from tests.infra.test_logs import make_rows, write_logs


@pytest.fixture
def schema_path(tiny_schema_dict, tmp_path):
    path = tmp_path / "schema.yaml"
    Schema.from_dict(tiny_schema_dict).dump(path)
    return path


def dirty(root) -> None:
    """Add a file with every problem kind, and a truncated file."""
    t = make_rows(20, 5000, seed=7)
    t = t.set_column(t.schema.get_field_index("item_id"), "item_id", pa.array([-1, 50] + [1] * 18))
    t = t.set_column(t.schema.get_field_index("click"), "click", pa.array([2] + [0] * 19))
    t = t.set_column(
        t.schema.get_field_index("domain"), "domain", pa.array(["zz", "zz", "yy"] + ["a"] * 17)
    )
    t = t.set_column(t.schema.get_field_index("age"), "age", pa.array([None] * 3 + [1.0] * 17))
    (root / "date=2024-01-09").mkdir()
    pq.write_table(t, root / "date=2024-01-09" / "bad.parquet")
    blob = (root / "date=2024-01-09" / "bad.parquet").read_bytes()
    (root / "date=2024-01-09" / "cut.parquet").write_bytes(blob[:100])


def test_clean_summary(tiny_schema_dict, tmp_path):
    all_rows = write_logs(tmp_path / "logs")
    report = validate_dataset(str(tmp_path / "logs"), Schema.from_dict(tiny_schema_dict))
    assert report["errors"] == [] and report["rows"] == 107
    for d in "abc":
        mask = np.array(all_rows["domain"].to_pylist()) == d
        assert report["domains"][d]["rows"] == mask.sum()
        assert report["domains"][d]["positive_rate"] == pytest.approx(
            all_rows["click"].to_numpy()[mask].mean()
        )
    assert set(report["nulls"].values()) == {0} and report["unseen_domains"] == {}


def test_every_problem_kind_is_reported(tiny_schema_dict, tmp_path):
    root = tmp_path / "logs"
    write_logs(root)
    dirty(root)
    report = validate_dataset(str(root), Schema.from_dict(tiny_schema_dict))
    assert report["rows"] == 127
    assert report["out_of_range"] == {"item_id": 2, "hist": 0}
    assert report["unseen_domains"] == {"zz": 2, "yy": 1}
    assert report["nulls"]["age"] == 3
    errors = "\n".join(report["errors"])
    assert "cut.parquet: unreadable Parquet file" in errors
    for needle in [
        "bad.parquet: column 'item_id': index ids outside [0, 50) of table 'item' (2 rows, e.g. [-1, 50])",
        "bad.parquet: column 'click': labels outside {0, 1} (1 rows, e.g. [2])",
        "bad.parquet: column 'domain': values not in the domain vocabulary",
        "bad.parquet: column 'age': null/NaN values and no fill (3 rows, e.g. [0, 1, 2])",
    ]:
        assert needle in errors
    assert len(report["errors"]) == 5


def test_cli_exit_codes(schema_path, tmp_path, capsys):
    root = tmp_path / "logs"
    write_logs(root)
    assert main(["validate-logs", "--schema", str(schema_path), "--data", str(root)]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "107" in out
    assert (
        main(
            [
                "validate-logs",
                "--schema",
                str(schema_path),
                "--data",
                str(root),
                "--domains",
                "a",
                "--window",
                "2024-01-01..2024-01-01",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["domains"]["b"]["rows"] == 0 and report["domains"]["a"]["rows"] > 0
    assert (
        main(["validate-logs", "--schema", str(schema_path), "--data", str(tmp_path / "nope")]) == 2
    )
    assert "no such file" in capsys.readouterr().err
    dirty(root)
    assert main(["validate-logs", "--schema", str(schema_path), "--data", str(root)]) == 2
    assert "bad.parquet: column 'click'" in capsys.readouterr().err


def test_cli_subprocess(schema_path, tmp_path):
    root = tmp_path / "logs"
    write_logs(root)
    dirty(root)
    cmd = [
        sys.executable,
        "-m",
        "mdlora.jobs.cli",
        "validate-logs",
        "--schema",
        str(schema_path),
        "--data",
        str(root),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "mdlora validate-logs: error:" in proc.stderr and "cut.parquet" in proc.stderr
    assert "domain" in proc.stdout


def test_cli_on_the_directory_gen_logs_wrote(tmp_path, capsys):
    from mdlora.infra.synth import generate

    out = tmp_path / "logs"
    generate(str(out), rows=2000, domains=2, seed=0, days=2, users=100, items=100)
    schema = str(out / "schema.yaml")
    assert main(["validate-logs", "--schema", schema, "--data", str(out / "train")]) == 0
    assert main(["validate-logs", "--schema", schema, "--data", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"point at one of them, e.g. {out}/train" in err and "magic bytes" not in err
