"""The frozen backbone's cached embedding-layer output and the frozen head that consumes it.

Letters: N rows, E width of the embedding-layer output ``x`` (:meth:`Backbone.embed`), A auxiliary
divisions.

Why a cache is exact: the backbone is frozen, so ``x = embed(sparse, dense)`` of a row never
changes during adaptation. :func:`materialise` computes it once (no grad; on sharded tables each
rank embeds its own rows), and adapters then train on :class:`Head` — a frozen copy of the tower
and output layer, ``logit = out(tower(x))`` — with per-domain LoRA injected into its Linears.
Embeddings get no gradients and no optimiser state, and a step costs only the small head.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Protocol

import torch
from torch import Tensor, nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mdlora.adapters.config import LoraConfig
from mdlora.adapters.inject import AdaptedModel
from mdlora.adapters.wide import WideSpec
from mdlora.embeddings.batch import Batch
from mdlora.embeddings.schema import Schema
from mdlora.trainer.backbone import Backbone

EVAL_ROWS = 65536
WIDE_BAG = 16
"""Bag slots a wide adapter reads of a multi-valued feature without ``max_len`` (the first ones)."""


def wide_spec(schema: Schema, lora: LoraConfig) -> WideSpec:
    """The features ``lora.wide`` names, as the wide adapter reads them (empty: none).

    Raises:
        ValueError: a name is neither a sparse nor a dense feature of ``schema``.
    """
    sparse, dense = schema.feature_names, schema.dense_names
    names = sparse + dense if lora.wide == ["*"] else lora.wide
    bad = [n for n in names if n not in sparse and n not in dense]
    if bad:
        raise ValueError(f"lora.wide: {bad[0]!r} is not a feature of schema {schema.name!r} "
                         f"(sparse {sparse}, dense {dense})")
    feats = {f.name: f for f in schema.sparse}
    return WideSpec(
        sparse=tuple((n, min(lora.wide_buckets, schema.table(feats[n].table).num_embeddings),
                      (feats[n].max_len or WIDE_BAG) if feats[n].multi else 1) for n in names if n in sparse),
        dense=tuple((n, dense.index(n)) for n in names if n in dense), num_dense=len(dense))


def wide_ids(spec: WideSpec, sparse: KeyedJaggedTensor) -> Tensor:
    """The rows' ids of the wide adapter's sparse features: int64 [B, S], each bag padded with -1."""
    rows = sparse.stride()
    if not spec.sparse:
        return torch.zeros(rows, 0, dtype=torch.long)
    return torch.cat([sparse[name].to_padded_dense(length, padding_value=-1).long()
                      for name, _, length in spec.sparse], dim=1)


@dataclass
class Features:
    """Cached embedding-layer output of N rows.

    Attributes:
        x: float32 [N, E] = ``Backbone.embed(sparse, dense)``.
        labels: float32 [N].
        domains: int64 [N] ids into the schema's domain vocabulary.
        aux: int64 [N, A] auxiliary division ids.
        ids: int64 [N, S] the ids a wide adapter reads (:func:`wide_ids`; S = 0 without one).
    """

    x: Tensor
    labels: Tensor
    domains: Tensor
    aux: Tensor
    ids: Tensor | None = None

    def __post_init__(self) -> None:
        if self.ids is None:
            self.ids = torch.zeros(len(self.labels), 0, dtype=torch.long)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The per-row tensors' names, in :meth:`tensors` order (the cache's file keys)."""
        return tuple(f.name for f in fields(cls))

    def select(self, index: Tensor) -> Features:
        """Rows picked by a bool mask or an index tensor."""
        return Features(*(t[index] for t in self.tensors()))

    def wide(self, spec: WideSpec | None, rows: slice | Tensor = slice(None)) -> tuple[Tensor, Tensor] | None:
        """The wide adapter's inputs of ``rows``: ids [B, S] and the dense block [B, N] (the last
        N columns of x); None without a wide adapter."""
        if not spec:
            return None
        return self.ids[rows], self.x[rows, self.x.shape[1] - spec.num_dense:]

    def where(self, keep: Tensor) -> Features:
        """The rows where ``keep`` [N] (bool) is True, in order (as a streamed split's ``where``)."""
        return self.select(keep)

    def chunks(self, rows: int = EVAL_ROWS) -> Iterator[Features]:
        """Consecutive slices of ``rows`` rows (how evaluation walks any split, held or streamed)."""
        for lo in range(0, len(self), rows):
            yield Features(*(t[lo:lo + rows] for t in self.tensors()))

    def of_domain(self, domain_id: int) -> Features:
        """The rows of one domain."""
        return self.select(self.domains == domain_id)

    @staticmethod
    def cat(parts: list[Features], width: int = 0, aux: int = 0) -> Features:
        """Concatenate row-wise; an empty list gives 0 rows of ``[0, width]`` / ``[0, aux]``."""
        if not parts:
            return Features(torch.zeros(0, width), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                            torch.zeros(0, aux, dtype=torch.long))
        return Features(*(torch.cat(t) for t in zip(*(p.tensors() for p in parts), strict=True)))

    def tensors(self) -> tuple[Tensor, ...]:
        """The per-row tensors in :meth:`keys` order: ``(x, labels, domains, aux, ids)``."""
        return tuple(getattr(self, k) for k in self.keys())

    def split(self, seed: int, validation: float = 0.1) -> dict[str, Features]:
        """Seeded random ``{"train", "validation"}`` partition; validation gets floor(N·share) rows."""
        perm = _split_perm(len(self), seed)
        cut = len(self) - int(len(self) * validation)
        return {"train": self.select(perm[:cut]), "validation": self.select(perm[cut:])}


def _split_perm(n: int, seed: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def validation_mask(n: int, seed: int, validation: float = 0.1) -> Tensor:
    """bool [n]: the rows :meth:`Features.split` puts in validation (the same draw), for a
    dataset that is divided as it is read rather than held."""
    keep = torch.zeros(n, dtype=torch.bool)
    keep[_split_perm(n, seed)[n - int(n * validation):]] = True
    return keep


class Rows(Protocol):
    """Rows of one split that evaluation walks in order, a bounded chunk at a time: held
    (:class:`Features`) or read from storage (:class:`mdlora.trainer.stream.StreamedRows`)."""

    labels: Tensor
    """float32 [N]."""
    domains: Tensor
    """int64 [N]."""

    def __len__(self) -> int: ...

    def chunks(self) -> Iterator[Features]:
        """The rows in order, as consecutive :class:`Features`."""
        ...

    def where(self, keep: Tensor) -> Rows:
        """The rows where ``keep`` [N] (bool) is True, in order."""
        ...


@torch.no_grad()
def materialise(backbone: Backbone, batches: Iterable[Batch], wide: WideSpec | None = None) -> Features:
    """Embed every batch once with the frozen embedding layer.

    Args:
        backbone: the backbone (unsharded, or the inner module of a DMP: its sharded EBC runs the
            all-to-all, so every rank passes the same number of batches; it takes 0-row batches,
            which an unsharded EBC rejects).
        batches: this rank's batches.
        wide: the features of a wide adapter, whose ids are kept beside ``x``.

    Returns:
        Their :class:`Features`, rows in batch order.
    """
    parts = [Features(backbone.embed(b.sparse, b.dense).float().cpu(), b.labels.cpu(), b.domains.cpu(),
                      b.aux.cpu(), wide_ids(wide, b.sparse.to(torch.device("cpu"))) if wide else None)
             for b in batches]
    return Features.cat(parts, backbone.input_dim, 0 if not parts else parts[0].aux.shape[1])


class Head(nn.Module):
    """What the backbone computes after ``x``: ``logit = out(tower(x))`` [B] (frozen copies).

    Args:
        tower: the backbone's ``tower`` (copied).
        out: the backbone's ``out`` (copied).
    """

    def __init__(self, tower: nn.Module, out: nn.Module) -> None:
        super().__init__()
        self.tower, self.out = copy.deepcopy(tower), copy.deepcopy(out)
        self.requires_grad_(False)

    @classmethod
    def of(cls, backbone: Backbone) -> Head:
        """The frozen head of ``backbone`` (its tower and output layer, copied)."""
        return cls(backbone.tower, backbone.out)

    def forward(self, x: Tensor) -> Tensor:
        """[B, E] -> logits [B]."""
        return self.out(self.tower(x)).squeeze(1)

    def param_count(self) -> int:
        """Dense backbone parameters (tower + output): the denominator of ``param_share``."""
        return sum(p.numel() for p in self.parameters())


def forward(model: nn.Module, adapted: AdaptedModel | None, batch: Features, slots: Tensor | None = None,
            aux_col: int | None = None) -> Tensor:
    """Logits [B] of ``model`` on one batch, routed by ``slots`` [B] into ``adapted``'s domains
    (and by the batch's aux column ``aux_col`` for MultiLoRA). Every adapter training step and
    evaluation calls the model through here: what a batch feeds the model is decided once."""
    aux = None if aux_col is None else batch.aux[:, aux_col]
    with adapted.routing(slots, aux, batch.wide(adapted.wide)) if adapted is not None else contextlib.nullcontext():
        return model(batch.x)


@torch.no_grad()
def predict(model: nn.Module, adapted: AdaptedModel | None, rows: Features | Rows,
            slots: Tensor | None = None, aux_col: int | None = None) -> Tensor:
    """Probabilities [N] of ``model`` on cached features, held or streamed, routed by ``slots``
    [N] (eval mode; one chunk of rows at a time)."""
    model.eval()
    out, lo = [], 0
    for chunk in rows.chunks():
        out.append(torch.sigmoid(forward(model, adapted, chunk, None if slots is None else slots[lo:lo + len(chunk)],
                                         aux_col)))
        lo += len(chunk)
    return torch.cat(out) if out else torch.zeros(0)
