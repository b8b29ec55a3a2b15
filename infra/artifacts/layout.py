"""The on-disk names of what mdlora publishes: the one place they are spelled.

Registry (local directory or ``s3://`` prefix)::

    <root>/<kind>/<name>/aliases.json              aliases + promotion history
    <root>/<kind>/<name>/vNNNN/.reservation        claims the version number
    <root>/<kind>/<name>/vNNNN/manifest.json       written last; lists every file's sha256

A backbone version (``kind = backbones``) is a pretraining checkpoint (DCP shards, written by
:mod:`mdlora.embeddings.checkpoint`) plus ``schema.yaml``, ``config.json`` and ``metrics.json``.
An adapter bundle (``kind = adapters``) is one ``adapter.safetensors``: the domain's own
tensors under their module keys, and the tensors every domain of the run shares (MultiLoRA's
auxiliary LoRAs) under ``shared.``-prefixed keys. Readers go through
:mod:`mdlora.infra.artifacts`; nothing else names these files or the prefix.
"""

ADAPTERS, BACKBONES = "adapters", "backbones"
KINDS = (ADAPTERS, BACKBONES)
"""Registry kinds (the first path component under the root)."""

MANIFEST = "manifest.json"
ALIASES = "aliases.json"
RESERVATION = ".reservation"

ADAPTER_WEIGHTS = "adapter.safetensors"
SHARED_PREFIX = "shared."
"""Key prefix of the tensors a bundle shares with the other bundles of its run."""

BACKBONE_SCHEMA = "schema.yaml"
BACKBONE_CONFIG = "config.json"
BACKBONE_METRICS = "metrics.json"
