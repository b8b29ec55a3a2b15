"""Reading what serves: a model's adapter bundles, each checked against the backbone it pins.

Scoring, a retrain's gate and add-domain read bundles only through :func:`open_bundles`, so
every read checks each file's sha256 and each bundle's pins (backbone content hash and schema
hash, against that backbone version's manifest) before any tensor is used.
"""

from __future__ import annotations

from pathlib import Path

from mdlora.infra.artifacts.backbone import BackboneManifest, backbone_manifest
from mdlora.infra.artifacts.bundle import Bundle, BundleError, BundleManifest, load_bundle
from mdlora.infra.artifacts.layout import ADAPTERS
from mdlora.infra.artifacts.registry import Registry
from mdlora.infra.storage import open_fs


def production_refs(registry: Registry) -> dict[str, str]:
    """``{domain: "production"}`` for every adapter name with a production version."""
    return {d: "production" for d in registry.names(ADAPTERS) if "production" in registry.aliases(ADAPTERS, d)}


def open_bundles(root: str, model: str, refs: dict[str, str] | None, cache: str | Path) -> dict[str, Bundle]:
    """Fetch and check the bundles of backbone ``model``.

    Args:
        root: registry root (local or s3://).
        model: the backbone name the bundles must pin.
        refs: ``{domain: version or alias}``; None: the production bundle of every domain whose
            production pins a ``model`` backbone (bundles of other models are skipped).
        cache: local directory for copies of S3 artefacts.

    Returns:
        ``{domain: Bundle}`` in domain order; backbone weights are not downloaded.

    Raises:
        RegistryError: a version does not exist or a file does not match its sha256 (the message
            names the bundle).
        BundleError: an explicitly named bundle pins another backbone name, or a bundle's pins
            differ from its backbone version's manifest.
    """
    registry = Registry(*open_fs(root))
    explicit = refs is not None
    refs = production_refs(registry) if refs is None else refs
    pinned: dict[str, BackboneManifest] = {}
    out = {}
    for domain, ref in sorted(refs.items()):
        version = Path(registry.resolve(ADAPTERS, domain, ref)).name  # once: an alias may move meanwhile
        source = f"{ADAPTERS}/{domain} {version}"
        pin = BundleManifest.from_dict(registry.manifest(ADAPTERS, domain, version), source=source).backbone
        if pin.name != model:
            if explicit:
                raise BundleError(f"{source}: adapter was trained on backbone {pin.name} {pin.version}, "
                                  f"not on a {model!r} backbone")
            continue  # production bundles of other backbone names serve other models
        if pin.version not in pinned:
            pinned[pin.version] = backbone_manifest(registry, model, pin.version)
        path = registry.fetch(ADAPTERS, domain, version, cache)  # every file checked against its sha256
        out[domain] = load_bundle(path, expect_backbone_hash=pinned[pin.version].content_hash,
                                  expect_schema_hash=pinned[pin.version].schema_hash)
    return out
