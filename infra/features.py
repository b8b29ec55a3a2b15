"""The feature cache of an adapter run: the frozen backbone's output of every row, on storage.

Written by the materialisation's Ray Train ranks into their checkpoint (``output.run_dir``,
local, a shared file system or s3://), one file per (split, domain, source, rank)::

    features/<split>/<domain>/s<source>-rank<r>.safetensors   x [n, E] f32, labels, domains, aux, ids
    rows-rank<r>.json                                           {"<split>/<domain>/s<source>": n}
    head.safetensors                                            the frozen tower + output layer

The driver reads only the row counts (:func:`read_index`); an adapter task loads the rows of its
own domains (:meth:`FeatureCache.load`), so no row passes through the driver or the object store
and a task holds only its domains' rows. A domain's rows load source by source, rank by rank,
in the order the ranks embedded them (the order the in-memory path had).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load, save_file

from mdlora.atomic import write_json
from mdlora.infra.storage import open_fs
from mdlora.trainer.features import Features, Head

SPLITS = ("train", "validation", "test")
ALL = "all"
"""A source whose one dataset is divided 9:1 into train/validation per domain (``loop.seed``)."""
_KEYS = ("x", "labels", "domains", "aux", "ids")  # Features.tensors() order
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
        save_file(dict(zip(_KEYS, part.tensors(), strict=True)), str(path))
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
                parts = [Features(*(t[k] for k in _KEYS)) for t in (load(fs.cat_file(f"{root}/{f}")) for f in files)]
                feats = Features.cat(parts, self.width, self.aux)
                for s, f in (feats.split(seed) if split == ALL else {split: feats}).items():
                    out[s].append(f)
        held = {s for r in self.rows.values() for s in r} | {"train"}  # every task sees the same splits
        return {s: Features.cat(out[s], self.width, self.aux) for s in SPLITS if s in held}


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
