"""MovieLens import: the three layouts on tiny fixtures, exact rows, split by seed, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mdlora.embeddings.schema import Schema
from mdlora.infra import movielens
from mdlora.jobs.cli import main

# user -> (gender, ML-1M age code, occupation, zip); ML-100K real ages map onto the same codes.
USERS = {
    1: ("F", 1, 10, "48067"),
    2: ("M", 56, 16, "70072"),
    3: ("M", 25, 15, "55117"),
    4: ("F", 45, 7, "02460"),
    5: ("M", 18, 20, "55455"),
    6: ("F", 35, 9, "55117"),
}
YEARS = {1: 16, 2: 60, 3: 30, 4: 47, 5: 20, 6: 40}
MOVIES = {
    1: ("Toy Story (1995)", "Animation|Children's|Comedy"),
    2: ("Café au lait (1993)", "Comedy"),
    3: ("Heat (1995)", "Action|Crime|Thriller"),
    4: ("Tank Girl (1995)", "Action|Comedy|Musical|Sci-Fi"),
}
RATINGS = [
    (1, 1, 5),
    (1, 2, 3),
    (1, 3, 4),
    (2, 1, 1),
    (2, 4, 4),
    (3, 2, 5),
    (3, 3, 2),
    (4, 4, 5),
    (5, 1, 4),
    (5, 3, 3),
    (6, 2, 4),
    (6, 4, 1),
]
DOMAIN = {
    1: "age_lt25",
    18: "age_lt25",
    25: "age_25_34",
    35: "age_ge35",
    45: "age_ge35",
    56: "age_ge35",
}
G = movielens.GENRES


def _expected() -> list[dict]:
    rows = []
    for u, m, r in RATINGS:
        g, age, occ, z = USERS[u]
        genres = [G.index(x) for x in MOVIES[m][1].split("|")]
        rows.append(
            dict(
                user_id=u,
                movie_id=m,
                gender=g,
                gender_id=int(g == "M"),
                age=age,
                zip=z,
                genres=genres,
                domain=DOMAIN[age],
                label=int(r > 3),
            )
        )
    return rows


def write_ml1m(d: Path, csv: bool = False) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "users.dat").write_bytes(
        "".join(f"{u}::{g}::{a}::{o}::{z}\n" for u, (g, a, o, z) in USERS.items()).encode("latin-1")
    )
    (d / "movies.dat").write_bytes(
        "".join(f"{m}::{t}::{g}\n" for m, (t, g) in MOVIES.items()).encode("latin-1")
    )
    if csv:
        lines = [
            f"{u},{m},{r},{97800000 + i if i < 5 else ''}" for i, (u, m, r) in enumerate(RATINGS)
        ]
        (d / "ratings.csv").write_text(
            "user_id,movie_id,rating,timestamp\n" + "\n".join(lines) + "\n"
        )
    else:
        (d / "ratings.dat").write_text(
            "".join(f"{u}::{m}::{r}::{97800000 + i}\n" for i, (u, m, r) in enumerate(RATINGS))
        )
    return d


def write_ml100k(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    occ = {o: f"job{o:02d}" for o in sorted({v[2] for v in USERS.values()})}
    (d / "u.user").write_text(
        "".join(f"{u}|{YEARS[u]}|{g}|{occ[o]}|{z}\n" for u, (g, _, o, z) in USERS.items())
    )
    items = []
    for m, (t, gs) in MOVIES.items():
        flags = ["0"] + ["1" if x in gs.split("|") else "0" for x in G]
        items.append(f"{m}|{t}|01-Jan-1995||http://x|" + "|".join(flags))
    items.append("5|unknown||||" + "|".join(["1"] + ["0"] * 18))  # 'unknown' only -> no genres
    (d / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    (d / "u.data").write_text(
        "".join(
            f"{u}\t{m}\t{r}\t{881250949 + i}\n" for i, (u, m, r) in enumerate(RATINGS + [(2, 5, 4)])
        )
    )
    return d


def _rows(out: Path) -> list[dict]:
    rows = []
    for s in ("train", "val", "test"):
        rows += pq.read_table(out / s / "part-00000.parquet").to_pylist()
    return sorted(rows, key=lambda r: (r["user_id"], r["movie_id"]))


@pytest.mark.parametrize("layout", ["ml-1m", "ml-1m-csv"])
def test_ml1m_layouts_exact_rows(tmp_path, layout):
    src = write_ml1m(tmp_path / "src", csv=layout == "ml-1m-csv")
    assert movielens.detect_layout(src) == layout
    stats = movielens.import_movielens(src, str(tmp_path / "out"), seed=0)
    got = _rows(tmp_path / "out")
    occ = [r.pop("occupation") for r in got]
    assert got == _expected()
    assert occ == [USERS[u][2] for u, _, _ in RATINGS]
    assert stats["splits"] == {"train": 10, "val": 1, "test": 1}
    assert stats["domains"]["age_lt25"]["rows"] == 5 and stats["domains"]["age_ge35"]["rows"] == 5
    assert stats["positive_rate"] == pytest.approx(7 / 12)
    schema = Schema.load(tmp_path / "out" / "schema.yaml")
    assert schema.domain.values == ["age_lt25", "age_25_34", "age_ge35"]
    assert schema.table("movie").num_embeddings == 5 and schema.table("user").num_embeddings == 7
    assert {f.name: f.policy for f in schema.sparse}["zip"] == "hash"
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["layout"] == layout


def test_ml100k_ages_genres_and_unknown(tmp_path):
    src = write_ml100k(tmp_path / "src")
    assert movielens.detect_layout(src) == "ml-100k"
    movielens.import_movielens(src, str(tmp_path / "out"), seed=0)
    got = _rows(tmp_path / "out")
    occ = {r["user_id"]: r.pop("occupation") for r in got}
    extra = got.pop(5)  # user 2 rated movie 5 ('unknown' genre only)
    assert (extra["movie_id"], extra["genres"], extra["domain"]) == (5, [], "age_ge35")
    assert got == _expected()
    ranks = {o: i for i, o in enumerate(sorted({v[2] for v in USERS.values()}))}
    assert occ == {u: ranks[USERS[u][2]] for u in USERS}


def test_split_by_seed(tmp_path):
    src = write_ml1m(tmp_path / "src")
    split = {}
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        movielens.import_movielens(src, str(tmp_path / name), seed=seed)
        split[name] = [
            [(r["user_id"], r["movie_id"]) for r in pq.read_table(tmp_path / name / s).to_pylist()]
            for s in ("train", "val", "test")
        ]
    assert split["a"] == split["b"] and split["a"] != split["c"]
    assert [len(s) for s in split["c"]] == [10, 1, 1]
    assert split["a"][0] == sorted(split["a"][0])  # source order is kept inside a split


@pytest.mark.parametrize(
    "file, content, match",
    [
        (
            "ratings.dat",
            "1::1::5::1\n1::2::3\n",
            r"ratings.dat:2: malformed line, expected 4 fields, got 3",
        ),
        (
            "ratings.dat",
            "1::1::5::1\n1::2::x::2\n",
            r"ratings.dat:2: column rating: 'x' is not an integer",
        ),
        ("ratings.dat", "1::1::5::1\n1::2::7::2\n", r"ratings.dat:2: rating must be 1-5"),
        (
            "ratings.dat",
            "1::1::5::1\n9::2::3::2\n",
            r"ratings.dat:2: user_id not in the users file",
        ),
        (
            "movies.dat",
            "1::A (1990)::Comedy\n2::B (1991)::Comedy|Sitcom\n",
            r"movies.dat:2: unknown genre",
        ),
        (
            "users.dat",
            "1::F::1::10::48067\n2::X::56::16::70072\n",
            r"users.dat:2: gender must be F or M",
        ),
        (
            "users.dat",
            "1::F::1::10::48067\n2::M::57::16::70072\n",
            r"users.dat:2: unknown age code",
        ),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, file, content, match):
    src = write_ml1m(tmp_path / "src")
    (src / file).write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError, match=match):
        movielens.import_movielens(src, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        movielens.detect_layout(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="unknown MovieLens layout"):
        movielens.detect_layout(tmp_path)
    src = write_ml1m(tmp_path / "src")
    (src / "users.dat").unlink()
    with pytest.raises(FileNotFoundError, match=r"users.dat: missing"):
        movielens.detect_layout(src)
    csv = write_ml1m(tmp_path / "csv", csv=True)
    (csv / "ratings.csv").write_text("user,movie,rating,ts\n1,1,5,\n")
    with pytest.raises(ValueError, match=r"ratings.csv:1: expected the header"):
        movielens.import_movielens(csv, str(tmp_path / "out"))


def test_cli_and_non_empty_out(tmp_path, capsys):
    src = write_ml100k(tmp_path / "src")
    assert main(["import-movielens", "--src", str(src), "--out", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 13
    assert main(["import-movielens", "--src", str(src), "--out", str(tmp_path / "out")]) == 2
    assert "not an empty directory" in capsys.readouterr().err


ML1M = Path(os.environ.get("MDLORA_ML1M", "/work/shared/data/movielens-1m"))


@pytest.mark.integration
@pytest.mark.skipif(not ML1M.is_dir(), reason=f"{ML1M} not present")
def test_real_ml1m_domain_counts(tmp_path):
    stats = movielens.import_movielens(ML1M, str(tmp_path / "ml1m"), seed=0)
    assert {k: v["rows"] for k, v in stats["domains"].items()} == {
        "age_lt25": 210_747,
        "age_25_34": 395_556,
        "age_ge35": 393_906,
    }
    assert stats["positive_rate"] == pytest.approx(0.5752, abs=1e-4)


@pytest.mark.integration
def test_s3_output(s3_env, tmp_path):
    from mdlora.infra.storage import open_fs

    src = write_ml1m(tmp_path / "src", csv=True)
    movielens.import_movielens(src, f"{s3_env}/ml", seed=0)
    movielens.import_movielens(src, str(tmp_path / "local"), seed=0)
    fs, path = open_fs(f"{s3_env}/ml")
    for rel in ("train/part-00000.parquet", "val/part-00000.parquet", "schema.yaml"):
        assert fs.cat_file(f"{path}/{rel}") == (tmp_path / "local" / rel).read_bytes(), rel
    with pytest.raises(FileExistsError, match="ml"):
        movielens.import_movielens(src, f"{s3_env}/ml")
