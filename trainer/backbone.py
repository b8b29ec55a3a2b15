"""Backbone model math: pooled embeddings + dense features -> interaction tower -> one logit.

Letters: B batch rows, F sparse features, D embedding dim, N dense features,
E = sum_f D_f + N the width of the embedding-layer output, H the last hidden width.

The model is split at the embedding-layer output ``x = embed(sparse, dense)`` [B, E]:
everything after it (``head``) is a function of ``x`` alone, so adapter training can
materialise ``x`` once and train the tower on it. The column layout of ``x`` is fixed by the
schema (the unsharded EBC's key order), whatever the sharding plan. The embedding module is
passed in (an unsharded ``EmbeddingBagCollection`` or the one DistributedModelParallel
shards); this file knows nothing about how it is distributed.

Towers (``ModelConfig.tower``), all built from ``nn.Linear`` only, with readable names that
LoRA adapters target (``Backbone.tower_linear_names()``):

- ``mlp``: ``tower.mlp.{i}``, ReLU (+dropout) after each.
- ``dcnv2``: cross ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` (``tower.cross.{l}``, or
  ``tower.cross.{l}.down/up`` with ``W_l = U_l V_l`` when ``cross_rank > 0``) in parallel
  with ``tower.mlp``; output ``[x_L, mlp(x)]``.
- ``deepfm``: ``tower.mlp`` + first-order ``tower.first_order`` (Linear E->1) + FM
  second-order term over the F per-feature embeddings (no parameters).
- ``widedeep``: ``tower.mlp`` + wide ``tower.wide`` (Linear E->1).

``Backbone.out`` maps the tower output to the logit: an ``nn.Linear(H', 1)`` for mlp/dcnv2,
and an :class:`AdditiveOutput` for deepfm/widedeep, which adds the tower's extra logit
columns (FM, first-order, wide) to ``out.linear(deep)``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_modules import get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from mdlora.embeddings.schema import Schema
from mdlora.trainer.config import ModelConfig


def pooled_feature_dims(schema: Schema) -> tuple[list[str], list[int]]:
    """Pooled embedding keys and dims in the order an EBC built from ``schema`` outputs them.

    ``EmbeddingBagCollection(tables=schema.embedding_bag_configs())`` concatenates its pooled
    outputs table by table (schema table order), features in schema order within a table.
    That is generally not ``schema.feature_names`` order.

    Args:
        schema: the feature schema.

    Returns:
        ``(keys, dims)``: the KeyedTensor keys and the pooled dim D_f of each, both length F.
    """
    configs = schema.embedding_bag_configs()
    names = get_embedding_names_by_table(configs)
    keys = [k for table_keys in names for k in table_keys]
    dims = [
        c.embedding_dim for c, table_keys in zip(configs, names, strict=True) for _ in table_keys
    ]
    return keys, dims


def _init_linear(m: nn.Linear) -> None:
    """Xavier-uniform weights, zero bias (one rule for every Linear of the backbone)."""
    nn.init.xavier_uniform_(m.weight)
    if m.bias is not None:
        nn.init.zeros_(m.bias)


class MLP(nn.ModuleList):
    """Linear + ReLU (+dropout) stack; Linears are children ``0..L-1`` (``mlp.0``, ``mlp.1``).

    Args:
        in_features: input width E.
        hidden: output width of each layer; ``hidden[-1]`` is H.
        dropout: dropout probability after each ReLU.

    Example::

        mlp = MLP(12, [8, 4])
        h = mlp(torch.randn(3, 12))  # [3, 4]
    """

    def __init__(self, in_features: int, hidden: list[int], dropout: float = 0.0) -> None:
        widths = [in_features, *hidden]
        super().__init__(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.dropout = dropout
        self.out_features = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_features] -> [B, H]."""
        for layer in self:
            x = F.dropout(F.relu(layer(x)), self.dropout, self.training)
        return x


class MLPTower(nn.Module):
    """Plain deep tower: ``h = mlp(x)``.

    Args:
        in_features: E.
        config: model config (``hidden``, ``dropout``).

    Example::

        tower = MLPTower(12, ModelConfig(tower="mlp", hidden=[8, 4]))
        h = tower(torch.randn(3, 12))  # [3, 4]; Backbone.out = Linear(4, 1)
    """

    extra_logits = 0

    def __init__(self, in_features: int, config: ModelConfig) -> None:
        super().__init__()
        self.mlp = MLP(in_features, config.hidden, config.dropout)
        self.out_features = self.mlp.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, E] -> [B, H]."""
        return self.mlp(x)


class DCNv2Tower(nn.Module):
    """DCN-v2 (Wang et al. 2021), parallel form: cross network beside a deep MLP.

    ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` for l < L (``cross_layers``), W_l [E, E] full
    rank, or ``W_l = U_l V_l`` with V_l [r, E], U_l [E, r] when ``cross_rank`` r > 0.
    Output ``[x_L, mlp(x_0)]`` [B, E + H].

    Args:
        in_features: E.
        config: model config (``hidden``, ``dropout``, ``cross_layers``, ``cross_rank``).

    Example::

        cfg = ModelConfig(tower="dcnv2", hidden=[8], cross_layers=2, cross_rank=3)
        tower = DCNv2Tower(12, cfg)  # Linears tower.cross.{0,1}.down/up, tower.mlp.0
        h = tower(torch.randn(3, 12))  # [3, 12 + 8]
    """

    extra_logits = 0

    def __init__(self, in_features: int, config: ModelConfig) -> None:
        super().__init__()
        e, r = in_features, config.cross_rank

        def cross_layer() -> nn.Module:
            if r == 0:
                return nn.Linear(e, e)
            return nn.Sequential(OrderedDict(down=nn.Linear(e, r, bias=False), up=nn.Linear(r, e)))

        self.cross = nn.ModuleList(cross_layer() for _ in range(config.cross_layers))
        self.mlp = MLP(e, config.hidden, config.dropout)
        self.out_features = e + self.mlp.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, E] -> [B, E + H]."""
        xl = x
        for layer in self.cross:
            xl = x * layer(xl) + xl  # [B, E]
        return torch.cat([xl, self.mlp(x)], dim=1)


class DeepFMTower(nn.Module):
    """DeepFM (Guo et al. 2017): deep MLP, first-order linear term and FM second-order term.

    With v_f = x[:, f*D:(f+1)*D] the F pooled embeddings (equal D required),
    ``fm = 1/2 * sum_d ((sum_f v_f)^2 - sum_f v_f^2)`` [B, 1]; ``first = w^T x + b`` [B, 1].
    Dense features enter the first-order and deep terms, not the FM term.
    Output ``[mlp(x), first, fm]`` [B, H + 2]; ``Backbone.out`` adds the last two columns to
    the deep logit.

    Args:
        in_features: E.
        config: model config (``hidden``, ``dropout``).
        num_features: F.
        dim: D of every feature.

    Example::

        tower = DeepFMTower(12, ModelConfig(tower="deepfm", hidden=[8]), num_features=2, dim=4)
        h = tower(torch.randn(3, 12))  # [3, 8 + 2]; x[:, 8:] are 4 dense features
    """

    extra_logits = 2

    def __init__(
        self, in_features: int, config: ModelConfig, *, num_features: int, dim: int
    ) -> None:
        super().__init__()
        self.num_features, self.dim = num_features, dim
        self.mlp = MLP(in_features, config.hidden, config.dropout)
        self.first_order = nn.Linear(in_features, 1)
        self.out_features = self.mlp.out_features + 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, E] -> [B, H + 2]."""
        v = x[:, : self.num_features * self.dim].reshape(
            -1, self.num_features, self.dim
        )  # [B, F, D]
        fm = 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(1, keepdim=True)  # [B, 1]
        return torch.cat([self.mlp(x), self.first_order(x), fm], dim=1)


class WideDeepTower(nn.Module):
    """Wide & Deep (Cheng et al. 2016): ``wide = w^T x + b`` beside a deep MLP.

    Output ``[mlp(x), wide]`` [B, H + 1]; ``Backbone.out`` adds ``wide`` to the deep logit.

    Args:
        in_features: E.
        config: model config (``hidden``, ``dropout``).

    Example::

        tower = WideDeepTower(12, ModelConfig(tower="widedeep", hidden=[8]))
        h = tower(torch.randn(3, 12))  # [3, 8 + 1]
    """

    extra_logits = 1

    def __init__(self, in_features: int, config: ModelConfig) -> None:
        super().__init__()
        self.mlp = MLP(in_features, config.hidden, config.dropout)
        self.wide = nn.Linear(in_features, 1)
        self.out_features = self.mlp.out_features + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, E] -> [B, H + 1]."""
        return torch.cat([self.mlp(x), self.wide(x)], dim=1)


class AdditiveOutput(nn.Module):
    """Combination layer: ``logit = linear(z[:, :H]) + sum(z[:, H:])`` [B, 1].

    Args:
        in_features: H, the deep width; the remaining columns of ``z`` are logits to add.
    """

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.linear = nn.Linear(in_features, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """[B, H + k] -> [B, 1]."""
        h = self.in_features
        return self.linear(z[:, :h]) + z[:, h:].sum(1, keepdim=True)


class Backbone(nn.Module):
    """Embeddings -> ``x`` [B, E] -> tower -> logit [B].

    Args:
        embeddings: module mapping a KJT to a KeyedTensor of pooled embeddings
            (``EmbeddingBagCollection``, possibly sharded by DMP).
        feature_keys: pooled embedding keys in the layout of ``x`` (the unsharded EBC's key
            order, :func:`pooled_feature_dims`). A sharded EBC outputs its keys grouped by
            shard; ``embed`` permutes them back, so ``x`` does not depend on the sharding plan.
        embedding_dims: pooled dim D_f of each key.
        num_dense: N.
        config: model config.

    Raises:
        ValueError: ``deepfm`` with unequal embedding dims; no keys, or keys and dims differ
            in length.

    Example::

        schema = Schema.from_dict(...)
        ebc = EmbeddingBagCollection(tables=schema.embedding_bag_configs())
        model = build_backbone(schema, ModelConfig(tower="dcnv2"), ebc)
        logits = model(batch.sparse, batch.dense)  # [B]
        assert torch.equal(logits, model.head(model.embed(batch.sparse, batch.dense)))
    """

    def __init__(
        self,
        embeddings: nn.Module,
        *,
        feature_keys: list[str],
        embedding_dims: list[int],
        num_dense: int,
        config: ModelConfig,
    ) -> None:
        super().__init__()
        if not embedding_dims or len(feature_keys) != len(embedding_dims):
            raise ValueError(
                f"feature_keys {feature_keys} / embedding_dims {embedding_dims}: "
                "need one dim per key and at least one key"
            )
        self.embeddings = embeddings
        self.feature_keys = list(feature_keys)
        self.embedding_dims = list(embedding_dims)
        self.num_dense = num_dense
        self.input_dim = sum(self.embedding_dims) + num_dense  # E
        e = self.input_dim
        if config.tower == "mlp":
            self.tower = MLPTower(e, config)
        elif config.tower == "dcnv2":
            self.tower = DCNv2Tower(e, config)
        elif config.tower == "deepfm":
            if len(set(self.embedding_dims)) != 1:
                raise ValueError(
                    f"model.tower: deepfm needs equal embedding dims for the FM term, "
                    f"got per-feature dims {self.embedding_dims}"
                )
            self.tower = DeepFMTower(
                e, config, num_features=len(self.embedding_dims), dim=self.embedding_dims[0]
            )
        elif config.tower == "widedeep":
            self.tower = WideDeepTower(e, config)
        else:
            raise ValueError(f"model.tower: unknown tower {config.tower!r}")
        extra = self.tower.extra_logits
        self.out = (
            AdditiveOutput(self.tower.out_features - extra)
            if extra
            else nn.Linear(self.tower.out_features, 1)
        )
        for m in [*self.tower.modules(), *self.out.modules()]:
            if isinstance(m, nn.Linear):
                _init_linear(m)

    def tower_linear_names(self) -> list[str]:
        """Qualified names of the tower's Linear layers (LoRA targets), e.g. ``tower.mlp.0``."""
        return [f"tower.{n}" for n, m in self.tower.named_modules() if isinstance(m, nn.Linear)]

    def embed(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        """The embedding-layer output ``x = [pooled embeddings, dense]``.

        Args:
            sparse: KJT with every feature of the embedding module (any key order), B rows.
            dense: [B, N] float dense features.

        Returns:
            [B, E]: pooled embeddings in ``feature_keys`` order, then the N dense columns.

        Raises:
            ValueError: the pooled keys/dims or the dense width differ from the constructor's.
        """
        kt = self.embeddings(sparse)
        got = dict(zip(kt.keys(), kt.length_per_key(), strict=True))
        expected = dict(zip(self.feature_keys, self.embedding_dims, strict=True))
        if got != expected:
            raise ValueError(f"embeddings: pooled dims {got} != expected {expected}")
        if dense.dim() != 2 or dense.shape[1] != self.num_dense:
            raise ValueError(f"dense: expected [B, {self.num_dense}], got {list(dense.shape)}")
        if kt.keys() == self.feature_keys:
            pooled = kt.values()  # [B, sum D]
        else:  # sharded EBCs group keys by shard: restore the canonical layout
            pooled = KeyedTensor.regroup([kt], [self.feature_keys])[0]
        return torch.cat([pooled, dense], dim=1)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the embedding-layer output: [B, E] -> [B]."""
        return self.out(self.tower(x)).squeeze(1)

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        """``head(embed(sparse, dense))``: logits [B]."""
        return self.head(self.embed(sparse, dense))


def build_backbone(schema: Schema, model_cfg: ModelConfig, embeddings: nn.Module) -> Backbone:
    """A :class:`Backbone` whose dims come from ``schema``.

    Args:
        schema: the schema the embedding module was built from.
        model_cfg: model config.
        embeddings: ``EmbeddingBagCollection(tables=schema.embedding_bag_configs())`` or its
            sharded / meta-device form.

    Returns:
        The backbone (tower and output initialised from the current torch RNG state).
    """
    keys, dims = pooled_feature_dims(schema)
    return Backbone(
        embeddings,
        feature_keys=keys,
        embedding_dims=dims,
        num_dense=len(schema.dense),
        config=model_cfg,
    )
