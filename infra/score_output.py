"""Scored output: how a dataset's row groups are cut into parts, how parts are committed, and
the compact per-row scores that make per-domain metrics exact over any number of parts.

Layout of ``out``:

* one worker: one Parquet file at ``out``;
* W > 1 workers: a directory ``out/`` holding ``part-00000.parquet`` .. ``part-{W-1:05d}.parquet``
  and an empty ``_SUCCESS``.

Both keep the input's row order (files by path, row groups, rows): part ``i`` holds the
``i``-th contiguous share of the row groups, so reading the parts by name (``pq.read_table(out)``,
:func:`mdlora.infra.logs.parquet_dataset`, which skip ``_SUCCESS``) gives the rows in input
order. The row number is the join key of a prediction with its input row.

Commit: a local ``out`` is written as a hidden temp file or staging directory beside it and
renamed into place once every part is written (:mod:`mdlora.atomic`); the parts of a local
``out`` are written by the tasks themselves, so a multi-node Ray cluster needs ``out`` on a
shared file system or S3. S3 has no rename: a single file is one upload (visible only when
complete); parts are uploaded under a hidden staging prefix beside ``out`` and, once all are
there, the old ``out/`` is removed, the parts are copied under it and ``_SUCCESS`` is written
last (readers of S3 output wait for it). A failed job removes its staging and leaves ``out``
as it was.
"""

from __future__ import annotations

import contextlib
import os
import resource
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from mdlora.atomic import staging_dir, staging_file
from mdlora.infra.logs import Piece
from mdlora.infra.storage import is_s3, open_fs

SUCCESS = "_SUCCESS"


def part_name(i: int) -> str:
    """File name of part ``i`` (names sort in part order)."""
    return f"part-{i:05d}.parquet"


def partition(pieces: list[Piece], n: int) -> list[list[Piece]]:
    """Cut ``pieces`` (in order) into ``min(n, len(pieces))`` contiguous, non-empty shares whose
    row counts are as even as row-group boundaries allow."""
    n = max(1, min(n, len(pieces)))
    cum = np.cumsum([p.rows for p in pieces])  # [P]
    cuts = [0]
    for k in range(1, n):
        c = int(np.abs(cum - cum[-1] * k / n).argmin()) + 1  # cut after the nearest boundary
        cuts.append(min(max(c, cuts[-1] + 1), len(pieces) - (n - k)))
    cuts.append(len(pieces))
    return [pieces[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def piece_domains(piece: Piece, column: str) -> set[str] | None:
    """Domains of a piece known without reading its rows: a hive partition key, or a row group
    whose Parquet statistics have min == max; None when unknown."""
    keys = ds.get_partition_keys(piece.fragment.partition_expression)
    if column in keys:
        return {str(keys[column])}
    stats = (piece.fragment.row_groups[0].statistics or {}).get(column) or {}
    if stats.get("min") is not None and stats.get("min") == stats.get("max"):
        return {str(stats["min"])}
    return None


def domains_needed(pieces: list[Piece], column: str) -> set[str] | None:
    """Union of :func:`piece_domains` over ``pieces``; None when any piece's is unknown."""
    out: set[str] = set()
    for p in pieces:
        d = piece_domains(p, column)
        if d is None:
            return None
        out |= d
    return out


@dataclass
class Scores:
    """Compact per-row scores of one part (7 bytes a row with labels): enough for exact
    per-domain AUC / LogLoss / NE / calibration on the driver, whatever the number of parts."""

    names: list[str] = field(default_factory=list)
    """Domain names; ``codes`` index into it (null domains: '')."""
    codes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    """int32 [N] domain of each row."""
    prob: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    """float32 [N] click probabilities."""
    label: np.ndarray | None = None
    """uint8 [N] labels (float32 when not 0/1 integers); None: unlabelled."""
    seconds: float = 0.0
    """Wall seconds the part took (loading included)."""
    peak_rss_mb: float = 0.0
    """Peak resident memory of the process that scored the part."""

    @property
    def rows(self) -> int:
        """Rows N."""
        return len(self.prob)

    @classmethod
    def of_batches(cls, batches: list[tuple[pa.Array, np.ndarray, pa.Array | None]]) -> Scores:
        """Scores of ``(domain string array, prob float32 [B], label array or None)`` batches."""
        names: dict[str, int] = {}
        codes, probs, labels = [], [], []
        for dom, prob, label in batches:
            enc = pc.fill_null(dom, "").dictionary_encode()
            local = np.array([names.setdefault(v, len(names)) for v in enc.dictionary.to_pylist()], np.int32)
            codes.append(local[enc.indices.to_numpy(zero_copy_only=False)] if len(local) else
                         np.zeros(0, np.int32))
            probs.append(prob)
            if label is not None:
                labels.append(_compact_label(label.to_numpy(zero_copy_only=False)))
        label = np.concatenate(labels) if labels else None
        return cls(list(names), _cat(codes, np.int32), _cat(probs, np.float32), label)

    @classmethod
    def concat(cls, parts: list[Scores]) -> Scores:
        """One :class:`Scores` of ``parts`` in order, codes mapped to the sorted union of names."""
        names = sorted({n for p in parts for n in p.names})
        index = {n: i for i, n in enumerate(names)}
        codes = [np.array([index[n] for n in p.names], np.int32)[p.codes] if p.names else p.codes for p in parts]
        labelled = all(p.label is not None for p in parts)
        label = np.concatenate([p.label for p in parts]) if labelled and parts else None
        return cls(names, _cat(codes, np.int32), _cat([p.prob for p in parts], np.float32), label)

    def finish(self, seconds: float) -> Scores:
        """Record the part's wall seconds and this process's peak RSS; returns self."""
        self.seconds, self.peak_rss_mb = seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return self


def _cat(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)


def _compact_label(y: np.ndarray) -> np.ndarray:
    """uint8 for 0/1 integer (or bool) labels, else float32."""
    if y.dtype.kind in "biu" and (y.size == 0 or (y.min() >= 0 and y.max() <= 1)):
        return y.astype(np.uint8)
    return y.astype(np.float32)


@contextlib.contextmanager
def staged_output(out: str, parts: int) -> Iterator[list[str]]:
    """Yield where each part is written; commit them to ``out`` at once when the block succeeds.

    Args:
        out: the output (local path or s3:// URI).
        parts: 0 for one Parquet file at ``out``; W >= 1 for a directory of W parts.

    Yields:
        The destinations (local paths or s3:// URIs) of the parts, in part order; write each
        through :func:`local_file`.
    """
    if not parts:
        if is_s3(out):
            yield [out]  # one upload: the object appears complete or not at all
            return
        with staging_file(out) as tmp:
            yield [str(tmp)]
        return
    if not is_s3(out):
        with staging_dir(os.path.abspath(out), overwrite=True) as tmp:  # absolute: tasks have another cwd
            yield [str(tmp / part_name(i)) for i in range(parts)]
            (tmp / SUCCESS).write_bytes(b"")
        return
    fs, final = open_fs(out)
    parent, name = os.path.split(final)
    staging = f"{parent}/.{name}.staging-{uuid.uuid4().hex[:12]}"
    try:
        yield [fs.unstrip_protocol(f"{staging}/{part_name(i)}") for i in range(parts)]
        _commit_s3(fs, staging, final, parts)
    finally:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(staging, recursive=True)


def _commit_s3(fs, staging: str, final: str, parts: int) -> None:
    """Replace ``final``'s parts with the staged ones; ``_SUCCESS`` goes first out and last in."""
    fs.invalidate_cache()
    if fs.exists(f"{final}/{SUCCESS}"):
        fs.rm_file(f"{final}/{SUCCESS}")
    if fs.exists(final):
        fs.rm(final, recursive=True)
    for i in range(parts):
        fs.copy(f"{staging}/{part_name(i)}", f"{final}/{part_name(i)}")
    fs.pipe_file(f"{final}/{SUCCESS}", b"")


@contextlib.contextmanager
def local_file(dest: str) -> Iterator[str]:
    """A local path to write ``dest``'s bytes to: ``dest`` itself when local (a staging path),
    else a temp file uploaded to ``dest`` when the block succeeds."""
    if not is_s3(dest):
        yield dest
        return
    with tempfile.TemporaryDirectory(prefix="mdlora-part-") as d:
        path = os.path.join(d, os.path.basename(dest))
        yield path
        fs, key = open_fs(dest)
        fs.put_file(path, key)
