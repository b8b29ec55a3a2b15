"""Parquet log datasets (local or ``s3://``): filtered, sharded, shuffled, prefetched batches.

A dataset is a Parquet file or directory (hive partitions such as ``date=YYYY-MM-DD/`` are
read as columns). Rows are filtered by a date window on ``schema.date_column`` and a domain
subset, and projected to ``schema.columns()``. Memory stays bounded: record batches are
streamed piece by piece, never the whole dataset.

Sharding: a *piece* is one row group (after filtering). Each epoch the piece order is permuted
with ``seed`` and ``epoch`` (identically on every rank); the T filtered rows of that order are
cut into W contiguous shares ``[r*T//W, (r+1)*T//W)``, so shares differ by at most one row and
every rank yields exactly ``num_batches(batch_size, W)`` batches (``floor((T//W) / batch_size)``
with ``drop_last``), which keeps collective ops in lock step.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from mdlora.embeddings.batch import BatchConverter, LogValidationError, Problem, find_problems
from mdlora.embeddings.schema import Schema
from mdlora.infra.storage import open_fs

READ_ROWS = 65536
"""Rows per record batch read from a file."""
SHUFFLE_BATCHES = 4
"""Shuffle-buffer size in batches (per rank)."""


PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
"""Names of the data files of a dataset directory; the files beside them (``schema.yaml``,
``truth.json``, ``stats.json``) are not read."""
IGNORE_PREFIXES = (".", "_")
"""Path components skipped below a dataset directory: hidden files and ``_SUCCESS``,
``_metadata``, ``_temporary/`` (pyarrow.dataset's default ``ignore_prefixes``)."""
SPLITS = ("train", "val", "test")
"""Split subdirectories that ``gen-logs`` and ``import-movielens`` write."""


class LogReadError(ValueError):
    """A Parquet file is missing, unreadable or truncated; the message names the file."""


def parquet_dataset(uri: str, fmt: ds.FileFormat | str = "parquet") -> ds.FileSystemDataset:
    """Open the Parquet file or directory (hive partitions as columns) at ``uri``, local or S3.

    A directory's data files are its ``*.parquet`` files (:data:`PARQUET_SUFFIXES`) at any
    depth, except below a hidden or ``_``-prefixed name (:data:`IGNORE_PREFIXES`). The files are
    selected by name from one listing: pyarrow's ``exclude_invalid_files`` would skip side files
    too, but it reads every file's footer to do so and silently drops a truncated Parquet
    file, which must stay an error naming the file.

    Args:
        uri: Parquet file or directory, local path or ``s3://bucket/prefix``.
        fmt: the pyarrow file format (read options).

    Returns:
        The dataset; its ``files`` are the selected Parquet files.

    Raises:
        FileNotFoundError: ``uri`` does not exist.
        LogReadError: no Parquet files (naming some of the other files), a directory of splits
            (naming them: the dataset is one of them), or the dataset cannot be opened.
    """
    fs, path = open_fs(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri}: no such file or directory")
    kw = {}
    if fs.isdir(path):
        source, kw = _parquet_files(uri, sorted(fs.find(path)), path), {"partition_base_dir": path}
    else:
        source = path  # a file named explicitly is read as Parquet whatever its name
    try:
        return ds.dataset(source, filesystem=fs, format=fmt, partitioning="hive", **kw)
    except (pa.ArrowInvalid, OSError) as e:
        raise LogReadError(f"{uri}: cannot open Parquet dataset: {e}") from None


def _parquet_files(uri: str, found: list[str], base: str) -> list[str]:
    """The data files among ``found`` (every file below ``base``, the directory ``uri`` names)."""
    rel = [f[len(base) :].lstrip("/") for f in found]
    keep = [
        not any(p.startswith(IGNORE_PREFIXES) for p in r.split("/"))
        and r.lower().endswith(PARQUET_SUFFIXES)
        for r in rel
    ]
    splits = [s for s in SPLITS if any(r.startswith(f"{s}/") for r in rel)]
    if splits and not any(k and "/" not in r for k, r in zip(keep, rel, strict=True)):
        names = ", ".join(f"{s}/" for s in splits)
        raise LogReadError(
            f"{uri}: a directory of splits ({names}), not one dataset: point at one "
            f"of them, e.g. {uri.rstrip('/')}/{splits[0]}"
        )
    files = [f for f, k in zip(found, keep, strict=True) if k]
    if not files:
        others = (
            f"; not Parquet: {', '.join(rel[:3])}{', ...' if len(rel) > 3 else ''}" if rel else ""
        )
        raise LogReadError(f"{uri}: empty dataset (no Parquet files{others})")
    return files


@dataclass
class Piece:
    """One row group of one file, with its row count after the filters."""

    path: str
    rows: int
    fragment: ds.ParquetFileFragment


class LogDataset:
    """A Parquet log dataset with window/domain filters and column projection.

    Args:
        uri: Parquet file or directory, local path or ``s3://bucket/prefix``.
        schema: the log schema (columns, date column, domain vocabulary).
        window: ``START..END`` (inclusive ``YYYY-MM-DD`` dates) on ``schema.date_column``.
        domains: keep only these natural domains (values of ``schema.domain``).

    Raises:
        FileNotFoundError: ``uri`` does not exist.
        LogReadError: no Parquet files, or the dataset cannot be opened.
        LogValidationError: a needed column is missing or a filter value is invalid.
    """

    def __init__(
        self, uri: str, schema: Schema, *, window: str = "", domains: list[str] | None = None
    ):
        self.uri, self.schema = uri, schema
        # key columns (strings) stay dictionary-encoded: cheaper to decode, take and map
        keys = [schema.domain.column, *(a.column for a in schema.aux)]
        keys += [f.column for f in schema.sparse if f.policy == "hash" and not f.multi]
        fmt = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=keys))
        self._ds = parquet_dataset(uri, fmt)
        names = self._ds.schema.names
        self.missing_columns = [c for c in schema.columns() if c not in names]
        self.columns = [c for c in schema.columns() if c in names]
        w, d = self._window_filter(window), self._domain_filter(domains)
        self.filter = w & d if w is not None and d is not None else w if w is not None else d
        scan = {"schema": self._ds.schema, "columns": self.columns, "filter": self.filter}
        # bounded memory. Decoding on Arrow's pool (use_threads) costs ~10% more CPU per row than
        # in the calling thread, but pretraining ran 10% faster with it (83k/80k vs 91k/93k
        # samples/s, alternating runs at world 1): the decode then overlaps the step without the GIL
        self._scan = {**scan, "batch_size": READ_ROWS, "batch_readahead": 1}
        self._pieces: list[Piece] | None = None

    def _window_filter(self, window: str) -> pc.Expression | None:
        if not window:
            return None
        col = self.schema.date_column
        if not col or col not in self._ds.schema.names:
            raise LogValidationError(f"{self.uri}: window {window!r} needs the date column {col!r}")
        try:
            start, end = (dt.date.fromisoformat(x.strip()) for x in window.split(".."))
        except ValueError:
            raise ValueError(f"window {window!r}: expected YYYY-MM-DD..YYYY-MM-DD") from None
        stop = end + dt.timedelta(days=1)  # [start, end + 1 day): END is inclusive
        t = self._ds.schema.field(col).type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            start, stop = start.isoformat(), stop.isoformat()
        elif pa.types.is_timestamp(t):
            start, stop = (pa.scalar(dt.datetime.combine(d, dt.time()), t) for d in (start, stop))
        elif not pa.types.is_date(t):
            raise LogValidationError(f"{self.uri}: column {col!r}: type {t} cannot hold dates")
        return (pc.field(col) >= start) & (pc.field(col) < stop)

    def _domain_filter(self, domains: list[str] | None) -> pc.Expression | None:
        if not domains:
            return None
        div = self.schema.domain
        for d in domains:
            div.index(d)  # ValueError naming an unknown domain
        names = self._ds.schema.names
        t = self._ds.schema.field(div.column).type if div.column in names else pa.string()
        t = t.value_type if pa.types.is_dictionary(t) else t
        values = [int(d) for d in domains] if pa.types.is_integer(t) else list(domains)
        return pc.field(div.column).isin(pa.array(values).cast(t))

    # ---- pieces ----------------------------------------------------------------------------
    def fragments(self) -> list[Piece]:
        """Row-group pieces with their filtered row counts (one cheap scan, then cached).

        Without a filter the counts come from Parquet metadata; with one, only the filter
        columns are read. Pieces are in file path then row-group order; empty ones are dropped.
        """
        if self._pieces is not None:
            return self._pieces
        pieces, sch = [], self._ds.schema
        for frag in sorted(self._ds.get_fragments(filter=self.filter), key=lambda f: f.path):
            with _naming(frag.path):
                for rg in frag.split_by_row_group(self.filter, schema=sch):
                    rows = rg.row_groups[0].num_rows
                    if self.filter is not None:
                        rows = rg.scanner(schema=sch, filter=self.filter, columns=[]).count_rows()
                    if rows:
                        pieces.append(Piece(frag.path, rows, rg))
        self._pieces = pieces
        return pieces

    def num_rows(self) -> int:
        """Filtered rows in the whole dataset."""
        return sum(p.rows for p in self.fragments())

    def num_batches(self, batch_size: int, world_size: int = 1, drop_last: bool = True) -> int:
        """Batches every rank yields from :meth:`iter_batches` (the same on all ranks)."""
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size {batch_size}, world_size {world_size}: must be >= 1")
        total = self.num_rows()
        if total == 0:
            raise LogValidationError(f"{self.uri}: empty dataset (no rows after the filters)")
        share = total // world_size if drop_last else -(-total // world_size)  # smallest/largest
        return share // batch_size if drop_last else -(-share // batch_size)

    @property
    def scan(self) -> dict:
        """Scanner options of :meth:`read_piece` (picklable: they travel with pieces to Ray tasks)."""
        return self._scan

    def read_piece(self, piece: Piece) -> Iterator[pa.RecordBatch]:
        """Stream the filtered, projected record batches of one piece (errors name the file)."""
        return read_piece(piece, self._scan)

    # ---- batches ---------------------------------------------------------------------------
    def iter_batches(
        self,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        prefetch: int = 2,
        converter: BatchConverter | None = None,
    ) -> Iterator:
        """Yield this rank's batches for one epoch.

        Args:
            batch_size: rows per batch (per rank).
            rank: this rank, in [0, world_size).
            world_size: number of ranks W.
            epoch: epoch number (re-seeds the piece order and the shuffle buffer).
            seed: run seed; must be equal on every rank.
            shuffle: permute pieces and rows (within a buffer of a few batches).
            drop_last: drop the last partial batch; otherwise ranks short of a batch yield an
                empty (0-row) last batch so that counts stay equal.
            prefetch: batches prepared ahead by a background thread (0: inline).
            converter: turns Arrow tables into :class:`~mdlora.embeddings.batch.Batch`; None yields
                ``pyarrow.Table`` batches.

        Yields:
            Exactly ``num_batches(batch_size, world_size, drop_last)`` batches.
        """
        if self.missing_columns:
            raise LogValidationError(f"{self.uri}: missing column {self.missing_columns[0]!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank}: must be in [0, {world_size})")
        steps = self.num_batches(batch_size, world_size, drop_last)
        pieces = self.fragments()
        perm = np.random.default_rng([seed, epoch]).permutation(len(pieces)) if shuffle else None
        order = [pieces[i] for i in perm] if shuffle else pieces
        total = sum(p.rows for p in pieces)
        lo, hi = rank * total // world_size, (rank + 1) * total // world_size
        rng = np.random.default_rng([seed, epoch, rank]) if shuffle else None
        empty = pa.schema([self._ds.schema.field(c) for c in self.columns]).empty_table()

        def produce() -> Iterator:
            for table, src in _rebatch(self._share(order, lo, hi), empty, batch_size, steps, rng):
                yield table if converter is None else _convert(converter, table, src, order)

        return _prefetched(produce, prefetch)

    def _share(self, order: list[Piece], lo: int, hi: int) -> Iterator[tuple[pa.RecordBatch, int]]:
        """Record batches holding rows [lo, hi) of the concatenated ``order``, with piece index."""
        pos = 0
        for i, piece in enumerate(order):
            start, stop = max(lo - pos, 0), min(hi - pos, piece.rows)
            if start < stop:
                seen = 0
                for rb in self.read_piece(piece):
                    a, b = max(start - seen, 0), min(stop - seen, rb.num_rows)
                    if a < b:
                        yield rb.slice(a, b - a), i
                    seen += rb.num_rows
                    if seen >= stop:
                        break
                if seen < stop:
                    raise LogReadError(f"{piece.path}: read {seen} rows, expected {piece.rows}")
            if (pos := pos + piece.rows) >= hi:
                return


def _rebatch(stream, empty: pa.Table, batch_size: int, steps: int, rng) -> Iterator[tuple]:
    """Cut a record-batch stream into ``steps`` (table, source piece per row) batches.

    Rows pass through a shuffle buffer; a last partial (or empty) table pads up to ``steps``.
    """
    cap = batch_size * (SHUFFLE_BATCHES if rng is not None else 1)
    buf, src, rows, done = [], [], 0, 0

    def mix() -> tuple[pa.Table, np.ndarray]:  # concatenate (zero-copy), permute with an rng
        table, s = pa.Table.from_batches(buf), np.concatenate(src)
        perm = rng.permutation(table.num_rows) if rng is not None else None
        return (table.take(perm), s[perm]) if rng is not None else (table, s)

    for rb, i in stream:
        buf.append(rb)
        src.append(np.full(rb.num_rows, i, dtype=np.int32))
        rows += rb.num_rows
        if rows < cap:
            continue
        table, s = mix()
        full = rows // batch_size
        for k in range(full):
            if done == steps:
                return
            yield table.slice(k * batch_size, batch_size), s[k * batch_size : (k + 1) * batch_size]
            done += 1
        rest = full * batch_size
        buf, src, rows = table.slice(rest).to_batches(), [s[rest:]], rows - rest
    table, s = mix() if buf else (empty, np.empty(0, np.int32))
    for _ in range(steps - done):
        yield table.slice(0, batch_size), s[:batch_size]
        table, s = table.slice(batch_size), s[batch_size:]


def _convert(converter: BatchConverter, table: pa.Table, src: np.ndarray, order: list[Piece]):
    """Convert; on bad input, find the file it came from (rows are mixed by the shuffle)."""
    try:
        return converter.convert(table, source=order[src[0]].path if len(src) else "")
    except LogValidationError:
        for i in np.unique(src):
            converter.convert(table.filter(pa.array(src == i)), source=order[i].path)
        raise


_END = object()


def _prefetched(produce: Callable[[], Iterator], depth: int) -> Iterator:
    """Run ``produce()`` in a thread ``depth`` items ahead; the thread stops with the consumer."""
    if depth == 0:
        yield from produce()
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in produce():
                q.put(item)
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    thread = threading.Thread(target=work, name="mdlora-prefetch", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # free the queue so a pending put returns and sees `stop`
            with contextlib.suppress(queue.Empty):
                q.get_nowait()
            thread.join(0.01)


def read_piece(piece: Piece, scan: dict) -> Iterator[pa.RecordBatch]:
    """Stream the record batches of one piece with :attr:`LogDataset.scan` options (errors name the file)."""
    with _naming(piece.path):
        yield from piece.fragment.to_batches(**scan)


@contextlib.contextmanager
def _naming(path: str) -> Iterator[None]:
    """Turn Arrow read errors into :class:`LogReadError` naming ``path``."""
    try:
        yield
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise LogReadError(f"{path}: unreadable Parquet file: {e}") from None


def validate_dataset(
    uri: str, schema: Schema, window: str = "", domains: list[str] | None = None
) -> dict:
    """Stream the whole dataset and summarise it against ``schema``; collect every problem.

    Args:
        uri: Parquet file or directory, local or ``s3://``.
        schema: the log schema.
        window: optional ``START..END`` date window.
        domains: optional domain subset.

    Returns:
        ``{"uri", "rows", "domains": {name: {"rows", "positive_rate"}}, "nulls": {column: n},
        "out_of_range": {feature: n}, "unseen_domains": {value: n}, "errors": [line, ...]}``;
        each error line names the file, the column and up to 3 example values.
    """
    data = LogDataset(uri, schema, window=window, domains=domains)
    report = {
        "uri": uri,
        "rows": 0,
        "domains": {d: {"rows": 0, "positives": 0} for d in schema.domain.values},
        "nulls": dict.fromkeys(data.columns, 0),
        "out_of_range": {f.name: 0 for f in schema.sparse if f.policy == "index"},
        "unseen_domains": {},
        "errors": [f"{uri}: column {c!r}: missing column" for c in data.missing_columns],
    }
    found: dict[tuple[str, str, str], Problem] = {}  # (file, column, kind) -> merged problem
    for frag in sorted(data._ds.get_fragments(filter=data.filter), key=lambda f: f.path):
        try:
            for rb in data.read_piece(Piece(frag.path, 0, frag)):
                report["rows"] += rb.num_rows
                for c in data.columns:
                    report["nulls"][c] += rb.column(c).null_count
                _count_domains(schema, rb, report)
                for p in find_problems(schema, rb):
                    for f in schema.sparse:
                        if p.kind == "range" and f.column == p.column and f.policy == "index":
                            report["out_of_range"][f.name] += p.count
                    q = found.setdefault(
                        (frag.path, p.column, p.kind), replace(p, count=0, examples=[])
                    )
                    q.count += p.count
                    q.examples = list(dict.fromkeys(q.examples + p.examples))[:3]
        except LogReadError as e:
            report["errors"].append(str(e))
    found = {k: p for k, p in found.items() if p.kind != "missing"}  # reported once, above
    report["errors"] += [p.message(path) for (path, _, _), p in found.items()]
    if report["rows"] == 0 and not report["errors"]:
        report["errors"].append(f"{uri}: empty dataset (no rows after the filters)")
    for d in report["domains"].values():
        d["positive_rate"] = d.pop("positives") / max(d["rows"], 1)
    return report


def _count_domains(schema: Schema, rb: pa.RecordBatch, report: dict) -> None:
    """Add per-domain rows/positives and unknown domain values of ``rb`` to ``report``."""
    if schema.domain.column not in rb.schema.names or schema.label not in rb.schema.names:
        return
    dom = rb.column(schema.domain.column).cast(pa.string())
    ids = pc.index_in(dom, value_set=pa.array(schema.domain.values))
    try:
        pos = pc.fill_null(pc.equal(rb.column(schema.label).cast(pa.float64()), 1.0), False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # wrong label type, reported elsewhere
        pos = pa.array(np.zeros(rb.num_rows, bool))
    known = ids.is_valid()
    i, pos = ids.drop_null().to_numpy(), pos.filter(known).to_numpy(zero_copy_only=False)
    counts = np.bincount(i, minlength=len(schema.domain.values))
    positives = np.bincount(i, pos, minlength=len(schema.domain.values))
    for name, n, p in zip(schema.domain.values, counts, positives, strict=True):
        report["domains"][name]["rows"] += int(n)
        report["domains"][name]["positives"] += int(p)
    unseen = report["unseen_domains"]
    for item in pc.value_counts(dom.filter(pc.invert(known)).drop_null()).to_pylist():
        unseen[item["values"]] = unseen.get(item["values"], 0) + item["counts"]
