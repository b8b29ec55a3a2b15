"""Data of the quality harness: MovieLens (HAMUR protocol) or synthetic logs, held in memory.

Splits are Arrow tables converted to :class:`~mdlora.embeddings.batch.Batch` by the same
:class:`~mdlora.embeddings.batch.BatchConverter` the distributed jobs use. Training batches are a full
random permutation of the split per epoch (seeded by ``(seed, epoch)``): MovieLens rows are
sorted by user, and a streaming shuffle buffer would leave batches user-clustered.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch

from mdlora.embeddings.batch import Batch, BatchConverter
from mdlora.embeddings.schema import Schema
from mdlora.infra import movielens
from mdlora.infra.synth import generate

EVAL_ROWS = 65536
SPLITS = ("train", "validation", "test")
SYNTH = {"rows": 300_000, "domains": 5, "users": 20_000, "items": 20_000, "days": 1}
"""Default synthetic log (``mdlora gen-logs`` world): d00 ~45 % of rows, d04 ~1 % (very small)."""


class Split:
    """One split in memory: shuffled training batches or cached evaluation batches.

    Args:
        table: the split's rows.
        schema: the log schema.
    """

    def __init__(self, table: pa.Table, schema: Schema) -> None:
        self.table, self.schema = table, schema
        self.conv = BatchConverter(schema)
        self._eval: list[Batch] | None = None
        self.domains = torch.from_numpy(
            np.concatenate([b.domains.numpy() for b in self.eval_batches()])
            if len(self) else np.zeros(0, np.int64))

    def __len__(self) -> int:
        return self.table.num_rows

    def of_domain(self, domain_id: int) -> Split:
        """The rows of one domain (source order)."""
        return Split(self.table.filter(pa.array(self.domains.numpy() == domain_id)), self.schema)

    def steps(self, batch_size: int) -> int:
        """Batches per training epoch (the last one may be partial)."""
        return -(-len(self) // batch_size)

    def train_batches(self, batch_size: int, seed: int, epoch: int) -> Iterator[Batch]:
        """One epoch: a full permutation seeded by ``(seed, epoch)``, cut into batches."""
        perm = np.random.default_rng([seed, epoch]).permutation(len(self))
        shuffled = self.table.take(pa.array(perm))
        for lo in range(0, len(self), batch_size):
            yield self.conv.convert(shuffled.slice(lo, batch_size))

    def eval_batches(self) -> list[Batch]:
        """Large batches in source order (converted once, then cached)."""
        if self._eval is None:
            self._eval = [self.conv.convert(self.table.slice(lo, EVAL_ROWS))
                          for lo in range(0, len(self), EVAL_ROWS)]
        return self._eval

    def labels(self) -> torch.Tensor:
        """float32 [N] labels in source order."""
        return torch.cat([b.labels for b in self.eval_batches()])


@dataclass
class Data:
    """A multi-domain dataset: schema, splits, and where it came from."""

    schema: Schema
    splits: dict[str, Split]
    source: dict = field(default_factory=dict)
    """How the data was made (dataset, path, protocol, generator arguments)."""

    @property
    def domains(self) -> list[str]:
        """Domain vocabulary (ids index it)."""
        return self.schema.domain.values

    def sizes(self) -> dict[str, dict[str, int]]:
        """Rows per split and domain."""
        return {s: {d: int((sp.domains == k).sum()) for k, d in enumerate(self.domains)}
                for s, sp in self.splits.items()}


def load_movielens(path: str) -> Data:
    """MovieLens-1M/100K with the HAMUR protocol (``mdlora.infra.movielens.convert``, split seed 0)."""
    table, stats, schema = movielens.convert(path, seed=0)
    split = table["split"].to_numpy()
    body = table.drop_columns(["split"])
    splits = {s: Split(body.filter(pa.array(split == j)), schema) for j, s in enumerate(SPLITS)}
    return Data(schema, splits, {"dataset": schema.name, "path": str(path), "layout": stats["layout"],
                                 "protocol": "HAMUR: domains by age, label rating > 3, 8:1:1 random split (seed 0)"})


def load_synthetic(path: str, seed: int = 0, **gen_args) -> Data:
    """A ``gen-logs`` dataset at ``path``; generated there first when ``path`` has no schema.yaml.

    Args:
        path: gen-logs output directory (empty or absent to generate; "" for a temporary one).
        seed: generator seed (when generating).
        **gen_args: :func:`mdlora.infra.synth.generate` arguments overriding :data:`SYNTH`.

    Returns:
        The data (``source`` holds the generator arguments and truth.json's oracle AUCs).
    """
    root = Path(path or tempfile.mkdtemp(prefix="mdlora-quality-"))
    args = {**SYNTH, **gen_args, "seed": seed}
    if not (root / "schema.yaml").is_file():
        generate(str(root), **args)
    schema = Schema.load(root / "schema.yaml")
    splits = {}
    for s, d in zip(SPLITS, ("train", "val", "test"), strict=True):
        dset = pads.dataset(root / d, format="parquet", partitioning="hive")
        cols = [c for c in schema.columns() if c in dset.schema.names]
        splits[s] = Split(dset.to_table(columns=cols), schema)
    truth = _truth(root)
    return Data(schema, splits, {"dataset": "synthetic", "path": str(root), "generate": args,
                                 "oracle_auc": truth.get("oracle_auc"),
                                 "domains": {d: {k: v.get(k) for k in ("share", "shift_strength", "oracle_auc")}
                                             for d, v in truth.get("domains", {}).items()}})


def _truth(root: Path) -> dict:
    """The generator's truth.json (empty when absent)."""
    p = root / "truth.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def load(dataset: str, path: str, **gen_args) -> Data:
    """Dispatch on the ``--dataset`` name."""
    if dataset in ("movielens-1m", "movielens-100k"):
        data = load_movielens(path)
        if data.schema.name != dataset:
            raise ValueError(f"--path {path}: holds {data.schema.name}, not {dataset}")
        return data
    if dataset == "synthetic":
        return load_synthetic(path, **gen_args)
    raise ValueError(f"--dataset: unknown dataset {dataset!r} (movielens-1m, movielens-100k, synthetic)")
