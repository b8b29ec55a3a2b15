"""S3 round trip: Parquet written to a moto bucket reads back like the local copy."""

from __future__ import annotations

import pyarrow.dataset as ds
import pytest

from mdlora.embeddings.batch import BatchConverter
from mdlora.embeddings.schema import Schema
from mdlora.infra.logs import LogDataset, LogReadError, validate_dataset
from mdlora.infra.storage import open_fs
from tests.infra.test_logs import write_logs


@pytest.mark.integration
def test_s3_round_trip(s3_env, tiny_schema_dict, tmp_path):
    schema = Schema.from_dict(tiny_schema_dict)
    local = tmp_path / "logs"
    write_logs(local)
    uri = f"{s3_env}/logs"
    fs, path = open_fs(uri)
    table = ds.dataset(str(local), format="parquet", partitioning="hive").to_table()
    ds.write_dataset(
        table,
        path,
        filesystem=fs,
        format="parquet",
        partitioning=["date"],
        partitioning_flavor="hive",
        max_rows_per_group=10,
    )
    assert fs.ls(path) and all("date=" in p for p in fs.ls(path))

    def rows(uri):
        data = LogDataset(uri, schema, window="2024-01-02..2024-01-03", domains=["b", "c"])
        tables = list(data.iter_batches(6, shuffle=False, drop_last=False))
        return sorted(
            (u, c, d)
            for t in tables
            for u, c, d in zip(
                t["user_id"].to_pylist(),
                t["click"].to_pylist(),
                t["domain"].to_pylist(),
                strict=False,
            )
        )

    assert rows(uri) == rows(str(local)) and len(rows(uri)) > 0
    data = LogDataset(uri, schema)
    batches = list(data.iter_batches(16, world_size=2, rank=1, converter=BatchConverter(schema)))
    assert len(batches) == data.num_batches(16, 2) == 3
    assert validate_dataset(uri, schema)["rows"] == 107
    with pytest.raises(FileNotFoundError, match=f"{s3_env}/nothing"):
        LogDataset(f"{s3_env}/nothing", schema)


@pytest.mark.integration
def test_s3_side_files_are_skipped_and_splits_named(s3_env, tiny_schema_dict, tmp_path):
    schema = Schema.from_dict(tiny_schema_dict)
    write_logs(tmp_path / "logs" / "train")
    (tmp_path / "logs" / "schema.yaml").write_text("name: tiny\n")
    (tmp_path / "logs" / "train" / "_SUCCESS").write_text("")
    fs, path = open_fs(f"{s3_env}/logs")
    fs.put(str(tmp_path / "logs"), path, recursive=True)
    assert fs.exists(f"{path}/train/_SUCCESS") and fs.exists(f"{path}/schema.yaml")
    assert validate_dataset(f"{s3_env}/logs/train", schema)["rows"] == 107
    with pytest.raises(LogReadError, match=rf"point at one of them, e.g. {s3_env}/logs/train"):
        LogDataset(f"{s3_env}/logs", schema)
