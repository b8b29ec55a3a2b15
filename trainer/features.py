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
from collections.abc import Iterable
from dataclasses import dataclass

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

    def select(self, index: Tensor) -> Features:
        """Rows picked by a bool mask or an index tensor."""
        return Features(*(t[index] for t in self.tensors()))

    def wide(self, spec: WideSpec | None, rows: slice | Tensor = slice(None)) -> tuple[Tensor, Tensor] | None:
        """The wide adapter's inputs of ``rows``: ids [B, S] and the dense block [B, N] (the last
        N columns of x); None without a wide adapter."""
        if not spec:
            return None
        return self.ids[rows], self.x[rows, self.x.shape[1] - spec.num_dense:]

    def of_domain(self, domain_id: int) -> Features:
        """The rows of one domain."""
        return self.select(self.domains == domain_id)

    @staticmethod
    def cat(parts: list[Features], width: int, aux: int) -> Features:
        """Concatenate row-wise; an empty list gives 0 rows of ``[0, width]`` / ``[0, aux]``."""
        if not parts:
            return Features(torch.zeros(0, width), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                            torch.zeros(0, aux, dtype=torch.long))
        return Features(*(torch.cat(t) for t in zip(*(p.tensors() for p in parts), strict=True)))

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(x, labels, domains, aux, ids)``."""
        return self.x, self.labels, self.domains, self.aux, self.ids

    def split(self, seed: int, validation: float = 0.1) -> dict[str, Features]:
        """Seeded random ``{"train", "validation"}`` partition; validation gets floor(N·share) rows."""
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        cut = len(self) - int(len(self) * validation)
        return {"train": self.select(perm[:cut]), "validation": self.select(perm[cut:])}


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


@torch.no_grad()
def predict(model: nn.Module, adapted: AdaptedModel | None, feats: Features,
            slots: Tensor | None = None, aux_col: int | None = None) -> Tensor:
    """Probabilities [N] of ``model`` on cached features, routed by ``slots`` [N] (eval mode)."""
    model.eval()
    out = []
    for lo in range(0, len(feats), EVAL_ROWS):
        rows = slice(lo, lo + EVAL_ROWS)
        aux = None if aux_col is None else feats.aux[rows, aux_col]
        with adapted.routing(slots[rows], aux, feats.wide(adapted.wide, rows)) if adapted is not None \
                else contextlib.nullcontext():
            out.append(torch.sigmoid(model(feats.x[rows])))
    return torch.cat(out) if out else torch.zeros(0)
