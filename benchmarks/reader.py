"""Parquet -> Batch reader throughput on ONE core: conversion, local end-to-end, S3 end-to-end.

Synthetic data (numpy, fixed seed): 10 single-valued sparse features (4 index, 5 hashed int,
1 hashed string of 1000 distinct values), 2 multi-valued index features (list lengths uniform
in [0, 10], mean 5, max_len 8), 3 dense, a 0/1 label, a string domain (4 values) and one aux
division. Figures are rows per second of wall time with torch, Arrow compute and Arrow I/O
limited to one thread and ``prefetch=0`` (no background thread), so they are per core; best
of 3 runs, as rows per wall second and rows per CPU second of the process (the S3 figure's CPU
includes the in-process moto server).

Usage::

    python -m benchmarks.reader [--rows N] [--batch-size B] [--s3] [--out file.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from benchmarks.profiling import bottleneck, profile_self
from mdlora.embeddings.batch import BatchConverter
from mdlora.embeddings.schema import Schema
from mdlora.infra.logs import LogDataset

SINGLE = [("idx", "index")] * 4 + [("hsh", "hash")] * 5 + [("str", "hash")]


def make_schema() -> Schema:
    sparse = [{"name": f"{k}{i}", "table": f"t{i}", "policy": p} for i, (k, p) in enumerate(SINGLE)]
    sparse += [
        {"name": f"multi{i}", "table": f"m{i}", "multi": True, "max_len": 8} for i in range(2)
    ]
    return Schema.from_dict(
        {
            "name": "bench",
            "label": "click",
            "domain": {"column": "domain", "values": ["d0", "d1", "d2", "d3"]},
            "aux": [{"name": "gender", "column": "gender", "values": ["F", "M"]}],
            "tables": [
                {"name": f"t{i}", "num_embeddings": 100_000, "dim": 16} for i in range(len(SINGLE))
            ]
            + [{"name": f"m{i}", "num_embeddings": 100_000, "dim": 16} for i in range(2)],
            "sparse": sparse,
            "dense": [
                {"name": "d_std", "norm": "standard", "mean": 0.5, "std": 0.3},
                {"name": "d_log", "norm": "log"},
                {"name": "d_raw", "fill": 0.0},
            ],
        }
    )


def make_table(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    cols: dict[str, pa.Array] = {
        "click": pa.array(rng.integers(0, 2, n, dtype=np.int8)),
        "domain": pa.array(np.array(["d0", "d1", "d2", "d3"])[rng.integers(0, 4, n)]),
        "gender": pa.array(np.array(["F", "M"])[rng.integers(0, 2, n)]),
    }
    for i, (k, _) in enumerate(SINGLE):
        if k == "str":
            cols[f"{k}{i}"] = pa.array(np.char.add("v", rng.integers(0, 1000, n).astype(str)))
        else:
            cols[f"{k}{i}"] = pa.array(rng.integers(0, 100_000 if k == "idx" else 1 << 40, n))
    for i in range(2):
        lens = rng.integers(0, 11, n)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        cols[f"multi{i}"] = pa.ListArray.from_arrays(offsets, rng.integers(0, 100_000, offsets[-1]))
    cols["d_std"] = pa.array(rng.random(n))
    cols["d_log"] = pa.array(rng.exponential(10.0, n).astype(np.float32))
    cols["d_raw"] = pa.array(np.where(rng.random(n) < 0.01, np.nan, rng.random(n)))
    return pa.table(cols)


def drain(data: LogDataset, batch_size: int, conv: BatchConverter, shuffle: bool) -> None:
    """Read one epoch, keeping no batch (one core: no prefetch thread)."""
    for _ in data.iter_batches(batch_size, shuffle=shuffle, prefetch=0, converter=conv):
        pass


def rate(rows: int, fn, repeat: int = 3) -> tuple[float, float]:
    """Best of ``repeat`` runs of ``fn()``: (rows per wall second, rows per CPU second).

    The machine may be shared; rows per CPU second (process time, one thread) is the figure
    that does not depend on how much of a core the process got.
    """
    best_wall = best_cpu = 0.0
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        w, c = time.perf_counter() - w, time.process_time() - c
        best_wall, best_cpu = max(best_wall, rows / w), max(best_cpu, rows / max(c, 1e-9))
    return best_wall, best_cpu


def run(rows: int, batch_size: int, s3: bool, profile_dir: Path | None = None) -> dict:
    """Every figure (see the module doc); with ``profile_dir`` the end-to-end reads are sampled
    by py-spy and ``bottleneck`` names where each one's time went."""
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    schema, table = make_schema(), make_table(rows)
    conv = BatchConverter(schema)
    batches = table.to_batches(max_chunksize=batch_size)
    usable = [b for b in batches if b.num_rows == batch_size]
    out = {"rows": rows, "batch_size": batch_size, "threads": 1}

    def convert_all():
        for b in usable:
            conv.convert(b)

    convert_all()  # warm-up
    n = len(usable) * batch_size
    out["convert_rows_per_s"], out["convert_rows_per_cpu_s"] = rate(n, convert_all)
    unchecked = BatchConverter(schema, check=False)
    out["convert_unchecked_rows_per_s"], out["convert_unchecked_rows_per_cpu_s"] = rate(
        n, lambda: [unchecked.convert(b) for b in usable]
    )

    kjt = conv.convert(usable[0]).sparse
    keys, values, lengths = kjt.keys(), kjt.values(), kjt.lengths()
    reps = 2000
    t0 = time.perf_counter()
    for _ in range(reps):
        KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)
    out["kjt_construct_us"] = (time.perf_counter() - t0) / reps * 1e6
    t0 = time.perf_counter()
    for _ in range(reps):
        KeyedJaggedTensor(keys=keys, values=values, lengths=lengths).offsets()
    out["kjt_construct_with_offsets_us"] = (time.perf_counter() - t0) / reps * 1e6
    t0 = time.perf_counter()
    for _ in range(reps // 10):
        KeyedJaggedTensor(keys=keys, values=values, lengths=lengths).to_dict()
    out["kjt_to_dict_us"] = (time.perf_counter() - t0) / (reps // 10) * 1e6

    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(table, os.path.join(tmp, "part-0.parquet"), row_group_size=65536)
        out["parquet_bytes"] = os.path.getsize(os.path.join(tmp, "part-0.parquet"))
        data = LogDataset(tmp, schema)
        steps = data.num_batches(batch_size)
        for shuffle in (False, True):
            key = f"local_e2e{'_shuffled' if shuffle else ''}_rows_per_s"
            with _profiled(profile_dir, f"local{'_shuffled' if shuffle else ''}", out):
                out[key], out[key.replace("rows_per_s", "rows_per_cpu_s")] = rate(
                    steps * batch_size, partial(drain, data, batch_size, conv, shuffle)
                )
        if s3:
            with _profiled(profile_dir, "s3_shuffled", out):
                out.update(s3_run(tmp, schema, conv, batch_size, steps))
    return out


@contextlib.contextmanager
def _profiled(profile_dir: Path | None, name: str, out: dict):
    """py-spy the block into ``profile_dir/reader_<name>.raw``; ``out["bottleneck"][name]``."""
    if profile_dir is None:
        yield
        return
    with profile_self(profile_dir / f"reader_{name}.raw") as prof:
        yield
    out.setdefault("bottleneck", {})[name] = bottleneck(prof["summary"])


def s3_run(local: str, schema: Schema, conv: BatchConverter, batch_size: int, steps: int) -> dict:
    """Upload the file to a moto S3 server on 127.0.0.1 and read it back through s3fs."""
    import socket

    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        os.environ.update(
            {
                "MDLORA_S3_ENDPOINT": f"http://127.0.0.1:{port}",
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        )
        fs = s3fs.S3FileSystem(
            key="bench",
            secret="bench",
            client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"},
        )
        fs.call_s3("create_bucket", Bucket="bench")
        fs.put(os.path.join(local, "part-0.parquet"), "bench/logs/part-0.parquet")
        s3fs.S3FileSystem.clear_instance_cache()
        data = LogDataset("s3://bench/logs", schema)
        r, per_cpu = rate(steps * batch_size, partial(drain, data, batch_size, conv, True))
        return {"s3_e2e_shuffled_rows_per_s": r, "s3_e2e_shuffled_rows_per_cpu_s": per_cpu}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--s3", action="store_true", help="also read through a local moto S3 server")
    p.add_argument("--out", default="", help="write the JSON figures here")
    args = p.parse_args(argv)
    res = run(args.rows, args.batch_size, args.s3)
    print(f"{'measure':<36} {'value':>14}")
    for k, v in res.items():
        print(f"{k:<36} {v:>14,.2f}" if isinstance(v, float) else f"{k:<36} {v:>14,}")
    print(json.dumps(res))
    if args.out:
        from mdlora.atomic import write_json

        write_json(args.out, res)


if __name__ == "__main__":
    main()
