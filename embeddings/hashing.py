"""Stable, vectorised id hashing for ``policy: hash`` features.

The bucket of a raw id must never change between processes, runs or library versions, or a
trained table silently stops matching its ids. So no Python ``hash()`` (salted per process):

* integer ids: splitmix64 finaliser on the two's-complement ``uint64`` view;
* string ids: SipHash-2-4 with the fixed 16-byte key :data:`HASH_KEY` over the UTF-8 bytes
  (``pandas.util.hash_array``), computed once per distinct value of the batch;
* bucket: ``((h >> 32) * N) >> 32`` (Lemire's multiply-shift range reduction, N < 2**32), which
  is a fair map of the top 32 hash bits onto ``[0, N)`` without an integer division.

``tests/embeddings/test_batch.py`` pins exact outputs: changing any of this is a breaking
change for every trained backbone.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

HASH_KEY = "mdlora-hash-v1.0"
"""16-character SipHash key for string ids (part of the on-disk contract)."""

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def hash_ints(x: np.ndarray) -> np.ndarray:
    """splitmix64 of integer ids.

    Args:
        x: integer array of any width/sign, shape [n].

    Returns:
        uint64 [n] hashes (a fresh array).
    """
    z = x.astype(np.uint64)  # two's-complement view for negatives; always a copy
    z += _GOLDEN
    t = np.empty_like(z)
    for shift, mul in ((30, _M1), (27, _M2)):
        np.right_shift(z, np.uint64(shift), out=t)
        z ^= t
        z *= mul
    np.right_shift(z, np.uint64(31), out=t)
    z ^= t
    return z


def hash_strings(arr: pa.Array) -> np.ndarray:
    """SipHash-2-4 (key :data:`HASH_KEY`) of the UTF-8 bytes of each string, via its uniques.

    Args:
        arr: Arrow string-like array (string, large_string, string_view or dictionary of
            strings) without nulls, length n.

    Returns:
        uint64 [n] hashes.
    """
    if not pa.types.is_dictionary(arr.type):
        arr = pc.dictionary_encode(arr)
    uniques = arr.dictionary.to_numpy(zero_copy_only=False).astype(object)
    hashed = pd.util.hash_array(uniques, hash_key=HASH_KEY, categorize=False)
    return hashed[arr.indices.to_numpy(zero_copy_only=False)]


def bucket(h: np.ndarray, n: int) -> np.ndarray:
    """Map uint64 hashes onto ``[0, n)`` as int64: ``((h >> 32) * n) >> 32``.

    Args:
        h: uint64 hashes [m] (overwritten).
        n: number of buckets, 1 <= n < 2**32.

    Returns:
        int64 [m] bucket ids (a view of ``h``'s buffer).
    """
    if not 1 <= n < 1 << 32:
        raise ValueError(f"hash bucket count must be in [1, 2**32), got {n}")
    h >>= np.uint64(32)
    h *= np.uint64(n)
    h >>= np.uint64(32)
    return h.view(np.int64)
