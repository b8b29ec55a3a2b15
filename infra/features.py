"""The feature cache of an adapter run: the frozen backbone's output of every row, on storage.

Written by the materialisation's Ray Train ranks into their checkpoint (``output.run_dir``,
local, a shared file system or s3://), one file per (split, domain, source, rank)::

    features/<split>/<domain>/s<source>-rank<r>.safetensors   x [n, E] f32, labels, domains, aux, ids
    rows-rank<r>.json                                           {"<split>/<domain>/s<source>": n}
    head.safetensors                                            the frozen tower + output layer

The driver reads only the row counts (:func:`read_index`); an adapter task loads the rows of its
own domains (:meth:`FeatureCache.load`), so no row passes through the driver or the object store
and a task holds only its domains' rows. A domain's rows load source by source, rank by rank,
in the order the ranks embedded them (the order the in-memory path had). A task with more rows
than it may hold reads them a block at a time instead (:meth:`FeatureCache.stream`): a row range
of a local file is read without the rest (safetensors slices), and a task's files on s3 are
copied to a local directory first.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from fsspec import AbstractFileSystem
from safetensors import safe_open
from safetensors.torch import load, save_file
from torch import Tensor

from mdlora.atomic import write_json
from mdlora.infra.storage import is_s3, open_fs
from mdlora.trainer.features import Features, Head, validation_mask
from mdlora.trainer.rows import DomainBlocks

SPLITS = ("train", "validation", "test")
ALL = "all"
"""A source whose one dataset is divided 9:1 into train/validation per domain (``loop.seed``)."""
_HEAD = "head.safetensors"


def write_rank(directory: Path, source: int, split: str, feats: Features, vocab: list[str], rank: int,
               index: dict[str, int]) -> None:
    """Write this rank's ``feats`` of one source and split, one file per domain; counts into ``index``."""
    order = torch.argsort(feats.domains, stable=True)
    ids, counts = torch.unique_consecutive(feats.domains[order], return_counts=True)
    for d, rows in zip(ids.tolist(), torch.split(order, counts.tolist()), strict=True):
        part = feats.select(rows)
        path = directory / "features" / split / vocab[d] / f"s{source}-rank{rank:05d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(dict(zip(Features.keys(), part.tensors(), strict=True)), str(path))
        index[f"{split}/{vocab[d]}/s{source}"] = len(part)


def write_index(directory: Path, rank: int, index: dict[str, int], head: Head | None) -> None:
    """This rank's row counts (+ the frozen head, from rank 0)."""
    write_json(directory / f"rows-rank{rank:05d}.json", index)
    if head is not None:
        save_file(head.state_dict(), str(directory / _HEAD))


@dataclass
class FeatureCache:
    """Where a run's features are and how many rows each (domain, split) has; no rows."""

    uri: str
    """The materialisation checkpoint (local path or s3://)."""
    width: int
    """E, the width of x."""
    aux: int
    """A, the auxiliary divisions."""
    files: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    """``{domain: {split: [file, ...]}}`` in load order (split ``all`` for a 9:1 source)."""
    rows: dict[str, dict[str, int]] = field(default_factory=dict)
    """``{domain: {split: rows}}`` with ``all`` already divided into train/validation."""

    def count(self, split: str) -> int:
        """Rows of ``split`` over every domain."""
        return sum(r.get(split, 0) for r in self.rows.values())

    def head(self, head: Head) -> Head:
        """``head`` (built from the architecture) filled with the cached frozen weights."""
        fs, path = open_fs(self.uri)
        head.load_state_dict(load(fs.cat_file(f"{path}/{_HEAD}")))
        return head

    def load(self, domains: list[str], seed: int) -> dict[str, Features]:
        """The features of ``domains`` per split (domains in the given order; ``all`` divided 9:1
        per domain with ``seed``, as :meth:`Features.split` divides one dataset)."""
        fs, root = open_fs(self.uri)
        out: dict[str, list[Features]] = defaultdict(list)
        for d in domains:
            for split, files in self.files.get(d, {}).items():
                parts = [Features(**load(fs.cat_file(f"{root}/{f}"))) for f in files]
                feats = Features.cat(parts, self.width, self.aux)
                for s, f in (feats.split(seed) if split == ALL else {split: feats}).items():
                    out[s].append(f)
        return {s: Features.cat(out[s], self.width, self.aux) for s in self._splits()}

    def _splits(self) -> list[str]:
        """The splits any domain has (and ``train``): every task sees the same ones."""
        held = {s for r in self.rows.values() for s in r} | {"train"}
        return [s for s in SPLITS if s in held]

    def held_rows(self, domains: list[str]) -> int:
        """Rows of ``domains`` over every split: what :meth:`load` would hold."""
        return sum(sum(self.rows.get(d, {}).values()) for d in domains)

    def stream(self, domains: list[str], vocab: list[str], seed: int, block_rows: int,
               local: Path) -> dict[str, list[DomainBlocks]]:
        """The rows of ``domains`` per split as blocks of at most ``block_rows`` rows, each read
        when asked for (no row is read here). The same rows per (domain, split) as :meth:`load`
        (``all`` divided 9:1 by ``seed`` with the same draw), each split in file order.

        Args:
            domains: the task's domains.
            vocab: the domain vocabulary (a block's domain id is the name's index).
            seed: ``loop.seed``, which divides an ``all`` source.
            block_rows: rows per block (a block never spans two files).
            local: a directory for the task's files when the cache is on s3 (they are copied
                there first; a local cache is read in place). It must outlive the blocks.
        """
        fs, root = open_fs(self.uri)
        blocks: dict[str, dict[str, list[tuple[int, Callable[[], Features]]]]] = defaultdict(dict)
        for d in domains:
            for split, files in self.files.get(d, {}).items():
                paths = [self._local(fs, root, f, local) for f in files]
                sizes = [_rows(p) for p in paths]
                masks = {split: None} if split != ALL else _divide(sum(sizes), seed)
                for s, keep in masks.items():
                    blocks[s].setdefault(d, []).extend(_blocks(paths, sizes, block_rows, keep))
        return {s: [DomainBlocks(vocab.index(d), [n for n, _ in b], partial(_call, [r for _, r in b]))
                    for d, b in blocks[s].items()] for s in self._splits()}

    def _local(self, fs: AbstractFileSystem, root: str, file: str, local: Path) -> str:
        """A readable local path of the cache file ``file`` (copied from s3 into ``local``)."""
        if not is_s3(self.uri):
            return f"{root}/{file}"
        (local / file).parent.mkdir(parents=True, exist_ok=True)
        fs.get(f"{root}/{file}", str(local / file))
        return str(local / file)


def _divide(n: int, seed: int) -> dict[str, Tensor]:
    """An ``all`` source's rows as ``{"train", "validation"}`` masks [n] (:meth:`Features.split`'s draw)."""
    val = validation_mask(n, seed)
    return {"train": ~val, "validation": val}


def _rows(path: str) -> int:
    with safe_open(path, "pt") as f:
        return f.get_slice("labels").get_shape()[0]


def _blocks(paths: list[str], sizes: list[int], block_rows: int,
            keep: Tensor | None) -> list[tuple[int, Callable[[], Features]]]:
    """``(rows, read)`` per block of ``block_rows`` file rows (fewer where ``keep`` [sum sizes]
    drops some; blocks keeping no row are left out)."""
    out, start = [], 0
    for path, n in zip(paths, sizes, strict=True):
        for lo in range(0, n, block_rows):
            hi = min(lo + block_rows, n)
            mask = None if keep is None else keep[start + lo:start + hi]
            rows = hi - lo if mask is None else int(mask.sum())
            if rows:
                out.append((rows, partial(_read, path, lo, hi, mask)))
        start += n
    return out


def _read(path: str, lo: int, hi: int, keep: Tensor | None) -> Features:
    """Rows ``[lo, hi)`` of one cache file (only those bytes are read), those of ``keep`` [hi - lo].

    A slice is a view on the file's memory map: it is copied so that the map closes with the
    file (kept, the maps of every held block count in the task's RSS: +40 MB at 1.5M rows).
    """
    with safe_open(path, "pt") as f:
        feats = Features(*(f.get_slice(k)[lo:hi].clone() for k in Features.keys()))
    return feats if keep is None else feats.select(keep)


def _call(reads: list[Callable[[], Features]], i: int) -> Features:
    return reads[i]()


def read_index(uri: str, width: int, aux: int) -> FeatureCache:
    """The row counts and files the ranks wrote at ``uri`` (no feature is read)."""
    fs, root = open_fs(uri)
    counts: dict[tuple[str, str, int], dict[int, int]] = defaultdict(dict)
    for p in sorted(fs.glob(f"{root}/rows-rank*.json")):
        rank = int(p.rsplit("rank", 1)[1].split(".")[0])
        for key, n in json.loads(fs.cat_file(p)).items():
            split, domain, source = key.split("/")
            counts[(domain, split, int(source[1:]))][rank] = n
    cache = FeatureCache(uri, width, aux)
    for (domain, split, source), ranks in sorted(counts.items(), key=lambda kv: (kv[0][2], kv[0])):
        cache.files.setdefault(domain, {}).setdefault(split, []).extend(
            f"features/{split}/{domain}/s{source}-rank{r:05d}.safetensors" for r in sorted(ranks))
        n = sum(ranks.values())
        rows = cache.rows.setdefault(domain, {})
        if split == ALL:  # as Features.split: validation gets floor(n / 10)
            rows["train"], rows["validation"] = rows.get("train", 0) + n - n // 10, rows.get("validation", 0) + n // 10
        else:
            rows[split] = rows.get(split, 0) + n
    return cache
