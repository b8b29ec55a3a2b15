"""MovieLens 1M / 100K -> mdlora log format, with the HAMUR / MultiLoRA multi-domain protocol.

Layouts (detected from the files in ``src``):

* ``ml-1m``: official ``ratings.dat``, ``users.dat``, ``movies.dat`` (``::``-separated, latin-1);
* ``ml-1m-csv``: ``ratings.csv`` (header ``user_id,movie_id,rating,timestamp``, timestamps may be
  empty) with the official ``users.dat`` and ``movies.dat``;
* ``ml-100k``: ``u.data`` (tab-separated), ``u.user`` (``|``, real ages mapped to the ML-1M age
  codes: <18 -> 1, 18-24 -> 18, 25-34 -> 25, 35-44 -> 35, 45-49 -> 45, 50-55 -> 50, 56+ -> 56) and
  ``u.item`` (``|``, latin-1, 19 genre flags; the ``unknown`` flag maps to no genre).

Protocol: domains by user age code, ``age_lt25`` = {1, 18}, ``age_25_34`` = {25},
``age_ge35`` = {35, 45, 50, 56}; auxiliary division ``gender`` (F/M); label ``label`` =
rating > 3; a seeded random split with exactly floor(N/10) val and test rows (the rest train),
rows keeping their source order inside each split.

Columns: ``user_id``, ``movie_id`` (index policy, tables of max id + 1 rows), ``gender`` (F/M,
the aux division), ``gender_id`` (0 F / 1 M), ``age`` (the age code, index), ``occupation``
(ML-1M code 0-20; ML-100K: index into the sorted occupation names), ``zip`` (string, hash),
``genres`` (list of indices into :data:`GENRES`), ``domain``, ``label``.

Output: ``OUT/{train,val,test}/part-00000.parquet``, ``OUT/schema.yaml``, ``OUT/stats.json``
(rows and positive rate per domain and split). Local outputs are committed atomically.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mdlora.atomic import staging_dir
from mdlora.embeddings.schema import Schema
from mdlora.infra.storage import is_s3, open_fs

GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
          "Thriller", "War", "Western"]
"""The 18 ML-1M genres; ``genres`` values index this list (ML-100K uses the same order)."""
AGE_CODES = np.array([1, 18, 25, 35, 45, 50, 56])
DOMAINS = ["age_lt25", "age_25_34", "age_ge35"]
_AGE_DOMAIN = np.array([0, 0, 1, 2, 2, 2, 2])  # domain id of each AGE_CODES entry
LAYOUTS = {
    "ml-1m": ("ratings.dat", "users.dat", "movies.dat"),
    "ml-1m-csv": ("ratings.csv", "users.dat", "movies.dat"),
    "ml-100k": ("u.data", "u.user", "u.item"),
}
SPLITS = ("train", "val", "test")
_I64, _STR = pa.int64(), pa.string()


def detect_layout(src: str | Path) -> str:
    """Name of the layout in ``src`` (a key of :data:`LAYOUTS`).

    Raises:
        FileNotFoundError: ``src`` is missing, or a layout is recognised but a file is missing.
        ValueError: no layout matches.
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: MovieLens source directory not found")
    for name, files in LAYOUTS.items():
        if all((src / f).is_file() for f in files):
            return name
    for name, files in LAYOUTS.items():
        if (src / files[0]).is_file():
            missing = next(f for f in files if not (src / f).is_file())
            raise FileNotFoundError(
                f"{src / missing}: missing ({name} layout needs {', '.join(files)})"
            )
    raise ValueError(
        f"{src}: unknown MovieLens layout, expected one of "
        + "; ".join(f"{k}: {', '.join(v)}" for k, v in LAYOUTS.items())
    )


def _first_bad_line(path: Path, text: str, sep: str, cols: dict, skip: int, nullable: set) -> str:
    """Error path only: find the first line with a wrong field count or a bad integer."""
    for no, line in enumerate(text.split("\n")[skip:], skip + 1):
        if not line.strip():
            continue
        fields = line.rstrip("\r").split(sep)
        if len(fields) != len(cols):
            got = f"expected {len(cols)} fields, got {len(fields)}"
            return f"{path}:{no}: malformed line, {got}: {line!r}"
        for (col, tp), v in zip(cols.items(), fields, strict=True):
            empty_ok = v == "" and col in nullable
            if tp == _I64 and not (v.strip().lstrip("-").isdigit() or empty_ok):
                return f"{path}:{no}: column {col}: {v!r} is not an integer: {line!r}"
    return ""


def read_table(path: Path, cols: dict[str, pa.DataType], *, sep: str, encoding: str = "utf8",
               header: str | None = None, nullable: tuple[str, ...] = ()) -> pa.Table:
    """Read a delimited MovieLens file with pyarrow.csv (vectorised, no quoting).

    Args:
        path: the file.
        cols: column name -> type (int64 or string), in file order.
        sep: field separator; ``::`` is rewritten to a one-byte separator first.
        encoding: text encoding (``latin-1`` for the official .dat/.item files).
        header: the exact first line expected (skipped), or None for no header.
        nullable: integer columns that may be empty.

    Returns:
        The table with ``cols`` as its schema.

    Raises:
        ValueError: wrong header, malformed line, non-integer or missing value: names file and line.
    """
    data = path.read_bytes()
    skip = 0
    if header is not None:
        first = data.split(b"\n", 1)[0].decode(encoding).rstrip("\r")
        if first != header:
            raise ValueError(f"{path}:1: expected the header {header!r}, got {first!r}")
        skip = 1
    one = "\x1f" if sep == "::" else sep
    if sep == "::":
        data = data.replace(b"::", b"\x1f")
    bad: list = []  # rows with a wrong field count, reported below with their line number
    table, err = None, ""
    try:
        table = pacsv.read_csv(
            pa.BufferReader(data),
            read_options=pacsv.ReadOptions(column_names=list(cols), skip_rows=skip,
                                           encoding=encoding),
            parse_options=pacsv.ParseOptions(delimiter=one, quote_char=False,
                                             invalid_row_handler=lambda r: bad.append(r) or "skip"),
            convert_options=pacsv.ConvertOptions(column_types=cols, strings_can_be_null=False),
        )
    except pa.ArrowInvalid as e:
        err = str(e)
    complete = table is not None and all(table[c].null_count == 0 for c in cols if c not in nullable)
    if complete and not bad:
        return table
    text = path.read_bytes().decode(encoding)
    msg = _first_bad_line(path, text, sep, cols, skip, set(nullable))
    raise ValueError(msg or f"{path}: cannot parse: {err or 'missing values'}")


def _fail_at(path: Path, mask: np.ndarray, what: str, values: np.ndarray, header: int = 0) -> None:
    """Raise naming the first row where ``mask`` is True (line = row + 1 + header lines)."""
    if mask.any():
        i = int(np.argmax(mask))
        raise ValueError(f"{path}:{i + 1 + header}: {what}: {values[i]!r}")


def _genre_lists(path: Path, genres: pa.Array) -> pa.ListArray:
    """ML-1M ``A|B|C`` strings -> list<int64> indices into GENRES (errors name the line)."""
    split = pc.split_pattern(genres, "|")
    idx = pc.index_in(pc.list_flatten(split), value_set=pa.array(GENRES))
    if idx.null_count:
        first = np.flatnonzero(idx.is_null().to_numpy(zero_copy_only=False))[0]
        row = pc.list_parent_indices(split).to_numpy()[first]
        bad = genres[row].as_py()
        raise ValueError(f"{path}:{row + 1}: unknown genre in {bad!r} (known: {GENRES})")
    return pa.ListArray.from_arrays(split.offsets, pc.cast(idx, _I64))


def _read_source(src: Path, layout: str) -> tuple[dict[str, pa.Table], list[str] | None]:
    """Users (user_id, gender, age, occupation, zip), movies (movie_id, genres) and ratings."""
    r_file, u_file, m_file = (src / f for f in LAYOUTS[layout])
    rating_cols = {"user_id": _I64, "movie_id": _I64, "rating": _I64, "timestamp": _I64}
    occupations = None
    if layout == "ml-100k":
        ratings = read_table(r_file, rating_cols, sep="\t")
        users = read_table(u_file, {"user_id": _I64, "years": _I64, "gender": _STR,
                                    "occupation_name": _STR, "zip": _STR}, sep="|")
        _fail_at(u_file, users["years"].to_numpy() < 0, "negative age", users["years"].to_numpy())
        codes = AGE_CODES[np.digitize(users["years"].to_numpy(), AGE_CODES[1:])]
        occupations = sorted(set(users["occupation_name"].to_pylist()))
        occ = pc.index_in(users["occupation_name"], value_set=pa.array(occupations))
        users = pa.table({"user_id": users["user_id"], "gender": users["gender"], "age": codes,
                          "occupation": pc.cast(occ, _I64), "zip": users["zip"]})
        flags = [f"g{j}" for j in range(19)]
        item_cols = {"movie_id": _I64, "title": _STR, "release": _STR, "video": _STR, "url": _STR}
        items = read_table(m_file, {**item_cols, **dict.fromkeys(flags, _I64)}, sep="|",
                           encoding="latin-1")
        mat = np.stack([items[f].to_numpy() for f in flags[1:]], axis=1)  # [M, 18], no 'unknown'
        _fail_at(m_file, ~np.isin(mat, [0, 1]).all(axis=1), "genre flags must be 0/1",
                 items["title"].to_numpy())
        rows, cols = np.nonzero(mat)  # row-major: each movie's genres in vocabulary order
        offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(mat)))])
        offsets = offsets.astype(np.int32)
        genres = pa.ListArray.from_arrays(pa.array(offsets), pa.array(cols.astype(np.int64)))
        movies = pa.table({"movie_id": items["movie_id"], "genres": genres})
    else:
        if layout == "ml-1m":
            ratings = read_table(r_file, rating_cols, sep="::")
        else:
            ratings = read_table(r_file, rating_cols, sep=",", header=",".join(rating_cols),
                                 nullable=("timestamp",))
        users = read_table(u_file, {"user_id": _I64, "gender": _STR, "age": _I64,
                                    "occupation": _I64, "zip": _STR}, sep="::", encoding="latin-1")
        age = users["age"].to_numpy()
        _fail_at(u_file, ~np.isin(age, AGE_CODES), "unknown age code", age)
        m = read_table(m_file, {"movie_id": _I64, "title": _STR, "genres": _STR}, sep="::",
                       encoding="latin-1")
        genres = _genre_lists(m_file, m["genres"].combine_chunks())
        movies = pa.table({"movie_id": m["movie_id"], "genres": genres})
    g = users["gender"].to_numpy(zero_copy_only=False)
    _fail_at(u_file, ~np.isin(g, ["F", "M"]), "gender must be F or M", g)
    return {"ratings": ratings, "users": users, "movies": movies}, occupations


def _lookup(ids: np.ndarray, keys: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Row of each id in ``keys`` (unique non-negative ids); errors name the duplicate."""
    _fail_at(path, keys < 0, f"negative {what}", keys)
    table = np.full(int(keys.max()) + 1, -1, dtype=np.int64)
    table[keys] = np.arange(len(keys))
    dup = np.ones(len(keys), bool)
    dup[np.unique(keys, return_index=True)[1]] = False
    _fail_at(path, dup, f"duplicate {what}", keys)
    ok = (ids >= 0) & (ids < len(table))
    return np.where(ok, table[np.clip(ids, 0, len(table) - 1)], -1)


def convert(src: str | Path, seed: int = 0) -> tuple[pa.Table, dict, Schema]:
    """Read MovieLens from ``src`` and build the log (one table with a ``split`` column).

    Returns:
        ``(table, stats, schema)``; ``table`` holds the output columns plus ``split`` (0/1/2).
    """
    src = Path(src)
    layout = detect_layout(src)
    t, occupations = _read_source(src, layout)
    r_file = src / LAYOUTS[layout][0]
    hdr = 1 if layout == "ml-1m-csv" else 0
    r = t["ratings"]
    rating, uid, mid = (r[c].to_numpy() for c in ("rating", "user_id", "movie_id"))
    _fail_at(r_file, (rating < 1) | (rating > 5), "rating must be 1-5", rating, hdr)
    urow = _lookup(uid, t["users"]["user_id"].to_numpy(), src / LAYOUTS[layout][1], "user_id")
    _fail_at(r_file, urow < 0, "user_id not in the users file", uid, hdr)
    mrow = _lookup(mid, t["movies"]["movie_id"].to_numpy(), src / LAYOUTS[layout][2], "movie_id")
    _fail_at(r_file, mrow < 0, "movie_id not in the movies file", mid, hdr)
    users = t["users"].take(pa.array(urow))
    age = users["age"].to_numpy()
    dom = _AGE_DOMAIN[np.searchsorted(AGE_CODES, age)]
    n = len(rating)
    split = np.zeros(n, dtype=np.int8)
    perm = np.random.default_rng(seed).permutation(n)
    split[perm[: n // 10]], split[perm[n // 10 : 2 * (n // 10)]] = 1, 2
    label = (rating > 3).astype(np.int8)
    table = pa.table({
        "user_id": uid, "movie_id": mid, "gender": users["gender"],
        "gender_id": (users["gender"].to_numpy(zero_copy_only=False) == "M").astype(np.int64),
        "age": age, "occupation": users["occupation"], "zip": users["zip"],
        "genres": t["movies"]["genres"].take(pa.array(mrow)),
        "domain": pa.array(DOMAINS).take(pa.array(dom)), "label": label, "split": split,
    })
    n_users = int(max(uid.max(), t["users"]["user_id"].to_numpy().max())) + 1
    n_movies = int(max(mid.max(), t["movies"]["movie_id"].to_numpy().max())) + 1
    n_occ = int(pc.max(t["users"]["occupation"]).as_py()) + 1
    name = "movielens-100k" if layout == "ml-100k" else "movielens-1m"
    stats = {"layout": layout, "seed": seed, "rows": n, "positive_rate": float(label.mean()),
             "genres": GENRES, "occupations": occupations, "domains": {},
             "splits": {s: int((split == j).sum()) for j, s in enumerate(SPLITS)}}

    def summary(m: np.ndarray) -> dict:
        return {"rows": int(m.sum()), "positive_rate": float(label[m].mean()) if m.any() else None}

    for k, dname in enumerate(DOMAINS):
        m = dom == k
        per = {s: summary(m & (split == j)) for j, s in enumerate(SPLITS)}
        stats["domains"][dname] = {**summary(m), "splits": per}
    return table, stats, _schema(name, n_users, n_movies, n_occ)


def _schema(name: str, n_users: int, n_movies: int, n_occ: int, dim: int = 16) -> Schema:
    """Schema of the imported log (index tables sized max id + 1, zip hashed into 8192)."""
    tables = {"user": n_users, "movie": n_movies, "gender": 2, "age": int(AGE_CODES[-1]) + 1,
              "occupation": n_occ, "zip": 8192, "genre": len(GENRES)}
    feats = [("user_id", "user", "index"), ("movie_id", "movie", "index"),
             ("gender_id", "gender", "index"), ("age", "age", "index"),
             ("occupation", "occupation", "index"), ("zip", "zip", "hash")]
    return Schema.from_dict({
        "name": name, "label": "label",
        "domain": {"column": "domain", "values": DOMAINS},
        "aux": [{"name": "gender", "column": "gender", "values": ["F", "M"]}],
        "tables": [{"name": k, "num_embeddings": v, "dim": dim} for k, v in tables.items()],
        "sparse": [{"name": f, "table": tb, "policy": p} for f, tb, p in feats]
        + [{"name": "genres", "table": "genre", "policy": "index", "multi": True}],
    })


def import_movielens(src: str | Path, out: str, seed: int = 0) -> dict:
    """Convert MovieLens in ``src`` and write it to ``out`` (local dir or s3://; schema.yaml last).

    Args:
        src: directory holding one of the :data:`LAYOUTS`.
        out: output directory (must be absent or empty) or ``s3://`` prefix.
        seed: seed of the train/val/test split.

    Returns:
        The stats written to ``OUT/stats.json`` (plus ``seconds``).

    Raises:
        FileNotFoundError / ValueError: bad input, naming the file and line.
        FileExistsError: ``out`` exists and is not empty.
    """
    t0 = time.perf_counter()
    fs, path = open_fs(out)
    if fs.exists(path) and (not fs.isdir(path) or fs.ls(path)):
        raise FileExistsError(f"{out}: output already exists and is not an empty directory")
    table, stats, schema = convert(src, seed)
    stats["seconds"] = time.perf_counter() - t0

    def write(root: str) -> None:
        split = table["split"].to_numpy()
        body = table.drop_columns(["split"])
        for j, s in enumerate(SPLITS):
            if not is_s3(out):
                fs.makedirs(f"{root}/{s}", exist_ok=True)
            with fs.open(f"{root}/{s}/part-00000.parquet", "wb") as f:
                pq.write_table(body.filter(pa.array(split == j)), f)
        with fs.open(f"{root}/stats.json", "w") as f:
            f.write(json.dumps(stats, indent=2, sort_keys=True) + "\n")
        with fs.open(f"{root}/schema.yaml", "w") as f:
            f.write(schema.dump())

    if is_s3(out):
        write(path)
    else:
        if Path(path).is_dir():
            Path(path).rmdir()
        with staging_dir(path) as tmp:
            write(str(tmp))
    return stats
