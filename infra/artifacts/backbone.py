"""Published backbones: the typed manifest, publishing a checkpoint, and opening a version.

A backbone version is a pretraining checkpoint directory (this run's DCP shards, ``Setup.save``)
plus the schema, the run config and the metrics it was trained with (file names in
:mod:`.layout`), sealed by a :class:`BackboneManifest`. Opening one checks every file against
the manifest (:meth:`Registry.fetch`) and the schema against the manifest's pin.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import mdlora
from mdlora.atomic import write_json
from mdlora.config import from_dict, to_dict
from mdlora.embeddings.schema import Schema
from mdlora.infra.artifacts.bundle import BackboneRef
from mdlora.infra.artifacts.layout import (
    BACKBONE_CONFIG,
    BACKBONE_METRICS,
    BACKBONE_SCHEMA,
    BACKBONES,
    MANIFEST,
)
from mdlora.infra.artifacts.registry import Registry
from mdlora.infra.artifacts.sealed import ArtifactError, read_manifest, seal, typed_manifest
from mdlora.infra.storage import open_fs
from mdlora.trainer.config import RunConfig
from mdlora.trainer.recipes import STATE_FILE

log = logging.getLogger("mdlora.artifacts")
FORMAT_VERSION = 1


class BackboneError(ArtifactError):
    """A backbone version is incomplete, corrupt, too new, or inconsistent with its pins."""


@dataclass(kw_only=True)
class BackboneManifest:
    """What a published backbone version says about itself."""

    format_version: int = FORMAT_VERSION
    """Backbone layout version; readers refuse newer ones."""
    kind: Literal["backbone"] = "backbone"
    """Artefact kind."""
    name: str
    """Backbone (model) name in the registry."""
    version: str = ""
    """Registry version ``vNNNN``; empty until :meth:`Registry.publish` allocates one."""
    schema_hash: str
    """``Schema.content_hash()`` of the schema it was trained with."""
    step: int
    """Optimiser steps trained."""
    code_version: str = mdlora.__version__
    """``mdlora.__version__`` of the writer."""
    data_window: str = ""
    """``data.window`` it was trained on ('' for all rows)."""
    run: str = ""
    """The named run that published it ('' for an unnamed ``pretrain``)."""
    created_at: str = ""
    """UTC ISO 8601 creation time."""
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    """``{file name: sha256}``."""
    content_hash: str = ""
    """Tree hash over ``files``: the identity adapters pin."""

    def __post_init__(self) -> None:
        if self.kind != "backbone":
            raise ValueError(f"kind: expected 'backbone', got {self.kind!r}")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(f"format_version: {self.format_version} is newer than this mdlora "
                             f"({mdlora.__version__}) reads ({FORMAT_VERSION}); upgrade mdlora")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "manifest") -> BackboneManifest:
        """Build from ``manifest.json``: unknown keys warn, missing required keys fail.

        Raises:
            BackboneError: a required key is missing, a value has the wrong type, or the format
                is newer than this code reads (the message names ``source`` and the key).
        """
        return typed_manifest(cls, data, source, BackboneError)


@dataclass
class BackboneInfo:
    """A published backbone as adapters and scorers see it (weights stay on disk)."""

    name: str
    version: str
    path: Path
    """Local directory of the version (fetched and checked when the registry is on S3)."""
    manifest: BackboneManifest
    schema: Schema
    run: RunConfig
    """The config it was pretrained with (model architecture)."""

    @property
    def content_hash(self) -> str:
        """The identity adapters pin."""
        return self.manifest.content_hash

    def ref(self) -> BackboneRef:
        """The bundle manifest's backbone reference."""
        return BackboneRef(name=self.name, version=self.version, content_hash=self.content_hash)


def backbone_manifest(registry: Registry, model: str, ref: str) -> BackboneManifest:
    """The typed manifest of ``backbones/<model>/<ref>`` (nothing downloaded but the manifest)."""
    return BackboneManifest.from_dict(registry.manifest(BACKBONES, model, ref),
                                      source=f"{BACKBONES}/{model} {ref}")


def open_backbone(root: str, model: str, ref: str, cache: str | Path) -> BackboneInfo:
    """Resolve ``backbones/<model>/<ref>`` at registry ``root`` to a local, checked copy.

    Raises:
        RegistryError: no such version, or a file does not match its sha256.
        BackboneError: the manifest is invalid or the schema is not the one it pins.
    """
    registry = Registry(*open_fs(root))
    version = Path(registry.resolve(BACKBONES, model, ref)).name  # once: an alias may move meanwhile
    path = registry.fetch(BACKBONES, model, version, cache)  # every file checked against its sha256
    manifest = BackboneManifest.from_dict(read_manifest(str(path)), source=str(path / MANIFEST))
    schema = Schema.load(path / BACKBONE_SCHEMA)
    if schema.content_hash() != manifest.schema_hash:
        raise BackboneError(f"{path}: {BACKBONE_SCHEMA} hashes to {schema.content_hash()[:12]}, the manifest "
                            f"pins {manifest.schema_hash[:12]}")
    run = from_dict(RunConfig, json.loads((path / BACKBONE_CONFIG).read_text()))
    return BackboneInfo(model, version, Path(path), manifest, schema, run)


def publish_backbone(cfg: RunConfig, schema: Schema, checkpoint: Path, run: str = "") -> dict:
    """Publish a pretraining checkpoint dir as ``backbones/<output.model>/vNNNN`` (manifest written
    last); the first version of a model is promoted to production at once.

    Args:
        cfg: the run's config (``output.root``, ``output.model``; stored as the config).
        schema: the schema it trained with.
        checkpoint: the checkpoint directory (``Setup.save``); files are added to it.
        run: the run's name, recorded for :func:`find_backbone`.

    Returns:
        ``{"name", "version", "path", "content_hash", "metrics", "step"}``.
    """
    state = json.loads((checkpoint / STATE_FILE).read_text())
    schema.dump(checkpoint / BACKBONE_SCHEMA)
    write_json(checkpoint / BACKBONE_CONFIG, to_dict(cfg))
    metrics = state["history"][-1] if state["history"] else {}
    write_json(checkpoint / BACKBONE_METRICS, {"final": metrics, "best_wauc": state["best_wauc"],
                                                "best_step": state["best_step"], "history": state["history"]})
    manifest = BackboneManifest(
        name=cfg.output.model, schema_hash=schema.content_hash(), data_window=cfg.data.window,
        step=state["step"], run=run, created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    sealed = seal(checkpoint, {k: v for k, v in to_dict(manifest).items() if k not in ("files", "content_hash")})
    model = cfg.output.model
    registry = Registry(*open_fs(cfg.output.root))
    version = registry.publish(BACKBONES, model, checkpoint)
    if "production" not in registry.aliases(BACKBONES, model):
        registry.promote(BACKBONES, model, version)  # the first version serves at once
    path = registry.resolve(BACKBONES, model, version)
    log.info("published backbone %s %s (content hash %s) at %s", model, version, sealed["content_hash"][:12], path)
    return {"name": model, "version": version, "path": path, "content_hash": sealed["content_hash"],
            "metrics": metrics, "step": state["step"]}


def find_backbone(root: str, model: str, run: str) -> dict | None:
    """The summary (as :func:`publish_backbone` returns it) of the backbone published by the run
    named ``run``, or None: a job that died after publishing, rerun, takes it instead of training
    and publishing a second version."""
    registry = Registry(*open_fs(root))
    version = registry.find(BACKBONES, model, "run", run) if run else None
    if version is None:
        return None
    manifest = backbone_manifest(registry, model, version)
    metrics = json.loads(registry.read_text(BACKBONES, model, version, BACKBONE_METRICS))
    log.info("backbone %s %s was already published by run %s: reusing it", model, version, run)
    return {"name": model, "version": version, "path": registry.resolve(BACKBONES, model, version),
            "content_hash": manifest.content_hash, "metrics": metrics["final"], "step": manifest.step}
