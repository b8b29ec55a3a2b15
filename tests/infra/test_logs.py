"""LogDataset: filters, sharding, shuffling, prefetching and read errors on local Parquet."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mdlora.embeddings.batch import BatchConverter, LogValidationError
from mdlora.embeddings.schema import Schema
from mdlora.infra.logs import LogDataset, LogReadError

DAYS = ["2024-01-01", "2024-01-02", "2024-01-03"]


def make_rows(n: int, start: int, seed: int) -> pa.Table:
    """``n`` valid rows of the tiny schema; ``user_id`` is a unique row id from ``start``."""
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "click": rng.integers(0, 2, n),
            "domain": rng.choice(["a", "b", "c"], n),
            "gender": rng.choice(["F", "M"], n),
            "user_id": np.arange(start, start + n),
            "item_id": rng.integers(0, 50, n),
            "hist_items": [rng.integers(0, 50, rng.integers(0, 6)).tolist() for _ in range(n)],
            "city": rng.choice(["x", "y", "z"], n),
            "price": rng.random(n),
            "age": rng.random(n) * 60,
        }
    )


def write_logs(root, rows_per_day=(37, 41, 29), row_group_size=10) -> pa.Table:
    """Hive-partitioned dataset ``root/date=.../part-0.parquet``; returns all rows with date."""
    parts, start = [], 0
    for i, (day, n) in enumerate(zip(DAYS, rows_per_day, strict=False)):
        t = make_rows(n, start, seed=i)
        (root / f"date={day}").mkdir(parents=True)
        pq.write_table(t, root / f"date={day}" / "part-0.parquet", row_group_size=row_group_size)
        parts.append(t.append_column("date", pa.array([day] * n)))
        start += n
    return pa.concat_tables(parts)


@pytest.fixture
def schema(tiny_schema_dict) -> Schema:
    return Schema.from_dict(tiny_schema_dict)


@pytest.fixture
def logs(tmp_path):
    root = tmp_path / "logs"
    return root, write_logs(root)


def ids_of(batches) -> list[int]:
    return [u for b in batches for u in b.column("user_id").to_pylist()]


def test_pieces_are_row_groups_with_metadata_counts(schema, logs):
    root, all_rows = logs
    data = LogDataset(str(root), schema)
    assert [p.rows for p in data.fragments()] == [10, 10, 10, 7, 10, 10, 10, 10, 1, 10, 10, 9]
    assert data.num_rows() == all_rows.num_rows == 107
    assert data.columns == schema.columns()


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sharded_ranks_get_equal_counts_and_disjoint_rows(schema, logs, world_size):
    root, all_rows = logs
    data = LogDataset(str(root), schema)
    steps = data.num_batches(8, world_size)
    assert steps == (107 // world_size) // 8
    seen = []
    for rank in range(world_size):
        batches = list(data.iter_batches(8, rank=rank, world_size=world_size, epoch=1, seed=3))
        assert len(batches) == steps and all(b.num_rows == 8 for b in batches)
        seen += ids_of(batches)
    assert len(seen) == len(set(seen)) == steps * 8 * world_size
    # without drop_last every row is seen exactly once; counts stay equal (a rank may end empty)
    seen, counts = [], set()
    for rank in range(world_size):
        batches = list(
            data.iter_batches(8, rank=rank, world_size=world_size, drop_last=False, shuffle=False)
        )
        counts.add(len(batches))
        seen += ids_of(batches)
    assert counts == {data.num_batches(8, world_size, drop_last=False)}
    assert sorted(seen) == list(range(107))


def test_shuffle_is_seeded_per_epoch(schema, logs):
    data = LogDataset(str(logs[0]), schema)
    first = ids_of(data.iter_batches(16, epoch=0, seed=1))
    assert first == ids_of(data.iter_batches(16, epoch=0, seed=1, prefetch=0))
    assert first != ids_of(data.iter_batches(16, epoch=1, seed=1))
    assert ids_of(data.iter_batches(16, shuffle=False)) == list(range(96))


def test_window_and_domain_filters_on_hive_partitions(schema, logs):
    root, all_rows = logs
    data = LogDataset(str(root), schema, window="2024-01-02..2024-01-03", domains=["a", "c"])
    expect = {
        u
        for u, d, day in zip(
            all_rows["user_id"].to_pylist(),
            all_rows["domain"].to_pylist(),
            all_rows["date"].to_pylist(),
            strict=False,
        )
        if d in ("a", "c") and day >= "2024-01-02"
    }
    assert data.num_rows() == len(expect)
    rows = list(data.iter_batches(5, drop_last=False, shuffle=False))
    assert set(ids_of(rows)) == expect
    assert set(pa.concat_tables(rows)["domain"].to_pylist()) == {"a", "c"}
    batches = list(data.iter_batches(4, converter=BatchConverter(schema)))
    assert {int(d) for b in batches for d in b.domains} == {0, 2}
    with pytest.raises(ValueError, match="not in the vocabulary"):
        LogDataset(str(root), schema, domains=["zz"])
    with pytest.raises(ValueError, match="window '2024-01..x'"):
        LogDataset(str(root), schema, window="2024-01..x")


@pytest.mark.parametrize("date_type", [pa.string(), pa.date32(), pa.timestamp("s")])
def test_window_on_a_date_column_inside_the_file(schema, tmp_path, date_type):
    t = make_rows(30, 0, seed=0)
    days = np.array(["2024-03-01", "2024-03-02", "2024-03-03"])[np.arange(30) % 3]
    dates = (
        pa.array(days).cast(pa.date32()).cast(date_type)
        if date_type != pa.string()
        else pa.array(days)
    )
    pq.write_table(t.append_column("date", dates), tmp_path / "one.parquet")
    data = LogDataset(str(tmp_path / "one.parquet"), schema, window="2024-03-02..2024-03-03")
    assert data.num_rows() == 20
    assert sorted(ids_of(data.iter_batches(7, drop_last=False))) == [i for i in range(30) if i % 3]


def test_prefetch_thread_stops_when_consumer_breaks(schema, logs):
    data = LogDataset(str(logs[0]), schema)

    def live():
        return [t for t in threading.enumerate() if t.name == "mdlora-prefetch"]

    it = data.iter_batches(4, prefetch=2, converter=BatchConverter(schema))
    next(it)
    assert len(live()) == 1
    for _ in it:
        break
    it.close()
    assert live() == []
    for i, _ in enumerate(data.iter_batches(4, prefetch=1)):  # for-loop break closes the generator
        if i == 1:
            break
    assert live() == []


def test_missing_empty_and_truncated(schema, logs, tmp_path):
    root, _ = logs
    with pytest.raises(FileNotFoundError, match="nope: no such file"):
        LogDataset(str(tmp_path / "nope"), schema)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LogReadError, match="empty dataset"):
        LogDataset(str(tmp_path / "empty"), schema)
    with pytest.raises(ValueError, match="batch_size 0, world_size 1: must be >= 1"):
        LogDataset(str(root), schema).num_batches(0)
    with pytest.raises(ValueError, match="rank 2: must be in"):
        LogDataset(str(root), schema).iter_batches(4, rank=2, world_size=2)
    with pytest.raises(LogValidationError, match="empty dataset"):
        LogDataset(str(root), schema, window="2030-01-01..2030-01-02").num_batches(4)
    bad = root / "date=2024-01-03" / "part-1.parquet"
    blob = (root / "date=2024-01-03" / "part-0.parquet").read_bytes()
    bad.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(
        LogReadError, match=r"date=2024-01-03/part-1\.parquet: unreadable Parquet file"
    ):
        LogDataset(str(root), schema).fragments()
    with pytest.raises(LogReadError, match=r"part-1\.parquet"):
        LogDataset(str(bad), schema)


def test_missing_column_and_bad_values_name_the_file(schema, logs):
    root, _ = logs
    t = make_rows(12, 1000, seed=9).drop_columns(["age"])
    (root / "date=2024-01-04").mkdir()
    pq.write_table(t, root / "date=2024-01-04" / "part-0.parquet")
    with pytest.raises(
        LogValidationError, match=r"date=2024-01-04/part-0\.parquet: column 'age': null"
    ):
        for _ in LogDataset(str(root), schema).iter_batches(8, converter=BatchConverter(schema)):
            pass
    t = make_rows(12, 2000, seed=9)
    t = t.set_column(t.schema.get_field_index("item_id"), "item_id", pa.array(np.full(12, 77)))
    pq.write_table(t, root / "date=2024-01-04" / "part-0.parquet")
    with pytest.raises(
        LogValidationError, match=r"date=2024-01-04/part-0\.parquet: column 'item_id': .*\[77\]"
    ):
        for _ in LogDataset(str(root), schema).iter_batches(8, converter=BatchConverter(schema)):
            pass
    pq.write_table(make_rows(5, 0, 0).drop_columns(["age"]), root.parent / "noage.parquet")
    with pytest.raises(LogValidationError, match="noage.parquet: missing column 'age'"):
        LogDataset(str(root.parent / "noage.parquet"), schema).iter_batches(2)


def test_domain_as_partition_key_and_integer_domain_column(tiny_schema_dict, tmp_path):
    import pyarrow.dataset as ds

    schema = Schema.from_dict(tiny_schema_dict)
    t = make_rows(60, 0, seed=0)
    ds.write_dataset(
        t,
        tmp_path / "by_domain",
        format="parquet",
        partitioning=["domain"],
        partitioning_flavor="hive",
    )
    data = LogDataset(str(tmp_path / "by_domain"), schema, domains=["b"])
    assert data.num_rows() == t["domain"].to_pylist().count("b")
    assert {
        int(d) for b in data.iter_batches(4, converter=BatchConverter(schema)) for d in b.domains
    } == {1}
    tiny_schema_dict["domain"]["values"] = ["10", "20"]
    schema = Schema.from_dict(tiny_schema_dict)
    t = t.set_column(
        t.schema.get_field_index("domain"), "domain", pa.array(np.where(np.arange(60) % 3, 10, 20))
    )
    pq.write_table(t, tmp_path / "int.parquet")
    data = LogDataset(str(tmp_path / "int.parquet"), schema, domains=["20"])
    assert data.num_rows() == 20
    assert sorted(ids_of(data.iter_batches(6, drop_last=False))) == list(range(0, 60, 3))
    assert {
        int(d) for b in data.iter_batches(4, converter=BatchConverter(schema)) for d in b.domains
    } == {1}


def test_side_files_beside_the_parquet_files_are_skipped(schema, logs):
    root, table = logs
    (root / "schema.yaml").write_text("name: tiny\n")
    (root / "truth.json").write_text("{}")
    (root / "_SUCCESS").write_text("")
    (root / ".part-0.parquet.crc").write_bytes(b"\0")
    (root / "_temporary").mkdir()
    (root / "_temporary" / "part-9.parquet").write_bytes(b"half a file")
    data = LogDataset(str(root), schema)
    assert sorted(p.split("/")[-2] for p in data._ds.files) == [f"date={d}" for d in DAYS]
    assert data.num_rows() == table.num_rows


def test_a_directory_of_splits_names_the_split_to_point_at(schema, tmp_path):
    root = tmp_path / "logs"
    write_logs(root / "train")
    write_logs(root / "test")
    (root / "schema.yaml").write_text("name: tiny\n")
    with pytest.raises(
        LogReadError,
        match=r"logs: a directory of splits \(train/, test/\), not one "
        r"dataset: point at one of them, e.g. .*/logs/train$",
    ):
        LogDataset(str(root), schema)
    assert LogDataset(str(root / "train"), schema).num_rows() == 107
    (tmp_path / "side").mkdir()
    (tmp_path / "side" / "schema.yaml").write_text("name: tiny\n")
    with pytest.raises(
        LogReadError, match=r"empty dataset \(no Parquet files; not Parquet: schema.yaml\)"
    ):
        LogDataset(str(tmp_path / "side"), schema)
