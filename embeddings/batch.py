"""One training/eval batch as TorchRec consumes it, and the vectorised Arrow -> Batch converter.

Letters: B batch rows, F sparse features, N dense features, A auxiliary divisions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mdlora.embeddings.hashing import bucket, hash_ints, hash_strings
from mdlora.embeddings.schema import DenseFeature, Division, Schema, SparseFeature


@dataclass
class Batch:
    """Tensors of one batch.

    Attributes:
        sparse: KJT with keys = ``schema.feature_names`` (in that order), int64 values/lengths.
        dense: float32 [B, N] normalised dense features (N may be 0).
        labels: float32 [B] in {0, 1}.
        domains: int64 [B] natural domain ids (index into ``schema.domain.values``).
        aux: int64 [B, A] auxiliary division ids (A may be 0).
    """

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    labels: torch.Tensor
    domains: torch.Tensor
    aux: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Copy every tensor to ``device``."""
        return Batch(
            sparse=self.sparse.to(device=torch.device(device), non_blocking=non_blocking),
            dense=self.dense.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            domains=self.domains.to(device, non_blocking=non_blocking),
            aux=self.aux.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        """Pinned-memory copy (for asynchronous host-to-GPU transfer)."""
        return Batch(
            sparse=self.sparse.pin_memory(),
            dense=self.dense.pin_memory(),
            labels=self.labels.pin_memory(),
            domains=self.domains.pin_memory(),
            aux=self.aux.pin_memory(),
        )


# ---- Arrow -> Batch ---------------------------------------------------------------------------


class LogValidationError(ValueError):
    """Log data does not match the schema; the message names the file, column and bad values."""


@dataclass
class Problem:
    """One kind of bad input in one column of a record batch."""

    column: str
    kind: str  # missing | type | null | range | label | vocab
    count: int
    examples: list
    detail: str

    def message(self, source: str = "") -> str:
        """``<source>: column 'c': <detail> (<count> rows, e.g. [...])``."""
        where = f"{source}: " if source else ""
        seen = f" ({self.count} rows, e.g. {self.examples})" if self.examples else ""
        return f"{where}column {self.column!r}: {self.detail}{seen}"


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_key(t: pa.DataType) -> bool:
    """String-like or integer, possibly dictionary-encoded (domain/aux columns, hashed ids)."""
    t = t.value_type if pa.types.is_dictionary(t) else t
    return _is_text(t) or pa.types.is_integer(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _roles(schema: Schema) -> list[tuple[str, str, object]]:
    """(column, role, spec) for every column the converter reads."""
    return (
        [(schema.label, "label", None), (schema.domain.column, "division", schema.domain)]
        + [(a.column, "division", a) for a in schema.aux]
        + [(f.column, "sparse", f) for f in schema.sparse]
        + [(d.column, "dense", d) for d in schema.dense]
    )


def _value_set(div: Division, t: pa.DataType) -> tuple[pa.Array, np.ndarray]:
    """Vocabulary as an Arrow array of the column's value type, plus position -> id map."""
    t = t.value_type if pa.types.is_dictionary(t) else t
    if not pa.types.is_integer(t):
        return pa.array(div.values, pa.string()).cast(t), np.arange(len(div.values), dtype=np.int64)
    ids = [i for i, v in enumerate(div.values) if v.lstrip("-").isdigit() and str(int(v)) == v]
    vals = pa.array([int(div.values[i]) for i in ids], pa.int64())
    return pc.cast(vals, t, safe=False), np.array(ids, dtype=np.int64)


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _type_ok(role: str, spec, t: pa.DataType) -> bool:
    """Whether a column of type ``t`` can play ``role`` (see :func:`_roles`)."""
    if role == "sparse":
        flat = t.value_type if _is_list(t) else t
        ok = _is_key(flat) if spec.policy == "hash" else pa.types.is_integer(flat)
        return ok and _is_list(t) == spec.multi
    return {
        "label": _numeric(t) or pa.types.is_boolean(t),
        "division": _is_key(t),
        "dense": _numeric(t),
    }[role]


def find_problems(
    schema: Schema, data: pa.RecordBatch | pa.Table, columns: set[str] | None = None
) -> list[Problem]:
    """Count every kind of bad input in ``data`` (the slow, explaining twin of the converter).

    Args:
        schema: the log schema.
        data: a record batch or table.
        columns: restrict the checks to these columns (all when None).

    Returns:
        One :class:`Problem` per (column, kind) found, in schema order; empty when clean.
    """
    out: list[Problem] = []

    def add(column: str, kind: str, bad: pa.Array, arr: pa.Array, detail: str, rows=False):
        """Record ``bad`` (a boolean mask over ``arr``); examples are values, or positions."""
        if count := pc.sum(bad).as_py() or 0:
            where = np.flatnonzero(bad.to_numpy(zero_copy_only=False))
            ex = where[:3].tolist() if rows else pc.unique(arr.filter(bad)).to_pylist()[:3]
            out.append(Problem(column, kind, count, ex, detail))

    names = set(data.schema.names)
    for column, role, spec in _roles(schema):
        if columns is not None and column not in columns:
            continue
        if column not in names:
            detail = f"missing column (present: {sorted(names)})"
            out.append(Problem(column, "missing", data.num_rows, [], detail))
            continue
        arr = _single_chunk(data.column(column))
        t = arr.type
        if not _type_ok(role, spec, t):
            out.append(
                Problem(
                    column, "type", data.num_rows, [str(t)], f"wrong type {t} for a {role} column"
                )
            )
            continue
        if role == "dense":
            if spec.fill is None:
                add(
                    column,
                    "null",
                    arr.is_null(nan_is_null=True),
                    arr,
                    "null/NaN values and no fill",
                    True,
                )
            continue
        if role == "sparse" and spec.multi:
            arr = arr.flatten()
            add(column, "null", arr.is_null(), arr, "null list elements (positions)", True)
        else:
            add(
                column,
                "null",
                arr.is_null(nan_is_null=True),
                arr,
                "null values where not allowed (rows)",
                True,
            )
        valid = arr.drop_null()
        if role == "label" and not pa.types.is_boolean(t):
            bad = pc.and_(pc.not_equal(valid, 0), pc.not_equal(valid, 1))
            add(column, "label", bad, valid, "labels outside {0, 1}")
        elif role == "division":
            bad = pc.is_null(pc.index_in(valid, value_set=_value_set(spec, t)[0]))
            add(
                column,
                "vocab",
                bad,
                valid,
                f"values not in the {spec.name} vocabulary {spec.values}",
            )
        elif role == "sparse" and spec.policy == "index":
            n = schema.table(spec.table).num_embeddings
            bad = pc.or_(pc.less(valid, 0), pc.greater_equal(valid, n))
            add(column, "range", bad, valid, f"index ids outside [0, {n}) of table {spec.table!r}")
    return out


class _Bad(Exception):
    """Internal: the fast path saw bad input in ``column``; find_problems explains it."""

    def __init__(self, column: str):
        self.column = column


class BatchConverter:
    """Vectorised Arrow record batch -> :class:`Batch` for one schema.

    Per feature f with table size N_f: ``index`` ids must lie in [0, N_f); ``hash`` ids map to
    ``bucket(hash(id), N_f)`` (see :mod:`mdlora.embeddings.hashing`); multi-valued list columns keep
    their first ``max_len`` values (a null list is an empty list). Dense columns: nulls/NaN
    become ``fill`` (raw units), then ``standard`` gives (x - mean) / std and ``log`` gives
    log1p(max(x, 0)). Labels may be int, bool or float columns holding 0/1.

    Args:
        schema: the log schema.
        check: run the O(B) value checks (label values, index-id ranges). Type, null and
            vocabulary checks always run (they are needed to convert at all).

    Example::

        conv = BatchConverter(schema)
        batch = conv.convert(record_batch, source="part-0.parquet")
        batch.sparse.keys() == schema.feature_names
    """

    def __init__(self, schema: Schema, *, check: bool = True):
        self.schema = schema
        self.check = check
        self._sizes = [schema.table(f.table).num_embeddings for f in schema.sparse]
        self._vsets: dict[tuple[str, str], tuple[pa.Array, np.ndarray]] = {}

    def convert(self, data: pa.RecordBatch | pa.Table, source: str = "") -> Batch:
        """Convert one record batch (or table) of B rows.

        Args:
            data: Arrow data holding at least ``schema.columns()``.
            source: file name for error messages.

        Returns:
            The :class:`Batch` (KJT values/lengths int64, key-major; dense float32 [B, N]).

        Raises:
            LogValidationError: naming ``source``, the column and up to 3 bad values.
        """
        s = self.schema
        try:
            missing = [c for c in s.columns() if c not in data.schema.names]
            if missing:
                raise _Bad(missing[0])
            col = {c: _single_chunk(data.column(c)) for c in s.columns()}
            n = data.num_rows
            labels = self._labels(col[s.label], s.label)
            domains = self._division(s.domain, col[s.domain.column])
            aux = np.empty((n, len(s.aux)), dtype=np.int64)
            for j, a in enumerate(s.aux):
                aux[:, j] = self._division(a, col[a.column])
            values, lengths = [], np.ones(len(s.sparse) * n, dtype=np.int64)
            for i, (f, size) in enumerate(zip(s.sparse, self._sizes, strict=True)):
                if f.multi:
                    v, lengths[i * n : (i + 1) * n] = self._multi(f, size, col[f.column])
                else:
                    v = self._ids(f, size, col[f.column])
                values.append(v)
            dense = np.empty((n, len(s.dense)), dtype=np.float32)
            for j, d in enumerate(s.dense):
                dense[:, j] = self._dense(d, col[d.column])
        except _Bad as bad:
            raise self._error(data, source, bad.column) from None
        kjt = KeyedJaggedTensor(
            keys=s.feature_names,
            values=torch.from_numpy(np.concatenate(values)),  # the schema has >= 1 feature
            lengths=torch.from_numpy(lengths),
        )
        return Batch(
            sparse=kjt,
            dense=torch.from_numpy(dense),
            labels=torch.from_numpy(labels),
            domains=torch.from_numpy(domains),
            aux=torch.from_numpy(aux),
        )

    def _error(self, data, source: str, column: str) -> LogValidationError:
        """The explained error for ``column``, which the fast path found bad."""
        found = find_problems(self.schema, data, {column}) or [Problem(column, "?", 0, [], "bad")]
        return LogValidationError("; ".join(p.message(source) for p in found))

    def _labels(self, arr: pa.Array, column: str) -> np.ndarray:
        t = arr.type
        if arr.null_count or not _type_ok("label", None, t):
            raise _Bad(column)
        x = arr.to_numpy(zero_copy_only=False)
        if self.check and len(x) and not pa.types.is_boolean(t):
            if pa.types.is_integer(t) and (x.min() < 0 or x.max() > 1):
                raise _Bad(column)
            if pa.types.is_floating(t) and not ((x == 0) | (x == 1)).all():
                raise _Bad(column)
        return x.astype(np.float32)

    def _division(self, div: Division, arr: pa.Array) -> np.ndarray:
        if not _is_key(arr.type) or arr.null_count:
            raise _Bad(div.column)
        dictionary = pa.types.is_dictionary(arr.type)
        values = arr.dictionary if dictionary else arr  # map the few distinct values only
        key = (div.name, str(values.type))
        if key not in self._vsets:
            self._vsets[key] = _value_set(div, values.type)
        vset, pos_to_id = self._vsets[key]
        pos = pc.index_in(values, value_set=vset)
        if not dictionary:
            if pos.null_count:  # not in the vocabulary
                raise _Bad(div.column)
            return pos_to_id[pos.to_numpy()]
        dict_ids = np.append(pos_to_id, -1)[pc.fill_null(pos, len(pos_to_id)).to_numpy()]
        ids = dict_ids[arr.indices.to_numpy()]
        if len(ids) and ids.min() < 0:
            raise _Bad(div.column)
        return ids

    def _ids(self, f: SparseFeature, size: int, arr: pa.Array) -> np.ndarray:
        """int64 row ids of a flat (non-list) id array."""
        if pa.types.is_dictionary(arr.type) and not _is_text(arr.type.value_type):
            arr = arr.dictionary_decode()
        t = arr.type
        if arr.null_count:
            raise _Bad(f.column)
        if pa.types.is_integer(t):
            x = arr.to_numpy()
            if f.policy == "hash":
                return bucket(hash_ints(x), size)
            if self.check and len(x) and (x.min() < 0 or x.max() >= size):
                raise _Bad(f.column)
            return x.astype(np.int64, copy=False)
        if f.policy == "hash" and _is_key(t):
            return bucket(hash_strings(arr), size)
        raise _Bad(f.column)

    def _multi(self, f: SparseFeature, size: int, arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """(values [sum L], lengths [B]) of a list column, truncated to ``max_len``."""
        if not _is_list(arr.type):
            raise _Bad(f.column)
        offsets = arr.offsets.to_numpy()
        lens = np.diff(offsets).astype(np.int64)
        ids = self._ids(f, size, arr.values.slice(offsets[0], offsets[-1] - offsets[0]))
        keep = lens
        if arr.null_count:
            keep = np.where(arr.is_valid().to_numpy(zero_copy_only=False), lens, 0)
        if f.max_len is not None:
            keep = np.minimum(keep, f.max_len)
        if keep is not lens and (keep != lens).any():
            # jagged gather: value j of row i sits at (offsets[i] - offsets[0]) + j
            out_starts = np.cumsum(keep) - keep
            idx = np.repeat(offsets[:-1] - offsets[0] - out_starts, keep) + np.arange(
                out_starts[-1] + keep[-1]
            )
            ids = ids[idx]
        return ids, keep

    def _dense(self, d: DenseFeature, arr: pa.Array) -> np.ndarray:
        t = arr.type
        if not _numeric(t):
            raise _Bad(d.column)
        x = arr.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        if arr.null_count or pa.types.is_floating(t):
            nan = np.isnan(x)
            if nan.any():
                if d.fill is None:
                    raise _Bad(d.column)
                x = np.where(nan, np.float32(d.fill), x)
        if d.norm == "standard":
            return (x - np.float32(d.mean)) / np.float32(d.std)
        if d.norm == "log":
            return np.log1p(np.maximum(x, 0))
        return x


def _single_chunk(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        return arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    return arr
