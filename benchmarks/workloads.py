"""The suite's two workloads as Parquet logs + schema in a temp dir (never in the repo).

- ``reference``: 10 sparse features x 100k-row tables x D 16 (Zipf ids), MLP 256-128-1, global
  batch 2048 (:func:`benchmarks.common.write_reference_parquet`).
- ``ml1m``: MovieLens-1M shaped: the real ML-1M imported with :func:`mdlora.infra.movielens.import_movielens`
  when ``/work/shared/data/movielens-1m`` (or ``$MDLORA_ML1M``) exists, else synthetic rows
  with ML-1M's columns and cardinalities (6040 users, 3952 movies, 7 ages, 21 occupations,
  3439 zips hashed into 8192, 1-6 of 18 genres per movie) and the same schema. Same tower and batch.

A workload is a dict ``{"name", "schema", "data", "batch", "hidden", "rows", "source"}`` (paths as
strings), the form :func:`benchmarks.peers.run_peer` and the mdlora runs take.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import Reference, write_reference_parquet

ML1M = Path(os.environ.get("MDLORA_ML1M", "/work/shared/data/movielens-1m"))
HIDDEN = [256, 128]
BATCH = 2048


def reference(work: Path, ref: Reference, rows: int) -> dict:
    """The reference workload with ``rows`` rows under ``work/reference``."""
    train, schema = write_reference_parquet(work / "reference", ref, n=rows)
    return {
        "name": "reference",
        "schema": str(schema),
        "data": str(train),
        "batch": ref.batch,
        "hidden": list(ref.hidden),
        "rows": rows,
        "source": "synthetic (Zipf ids)",
    }


def movielens(work: Path, rows: int = 800_000, seed: int = 0) -> dict:
    """ML-1M-shaped logs under ``work/ml1m`` (real train split when available, else ``rows``
    synthetic rows)."""
    from mdlora.infra.movielens import _schema, import_movielens

    out = work / "ml1m"
    if ML1M.is_dir():
        stats = import_movielens(ML1M, str(out), seed=seed)
        n, source = stats["splits"]["train"], f"MovieLens-1M ({ML1M}, train split)"
    else:
        (out / "train").mkdir(parents=True, exist_ok=True)
        pq.write_table(_synthetic(rows, seed), out / "train" / "part-00000.parquet")
        (out / "schema.yaml").write_text(_schema("movielens-1m", 6041, 3953, 21).dump())
        n, source = rows, "synthetic with ML-1M cardinalities (no ML-1M found)"
    return {
        "name": "ml1m",
        "schema": str(out / "schema.yaml"),
        "data": str(out / "train"),
        "batch": BATCH,
        "hidden": HIDDEN,
        "rows": n,
        "source": source,
    }


def _synthetic(n: int, seed: int) -> pa.Table:
    """``n`` rows with ML-1M's columns, per-user attributes and cardinalities."""
    from mdlora.infra.movielens import AGE_CODES, DOMAINS

    rng = np.random.default_rng(seed)
    users, movies = 6040, 3952
    u_gender = rng.integers(0, 2, users + 1)
    u_age = AGE_CODES[rng.integers(0, len(AGE_CODES), users + 1)]
    u_occ = rng.integers(0, 21, users + 1)
    u_zip = rng.integers(0, 3439, users + 1)
    n_genres = rng.integers(1, 7, movies + 1)
    offsets = np.concatenate([[0], np.cumsum(n_genres)]).astype(np.int32)
    genre_ids = rng.integers(0, 18, offsets[-1])
    uid = rng.integers(1, users + 1, n)
    mid = np.minimum(rng.zipf(1.2, n), movies)
    rows_of = pa.ListArray.from_arrays(offsets, genre_ids)
    domain = np.searchsorted([25, 35], u_age[uid], side="right")  # <25, 25-34, >=35
    return pa.table(
        {
            "user_id": uid,
            "movie_id": mid,
            "gender": pa.array(np.array(["F", "M"])[u_gender[uid]]),
            "gender_id": u_gender[uid].astype(np.int64),
            "age": u_age[uid].astype(np.int64),
            "occupation": u_occ[uid].astype(np.int64),
            "zip": pa.array(np.char.add("z", u_zip[uid].astype(str))),
            "genres": rows_of.take(pa.array(mid)),
            "domain": pa.array(np.array(DOMAINS)[domain]),
            "label": (rng.random(n) < 0.57).astype(np.int8),
        }
    )
