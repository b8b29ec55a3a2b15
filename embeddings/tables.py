"""Schema tables -> TorchRec ``EmbeddingBagCollection`` (built on ``meta``; no process group).

Letters: B batch rows, F sparse features, D table dim.

The pooled output is a ``KeyedTensor`` whose keys are ordered **table by table (schema order),
features within a table in schema order** — not ``schema.feature_names`` order when features
sharing a table are not adjacent. Consumers index it by key (``kt[name]`` / ``kt.to_dict()``) or
use :func:`pooled_keys`.
"""

from __future__ import annotations

import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from mdlora.embeddings.schema import Schema


def build_ebc(schema: Schema, device: str | torch.device = "meta") -> EmbeddingBagCollection:
    """One sum-pooled bag per table of ``schema``.

    Args:
        schema: the feature schema (tables and the features that look them up).
        device: ``meta`` (default) allocates nothing, so a model of any size can be planned and
            then materialised shard by shard by ``DistributedModelParallel``; ``cpu`` gives a
            real, randomly initialised unsharded module.

    Returns:
        ``EmbeddingBagCollection`` whose forward maps a KJT (keys ``schema.feature_names``) to a
        ``KeyedTensor`` of shape [B, sum_f D_f] with keys :func:`pooled_keys`.

    Example::

        ebc = build_ebc(schema, device="cpu")
        kt = ebc(batch.sparse)          # kt.values(): [B, schema.pooled_dim()]
    """
    return EmbeddingBagCollection(
        tables=schema.embedding_bag_configs(), device=torch.device(device)
    )


def pooled_keys(schema: Schema) -> list[str]:
    """Feature names in the column order of the EBC's pooled ``KeyedTensor``."""
    return [f for cfg in schema.embedding_bag_configs() for f in cfg.feature_names]
