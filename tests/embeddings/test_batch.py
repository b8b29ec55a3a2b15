"""Arrow -> Batch conversion: exact KJT contents, stable hashing, and every bad-input error."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from mdlora.embeddings.batch import BatchConverter, LogValidationError, find_problems
from mdlora.embeddings.hashing import bucket, hash_ints, hash_strings
from mdlora.embeddings.schema import Schema

M64 = (1 << 64) - 1


def splitmix64_ref(x: int) -> int:
    """Reference splitmix64 finaliser in plain Python (Steele et al.; Vigna's C code)."""
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def bucket_ref(h: int, n: int) -> int:
    return ((h >> 32) * n) >> 32


@pytest.fixture
def schema(tiny_schema_dict) -> Schema:
    tiny_schema_dict["dense"][0]["fill"] = 0.0  # price: nulls -> 0 (raw units)
    return Schema.from_dict(tiny_schema_dict)


def table(**overrides) -> pa.Table:
    cols = {
        "click": [0, 1, 1],
        "domain": ["a", "c", "b"],
        "gender": ["M", "F", "M"],
        "user_id": [5, 6, 7],
        "item_id": [1, 2, 49],
        "hist_items": [[1, 2, 3, 4], None, [7]],
        "city": ["x", "y", "x"],
        "price": [0.0, 1.0, None],
        "age": [30, 40, 20],
    }
    cols.update(overrides)
    return pa.table({k: v for k, v in cols.items() if v is not None})


# ---- hashing ----------------------------------------------------------------------------------
def test_hashing_is_pinned():
    ids = np.array([0, 1, -1, 2**62], dtype=np.int64)
    # splitmix64(0) = 0xE220A8397B1DCDAF is the published first output of the generator
    assert hash_ints(ids).tolist() == [
        0xE220A8397B1DCDAF,
        10451216379200822465,
        16490336266968443936,
        47939714376772075,
    ]
    assert hash_ints(ids).tolist() == [splitmix64_ref(int(x) & M64) for x in ids]
    assert (
        hash_ints(ids[:3].astype(np.int32)).tolist() == hash_ints(ids[:3]).tolist()
    )  # width-independent
    strings = pa.array(["", "a", "user-42", "é"])
    assert hash_strings(strings).tolist() == [
        2567828452552502470,
        14670213787131024156,
        6748665271753231814,
        8372858911557299182,
    ]
    assert hash_strings(strings.dictionary_encode()).tolist() == hash_strings(strings).tolist()
    assert hash_strings(strings.cast(pa.large_string())).tolist() == hash_strings(strings).tolist()
    assert bucket(hash_ints(ids), 1000).tolist() == [883, 566, 893, 2]
    assert bucket(hash_strings(strings), 1000).tolist() == [139, 795, 365, 453]
    with pytest.raises(ValueError, match="bucket count"):
        bucket(hash_ints(ids), 1 << 32)


def test_hash_buckets_are_uniform():
    counts = np.bincount(bucket(hash_ints(np.arange(200_000)), 100), minlength=100)
    assert counts.min() > 1800 and counts.max() < 2200


# ---- exact contents ---------------------------------------------------------------------------
def test_exact_batch(schema):
    b = BatchConverter(schema).convert(table(), source="f.parquet")
    kjt = b.sparse
    assert kjt.keys() == ["user_id", "item_id", "hist", "city"]
    users = [bucket_ref(splitmix64_ref(u), 100) for u in (5, 6, 7)]
    cx, cy = bucket(hash_strings(pa.array(["x", "y"])), 16).tolist()
    assert kjt.values().tolist() == users + [1, 2, 49] + [1, 2, 3, 7] + [cx, cy, cx]
    assert kjt.lengths().tolist() == [1, 1, 1, 1, 1, 1, 3, 0, 1, 1, 1, 1]
    assert kjt.offsets().tolist() == [0, 1, 2, 3, 4, 5, 6, 9, 9, 10, 11, 12, 13]
    assert kjt.values().dtype == kjt.lengths().dtype == torch.int64
    # item_id and hist share the item table: both are row ids of the same table
    cfg = {c.name: c.feature_names for c in schema.embedding_bag_configs()}
    assert cfg["item"] == ["item_id", "hist"]
    torch.testing.assert_close(
        b.dense, torch.tensor([[0.0, 0.0], [np.log1p(1.0), 1.0], [0.0, -1.0]], dtype=torch.float32)
    )
    assert b.labels.tolist() == [0.0, 1.0, 1.0] and b.labels.dtype == torch.float32
    assert b.domains.tolist() == [0, 2, 1] and b.domains.dtype == torch.int64
    assert b.aux.tolist() == [[1], [0], [1]]


def test_equivalent_encodings_give_the_same_batch(schema):
    ref = BatchConverter(schema).convert(table())
    chunked = pa.concat_tables([table().slice(0, 1), table().slice(1)])
    variants = [
        chunked,
        table().to_batches()[0],
        table(
            domain=pa.array(["a", "c", "b"]).dictionary_encode(),
            city=pa.array(["x", "y", "x"]).dictionary_encode(),
        ),
        table(click=[False, True, True]),
        table(click=[0.0, 1.0, 1.0], user_id=pa.array([5, 6, 7], pa.int32())),
        table(gender=pa.array(["M", "F", "M"], pa.large_string())),
    ]
    for data in variants:
        b = BatchConverter(schema).convert(data)
        assert torch.equal(b.sparse.values(), ref.sparse.values())
        assert torch.equal(b.sparse.lengths(), ref.sparse.lengths())
        assert torch.equal(b.domains, ref.domains) and torch.equal(b.aux, ref.aux)
        assert torch.equal(b.labels, ref.labels) and torch.equal(b.dense, ref.dense)


def test_integer_domain_column_matches_decimal_strings(tiny_schema_dict):
    tiny_schema_dict["domain"]["values"] = ["7", "03", "2"]
    tiny_schema_dict["dense"][0]["fill"] = 0.0
    s = Schema.from_dict(tiny_schema_dict)
    b = BatchConverter(s).convert(table(domain=[2, 7, 2]))
    assert b.domains.tolist() == [2, 0, 2]
    with pytest.raises(LogValidationError, match=r"column 'domain'.*\[3\]"):
        BatchConverter(s).convert(table(domain=[2, 3, 2]), source="f.parquet")


def test_multi_valued_truncation_matches_a_reference(schema):
    rng = np.random.default_rng(0)
    lists = [
        None if rng.random() < 0.1 else rng.integers(0, 50, rng.integers(0, 8)).tolist()
        for _ in range(500)
    ]
    arr = pa.array(lists, pa.list_(pa.int64())).slice(7, 400)  # sliced: offsets do not start at 0
    n = len(arr)
    t = pa.table(
        {
            "click": np.zeros(n, int),
            "domain": ["a"] * n,
            "gender": ["F"] * n,
            "user_id": np.arange(n),
            "item_id": np.ones(n, int),
            "hist_items": arr,
            "city": ["x"] * n,
            "price": np.ones(n),
            "age": np.ones(n),
        }
    )
    kjt = BatchConverter(schema).convert(t).sparse.to_dict()["hist"]
    expect = [(v or [])[:3] for v in lists[7:407]]
    assert kjt.lengths().tolist() == [len(v) for v in expect]
    assert kjt.values().tolist() == [x for v in expect for x in v]


def test_empty_batch(schema):
    b = BatchConverter(schema).convert(table().slice(0, 0))
    assert len(b) == 0 and b.sparse.values().numel() == 0 and b.dense.shape == (0, 2)


# ---- bad input --------------------------------------------------------------------------------
BAD = [
    ("missing column", dict(item_id=None), "'item_id': missing column"),
    ("wrong type", dict(item_id=["1", "2", "3"]), "'item_id': wrong type string"),
    ("wrong list type", dict(hist_items=[1, 2, 3]), "'hist_items': wrong type int64"),
    ("null id", dict(item_id=[1, None, 2]), r"'item_id': null values .*\[1\]"),
    (
        "null list element",
        dict(hist_items=[[1, None], [], [2]]),
        r"'hist_items': null list elements",
    ),
    ("negative id", dict(item_id=[1, -3, 2]), r"'item_id': index ids outside \[0, 50\).*\[-3\]"),
    (
        "out-of-range id",
        dict(item_id=[1, 50, 2]),
        r"'item_id': index ids outside \[0, 50\).*\[50\]",
    ),
    (
        "out-of-range list id",
        dict(hist_items=[[1, 99], [], [2]]),
        r"'hist_items': index ids .*\[99\]",
    ),
    ("label 2", dict(click=[0, 2, 1]), r"'click': labels outside \{0, 1\}.*\[2\]"),
    ("label 0.5", dict(click=[0.0, 0.5, 1.0]), r"'click': labels outside .*\[0\.5\]"),
    ("null label", dict(click=[0, None, 1]), r"'click': null values"),
    (
        "unknown domain",
        dict(domain=["a", "zz", "zz"]),
        r"'domain': values not in the domain vocabulary.*2 rows.*\['zz'\]",
    ),
    (
        "unknown aux",
        dict(gender=["M", "X", "F"]),
        r"'gender': values not in the gender vocabulary.*\['X'\]",
    ),
    ("dense null, no fill", dict(age=[30, None, 20]), r"'age': null/NaN values and no fill.*\[1\]"),
    ("dense NaN, no fill", dict(age=[30.0, float("nan"), 20.0]), r"'age': null/NaN"),
    ("dense string", dict(age=["30", "1", "2"]), r"'age': wrong type string"),
]


@pytest.mark.parametrize("case, overrides, message", BAD, ids=[c[0] for c in BAD])
def test_bad_input_names_file_column_and_values(schema, case, overrides, message):
    data = table(**overrides)
    with pytest.raises(LogValidationError, match=r"^f\.parquet: column " + message):
        BatchConverter(schema).convert(data, source="f.parquet")
    problems = find_problems(schema, data)
    assert len(problems) == 1, problems


def test_find_problems_counts_every_kind(schema):
    data = table(item_id=[-1, 50, 3], click=[2, 1, 1], domain=["zz", "a", "b"], age=[None, 1, 2])
    kinds = {(p.column, p.kind): p.count for p in find_problems(schema, data)}
    assert kinds == {
        ("item_id", "range"): 2,
        ("click", "label"): 1,
        ("domain", "vocab"): 1,
        ("age", "null"): 1,
    }


def test_check_false_skips_value_scans_only(schema):
    b = BatchConverter(schema, check=False).convert(table(click=[0, 2, 1]))
    assert b.labels.tolist() == [0.0, 2.0, 1.0]
    with pytest.raises(LogValidationError, match="'domain'"):
        BatchConverter(schema, check=False).convert(table(domain=["a", "zz", "b"]))
