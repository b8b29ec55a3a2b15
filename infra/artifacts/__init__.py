"""What mdlora publishes, and the only way to read or write it.

* :class:`Registry` — versioned artefacts of any kind (``backbones``, ``adapters``) on a local
  directory or S3, with aliases (``production``, ``latest``), promotion and rollback.
* Backbones — :class:`BackboneManifest`, :func:`publish_backbone`, :func:`open_backbone`
  (a checked local copy with its schema and run config), :func:`find_backbone`.
* Adapter bundles — :class:`BundleManifest`, :func:`write_bundle`, :func:`load_bundle` and
  :func:`open_bundles` (checked against the backbone each pins), returning a :class:`Bundle`
  with the domain's tensors and the run's shared tensors apart.

File names and tensor-key prefixes are spelled in :mod:`.layout` only. Every read checks
checksums and pins; stages (pretrain, adapt, score, retrain) go through this package.
"""

from mdlora.infra.artifacts.backbone import (
    BackboneError,
    BackboneInfo,
    BackboneManifest,
    backbone_manifest,
    find_backbone,
    open_backbone,
    publish_backbone,
)
from mdlora.infra.artifacts.bundle import (
    BackboneRef,
    Bundle,
    BundleError,
    BundleManifest,
    load_bundle,
    verify_bundle,
    write_bundle,
)
from mdlora.infra.artifacts.deployment import open_bundles, production_refs
from mdlora.infra.artifacts.layout import ADAPTERS, BACKBONES, KINDS
from mdlora.infra.artifacts.registry import Registry, RegistryError
from mdlora.infra.artifacts.sealed import ArtifactError

__all__ = [
    "ADAPTERS", "BACKBONES", "KINDS", "ArtifactError", "BackboneError", "BackboneInfo", "BackboneManifest",
    "BackboneRef", "Bundle", "BundleError", "BundleManifest", "Registry", "RegistryError", "backbone_manifest",
    "find_backbone", "load_bundle", "open_backbone", "open_bundles", "production_refs", "publish_backbone",
    "verify_bundle", "write_bundle",
]
