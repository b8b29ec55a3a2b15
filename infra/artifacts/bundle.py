"""Adapter bundles: one domain's LoRA weights + a manifest that says what they belong to.

A bundle directory (``adapters/<domain>/vNNNN/`` in the registry) holds:

* ``adapter.safetensors`` — the adapter tensors (``safetensors.torch``; never pickle): the
  domain's own, and those it shares with its run's other bundles (:mod:`.layout`);
* ``manifest.json`` — :class:`BundleManifest`, written last with the sha256 of every file.

Loading checks, in order: the manifest is present, its ``format_version`` is not newer than
this code's, every file matches its sha256, and the backbone content hash and schema hash match
what the caller runs with (a mismatch is a hard error: an adapter trained on another backbone
gives silently wrong scores). Unknown manifest keys are warned about (a newer writer may add
fields), missing required keys are errors — as PEFT's ``PeftConfig`` does.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

import mdlora
from mdlora.atomic import staging_dir
from mdlora.config import to_dict
from mdlora.infra.artifacts.layout import ADAPTER_WEIGHTS, MANIFEST, SHARED_PREFIX
from mdlora.infra.artifacts.sealed import (
    ArtifactError,
    check_files,
    read_manifest,
    seal,
    typed_manifest,
)
from mdlora.names import check_name

FORMAT_VERSION = 2
"""2: MultiLoRA domain batch norm became residual (identity at start); format-1 MultiLoRA bundles
would compute different outputs under this code, so they are refused (MLoRA bundles are unchanged)."""
_VERSION = re.compile(r"^v\d{4,}$")


class BundleError(ArtifactError):
    """A bundle is incomplete, corrupt, too new, or built for another backbone/schema."""


def utc_now() -> str:
    """Current UTC time as ISO 8601 with seconds (``2026-11-23T04:27:00+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(kw_only=True)
class BackboneRef:
    """The backbone snapshot an adapter was trained on."""

    name: str
    """Backbone name in the registry."""
    version: str
    """Registry version (``vNNNN``)."""
    content_hash: str
    """``content_hash`` of the backbone's manifest; loading refuses any other backbone."""


@dataclass(kw_only=True)
class BundleManifest:
    """Everything needed to decide whether an adapter may be loaded, and how well it did."""

    format_version: int = FORMAT_VERSION
    """Bundle layout version; readers refuse bundles newer than :data:`FORMAT_VERSION`."""
    kind: Literal["adapter"] = "adapter"
    """Artefact kind."""
    domain: str
    """Domain value the adapter serves (a name from the schema's domain vocabulary)."""
    version: str = ""
    """Registry version ``vNNNN``; empty until :meth:`Registry.publish` allocates one."""
    method: Literal["mlora", "multilora"]
    """LoRA variant the weights belong to."""
    lora: dict[str, Any]
    """LoRA config as trained (rank(s), alpha, dropout, target module names, ...)."""
    backbone: BackboneRef
    """Backbone snapshot the adapter was trained on."""
    schema_hash: str
    """``Schema.content_hash()`` of the feature schema used in training."""
    param_count: int
    """Number of adapter parameters (elements over all tensors)."""
    param_share: float
    """``param_count`` divided by the dense backbone's parameter count."""
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per split (``validation``, ``test``): ``auc_backbone``, ``auc_adapter``,
    ``logloss_backbone``, ``logloss_adapter``, ``ne_backbone``, ``ne_adapter``,
    ``calibration_backbone``, ``calibration_adapter`` (undefined ones left out), ``samples``."""
    data_window: dict[str, str] = field(default_factory=dict)
    """The data it was trained on: ``window`` (``START..END`` or ``all``) and the datasets by split
    (``train``, ``validation``, ``test``; or ``all``, one dataset split 9:1). A scheduled retrain
    rebases a domain added by ``add-domain`` from these."""
    run: str = ""
    """The scheduled retrain run that published it ('' for ``adapt`` / ``add-domain``): a resumed
    run finds what its earlier attempt published and does not publish it again."""
    created_at: str = field(default_factory=utc_now)
    """UTC ISO 8601 creation time."""
    code_version: str = mdlora.__version__
    """``mdlora.__version__`` of the writer."""
    files: dict[str, str] = field(default_factory=dict)
    """``{file name: sha256}``; filled by :func:`write_bundle`."""
    content_hash: str = ""
    """Tree hash over ``files``; filled by :func:`write_bundle`."""

    def __post_init__(self) -> None:
        check_name(self.domain, "domain")
        if self.kind != "adapter":
            raise ValueError(f"kind: expected 'adapter', got {self.kind!r}")
        if self.method not in ("mlora", "multilora"):
            raise ValueError(f"method: expected 'mlora' or 'multilora', got {self.method!r}")
        if not 1 <= self.format_version <= FORMAT_VERSION:
            raise ValueError(
                f"format_version: must lie in [1, {FORMAT_VERSION}], got {self.format_version}"
            )
        if self.version and not _VERSION.match(self.version):
            raise ValueError(f"version: expected 'vNNNN', got {self.version!r}")
        if self.param_count < 0 or self.param_share < 0:
            raise ValueError(
                f"param_count/param_share: must be >= 0, got {self.param_count}/{self.param_share}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "manifest") -> BundleManifest:
        """Build from a manifest dict: unknown keys warn, missing required keys fail.

        Args:
            data: the parsed ``manifest.json``.
            source: where it came from, used in messages.

        Returns:
            The manifest.

        Raises:
            BundleError: ``format_version`` is newer than :data:`FORMAT_VERSION`, a required key
                is missing or a value has the wrong type (the message names the key).
        """
        check_format_version(data, source)
        return typed_manifest(cls, data, source, BundleError)


def check_format_version(data: dict[str, Any], source: str) -> None:
    """Refuse manifests whose ``format_version`` this code cannot read."""
    fv = data.get("format_version")
    if isinstance(fv, int) and fv > FORMAT_VERSION:
        raise BundleError(
            f"{source}: format_version {fv} is newer than this mdlora ({mdlora.__version__}) "
            f"reads (format_version {FORMAT_VERSION}); upgrade mdlora"
        )
    if isinstance(fv, int) and fv < 2 and data.get("method") == "multilora":
        raise BundleError(
            f"{source}: format_version {fv} MultiLoRA bundle predates the residual domain batch "
            f"norm of format_version 2; re-run adapt to rebuild it"
        )


def write_bundle(
    dest: str | Path,
    tensors: dict[str, torch.Tensor],
    manifest: BundleManifest,
    shared: dict[str, torch.Tensor] | None = None,
) -> BundleManifest:
    """Write a bundle atomically: tensors first, manifest (with every file's sha256) last.

    The directory appears at ``dest`` in one rename, so a crash leaves no visible bundle.

    Args:
        dest: bundle directory to create; must not exist (bundles are immutable).
        tensors: the domain's adapter tensors by module key (CPU or not; stored contiguous on CPU).
        manifest: manifest; ``files`` and ``content_hash`` are filled in here.
        shared: tensors every bundle of the run shares (MultiLoRA's aux LoRAs), or None.

    Returns:
        The manifest as written.

    Raises:
        FileExistsError: ``dest`` exists.
    """
    clash = sorted(k for k in tensors if k.startswith(SHARED_PREFIX))
    if clash:
        raise ValueError(f"tensors: domain keys must not start with {SHARED_PREFIX!r}: {clash[:3]}")
    out = dict(tensors) | {SHARED_PREFIX + k: v for k, v in (shared or {}).items()}
    with staging_dir(dest) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in out.items()}, str(tmp / ADAPTER_WEIGHTS))
        written = seal(tmp, manifest.to_dict())
    return BundleManifest.from_dict(written, source=str(dest))


@dataclass
class Bundle:
    """A loaded, checked bundle."""

    manifest: BundleManifest
    tensors: dict[str, torch.Tensor]
    """The domain's own adapter tensors (CPU), keyed by module."""
    shared: dict[str, torch.Tensor]
    """Tensors shared with the other bundles of its run (MultiLoRA aux LoRAs; {} for MLoRA)."""


def load_bundle(
    path: str | Path,
    *,
    expect_backbone_hash: str | None,
    expect_schema_hash: str | None,
) -> Bundle:
    """Load and check a bundle directory.

    Args:
        path: local bundle directory (``Registry.fetch`` downloads remote ones).
        expect_backbone_hash: content hash of the backbone the caller runs; None skips the check.
        expect_schema_hash: ``Schema.content_hash()`` the caller runs; None skips the check.

    Returns:
        The bundle, domain and shared tensors apart.

    Raises:
        BundleError: missing manifest, newer format, tampered file, or hash mismatch; the message
            names the file or both hashes.
    """
    path = Path(path)
    try:
        raw = read_manifest(str(path))
    except ArtifactError as e:
        raise BundleError(str(e)) from None
    manifest = BundleManifest.from_dict(raw, source=str(path / MANIFEST))
    if ADAPTER_WEIGHTS not in manifest.files:
        raise BundleError(f"{path}: manifest lists no {ADAPTER_WEIGHTS}")
    problems = check_files(str(path), manifest.files)
    if problems:
        raise BundleError(f"{path}: corrupt bundle: " + "; ".join(problems))
    if expect_backbone_hash is not None and manifest.backbone.content_hash != expect_backbone_hash:
        raise BundleError(
            f"{path}: adapter was trained on backbone {manifest.backbone.name} {manifest.backbone.version} "
            f"with content hash {manifest.backbone.content_hash}, but the loaded backbone has {expect_backbone_hash}"
        )
    if expect_schema_hash is not None and manifest.schema_hash != expect_schema_hash:
        raise BundleError(
            f"{path}: adapter was trained with schema hash {manifest.schema_hash}, "
            f"but the current schema has {expect_schema_hash}"
        )
    raw_tensors = load_file(str(path / ADAPTER_WEIGHTS))
    n = len(SHARED_PREFIX)
    return Bundle(manifest, {k: v for k, v in raw_tensors.items() if not k.startswith(SHARED_PREFIX)},
                  {k[n:]: v for k, v in raw_tensors.items() if k.startswith(SHARED_PREFIX)})


def verify_bundle(path: str | Path) -> list[str]:
    """List what is wrong with a local artefact directory (adapter bundle or backbone snapshot).

    Returns:
        One line per problem (missing manifest, newer format, invalid adapter manifest, missing or
        modified file); empty when the artefact is intact.
    """
    try:
        data = read_manifest(str(path))
        check_format_version(data, str(path))
        if data.get("kind") == "adapter":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                BundleManifest.from_dict(data, source=str(path))
    except ArtifactError as e:
        return [str(e)]
    return check_files(str(path), data["files"])
