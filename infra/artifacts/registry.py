"""Versioned artefact registry for backbones and adapters, on a local directory or S3.

Layout under ``root`` (any fsspec filesystem; local and S3 are supported)::

    <kind>/<name>/v0001/<data files>      kind is "adapters" or "backbones"
    <kind>/<name>/v0001/manifest.json     written last: a version without it is invisible
    <kind>/<name>/v0001/.reservation      claims the number (exclusive create)
    <kind>/<name>/aliases.json            {"aliases": {"latest": .., "production": ..}, "history": [..]}

Concurrency:

* **Version numbers** are claimed by creating ``vNNNN/.reservation`` exclusively
  (``fs.open(path, "xb")``: ``O_EXCL`` locally, ``If-None-Match: *`` on S3); a publisher that
  loses the race tries the next number. A crashed publisher leaves a version without a
  manifest, which is ignored and whose number is never reused.
* **Aliases and history** live in one small JSON object per name, replaced whole and updated
  with serialised read-modify-write (:mod:`mdlora.infra.artifacts.document`: ``flock`` locally,
  compare-and-swap on S3, applied once when a PUT's reply is lost).
* Different names never write the same object, so jobs for different domains never conflict.

Rollback replays the history: each promotion pushes the production version on a stack, each
rollback pops it, so repeated rollbacks walk back through earlier productions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from mdlora.atomic import write_bytes
from mdlora.infra.artifacts.bundle import BundleManifest
from mdlora.infra.artifacts.document import UpdateConflict, update_json
from mdlora.infra.artifacts.layout import ADAPTERS, ALIASES, KINDS, MANIFEST, RESERVATION
from mdlora.infra.artifacts.sealed import ArtifactError, check_files, local_copy, read_manifest
from mdlora.names import check_name

_VERSION = re.compile(r"^v(\d{4,})$")


class RegistryError(ValueError):
    """A registry request names an unknown kind, name, version or alias, or cannot be applied."""


def version_name(number: int) -> str:
    """``3 -> "v0003"``."""
    return f"v{number:04d}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _production_stack(history: list[dict[str, Any]]) -> list[str]:
    stack: list[str] = []
    for event in history:
        if event["event"] == "promote":
            stack.append(event["version"])
        elif event["event"] == "rollback":
            stack.pop()
    return stack


class Registry:
    """Versions, aliases (``latest``, ``production``) and history of artefacts under ``root``.

    Args:
        fs: fsspec filesystem (``mdlora.infra.storage.open_fs(uri)`` returns it with the path).
        root: registry root inside ``fs`` (a local path, or ``bucket/prefix`` for S3).

    Example::

        reg = Registry(*open_fs("s3://models/registry"))
        v = reg.publish("adapters", "books", "/tmp/bundle")   # "v0003", now "latest"
        reg.promote("adapters", "books", v)
        path = reg.fetch("adapters", "books", "production", "/tmp/cache")
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs = fs
        self.root = str(root).rstrip("/")
        self.local = isinstance(fs, LocalFileSystem)
        if not self.local and "s3" not in fs.protocol and "s3a" not in fs.protocol:
            raise RegistryError(
                f"registry on {fs.protocol}: only local and S3 filesystems are supported"
            )

    # ---- paths --------------------------------------------------------------------------------
    def _kind_dir(self, kind: str) -> str:
        if kind not in KINDS:
            raise RegistryError(f"kind {kind!r}: expected one of {list(KINDS)}")
        return f"{self.root}/{kind}"

    def _name_dir(self, kind: str, name: str) -> str:
        return f"{self._kind_dir(kind)}/{check_name(name, f'{kind[:-1]} name')}"

    def uri(self, path: str) -> str:
        """A path inside ``fs`` as the user sees it (plain local path, or ``s3://...``)."""
        return path if self.local else self.fs.unstrip_protocol(path)

    def _ls_names(self, directory: str) -> list[str]:
        self.fs.invalidate_cache(directory)
        if not self.fs.exists(directory):
            return []
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(directory, detail=False)]

    # ---- reading ------------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        """Names of ``kind`` that have at least one complete version, sorted."""
        base = self._kind_dir(kind)
        self.fs.invalidate_cache(base)
        parts = [p.split("/") for p in self.fs.glob(f"{base}/*/v*/{MANIFEST}")]
        return sorted({p[-3] for p in parts if _VERSION.match(p[-2])})

    def versions(self, kind: str, name: str) -> list[str]:
        """Complete versions (manifest present) of ``kind/name``, oldest first."""
        base = self._name_dir(kind, name)
        self.fs.invalidate_cache(base)
        found = {p.rstrip("/").split("/")[-2] for p in self.fs.glob(f"{base}/v*/{MANIFEST}")}
        return sorted((v for v in found if _VERSION.match(v)), key=lambda v: int(v[1:]))

    def _state(self, kind: str, name: str) -> tuple[dict[str, Any], str | None]:
        """``(aliases state, S3 ETag or None)``; an empty state when nothing was published."""
        path = f"{self._name_dir(kind, name)}/{ALIASES}"
        self.fs.invalidate_cache(path)
        try:
            etag = None if self.local else self.fs.info(path)["ETag"]
            state = json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return {"aliases": {}, "history": []}, None
        return state, etag

    def aliases(self, kind: str, name: str) -> dict[str, str]:
        """``{"latest": "vNNNN", "production": "vNNNN"}`` (only the aliases that are set)."""
        return self._state(kind, name)[0]["aliases"]

    def history(self, kind: str, name: str) -> list[dict[str, Any]]:
        """Events oldest first: ``{"event": publish|promote|rollback, "version", "previous", "at"}``."""
        return self._state(kind, name)[0]["history"]

    def _version(self, kind: str, name: str, ref: str) -> str:
        """Resolve ``ref`` (alias, ``vNNNN``, ``v3`` or ``3``) to a complete version."""
        versions = self.versions(kind, name)
        digits = ref[1:] if ref.startswith("v") else ref
        if digits.isdigit() and version_name(int(digits)) not in versions:
            version = version_name(int(digits))
            if self.fs.exists(f"{self._name_dir(kind, name)}/{version}"):
                raise RegistryError(f"{kind}/{name} {version}: incomplete, no {MANIFEST} (its publish never "
                                    f"finished, or the manifest was removed); complete versions: {versions}")
        if not versions:
            raise RegistryError(f"{kind}/{name}: no published versions under {self.uri(self.root)}")
        if digits.isdigit():
            version = version_name(int(digits))
        else:
            version = self.aliases(kind, name).get(ref)
            if version is None:
                raise RegistryError(
                    f"{kind}/{name}: no {ref!r} alias (set aliases: {self.aliases(kind, name)}); versions: {versions}"
                )
        if version not in versions:
            raise RegistryError(
                f"{kind}/{name}: no complete version {version} (versions: {versions})"
            )
        return version

    def resolve(self, kind: str, name: str, ref: str = "production") -> str:
        """Path/URI of the version ``ref`` (``production``, ``latest`` or ``vNNNN``) points to."""
        return self.uri(f"{self._name_dir(kind, name)}/{self._version(kind, name, ref)}")

    def manifest(self, kind: str, name: str, ref: str = "latest") -> dict[str, Any]:
        """The manifest of version ``ref``."""
        return read_manifest(
            f"{self._name_dir(kind, name)}/{self._version(kind, name, ref)}", self.fs
        )

    def find(self, kind: str, name: str, key: str, value: Any) -> str | None:
        """The newest complete version of ``kind/name`` whose manifest has ``key == value``
        (e.g. ``run``: what a resumed job published before it died), or None."""
        if not self.fs.exists(self._name_dir(kind, name)):
            return None
        for version in reversed(self.versions(kind, name)):
            if read_manifest(f"{self._name_dir(kind, name)}/{version}", self.fs).get(key) == value:
                return version
        return None

    def read_text(self, kind: str, name: str, ref: str, file: str) -> str:
        """One file of version ``ref`` as text (e.g. a backbone's ``metrics.json``)."""
        return self.fs.cat_file(f"{self._name_dir(kind, name)}/{self._version(kind, name, ref)}/{file}").decode()

    def verify(self, kind: str, name: str, ref: str) -> list[str]:
        """Problems of version ``ref`` (checksums, each naming the file; for adapters also a
        manifest this code cannot read, e.g. a newer format); empty when intact."""
        path = f"{self._name_dir(kind, name)}/{self._version(kind, name, ref)}"
        try:
            manifest = read_manifest(path, self.fs)
            if kind == ADAPTERS:  # also a format this code reads and a valid bundle manifest
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    BundleManifest.from_dict(manifest, source=self.uri(path))
            return check_files(path, manifest["files"], self.fs)
        except ArtifactError as e:
            return [str(e)]

    def fetch(self, kind: str, name: str, ref: str, local_dir: str | Path) -> Path:
        """A local directory holding version ``ref``.

        Local registries return the version directory itself (versions are immutable). S3 ones
        download into ``local_dir/<registry key>/<kind>/<name>/<vNNNN>`` atomically, where the
        key is a hash of the registry's URI (two buckets' ``ctr/v0001`` never share a copy), and
        reuse an earlier download only when its manifest lists exactly the files and hashes of
        the registry's and its files match them (:func:`mdlora.infra.artifacts.sealed.local_copy`). Either way
        every file is checked against the manifest's sha256 before the path is returned, so
        nothing modified is ever loaded.
        """
        version = self._version(kind, name, ref)
        src = f"{self._name_dir(kind, name)}/{version}"
        if self.local:
            dest = Path(src)
        else:
            key = hashlib.sha256(self.uri(self.root).encode()).hexdigest()[:16]
            dest = Path(local_dir) / key / kind / name / version
            local_copy(self.fs, src, dest)
        problems = check_files(str(dest), read_manifest(str(dest))["files"])
        if problems:
            raise RegistryError(
                f"{dest}: {kind}/{name} {version} is corrupt: "
                + "; ".join(problems)
            )
        return dest

    # ---- writing ------------------------------------------------------------------------------
    def _reserve(self, kind: str, name: str) -> str:
        """Claim the next free version number by creating ``vNNNN/.reservation`` exclusively."""
        base = self._name_dir(kind, name)
        taken = [int(m.group(1)) for n in self._ls_names(base) if (m := _VERSION.match(n))]
        number = max(taken, default=0) + 1
        claim = json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "at": _now()}
        ).encode()
        while True:
            path = f"{base}/{version_name(number)}"
            if self.local:
                os.makedirs(path, exist_ok=True)
            try:
                with self.fs.open(f"{path}/{RESERVATION}", "xb") as f:
                    f.write(claim)
                return version_name(number)
            except FileExistsError:
                number += 1

    def _put_bytes(self, path: str, data: bytes) -> None:
        """Write one small object so that readers see all of it or nothing."""
        if self.local:
            write_bytes(path, data)
        else:
            self.fs.pipe_file(path, data)

    def _update(self, kind: str, name: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Apply ``change`` (mutates a state dict; may raise) to the aliases object, serialised per name."""
        try:
            return update_json(self.fs, f"{self._name_dir(kind, name)}/{ALIASES}", lambda: self._state(kind, name),
                               change)
        except UpdateConflict as e:
            raise RegistryError(f"{kind}/{name}: {e}") from None

    def publish(self, kind: str, name: str, local_dir: str | Path) -> str:
        """Copy a local artefact directory in as the next version and point ``latest`` at it.

        Data files go first, the manifest (with ``version`` set) last, so the version becomes
        visible only when complete. ``latest`` only moves forward (to the highest version).

        Args:
            kind: ``adapters`` or ``backbones``.
            name: domain (adapters) or backbone name; letters, digits, ``_ . -``.
            local_dir: directory with data files and ``manifest.json`` listing their sha256.

        Returns:
            The new version, e.g. ``"v0003"``.

        Raises:
            RegistryError: the source has no manifest or its files do not match it.
        """
        base = self._name_dir(kind, name)
        local_dir = Path(local_dir)
        manifest = read_manifest(str(local_dir))
        problems = check_files(str(local_dir), manifest["files"])
        if problems:
            raise RegistryError(
                f"{local_dir}: refusing to publish a corrupt artefact: " + "; ".join(problems)
            )
        version = self._reserve(kind, name)
        dest = f"{base}/{version}"
        for rel in sorted(manifest["files"]):
            if self.local:
                os.makedirs(os.path.dirname(f"{dest}/{rel}"), exist_ok=True)
            self.fs.put_file(str(local_dir / rel), f"{dest}/{rel}")
        self._put_bytes(
            f"{dest}/{MANIFEST}",
            json.dumps({**manifest, "version": version}, indent=2, sort_keys=True).encode(),
        )

        def change(state: dict[str, Any]) -> None:
            latest = state["aliases"].get("latest")
            if latest is None or int(latest[1:]) < int(version[1:]):
                state["aliases"]["latest"] = version
            state["history"].append(
                {"event": "publish", "version": version, "previous": latest, "at": _now()}
            )

        self._update(kind, name, change)
        return version

    def promote(self, kind: str, name: str, ref: str) -> str | None:
        """Point ``production`` at version ``ref``; returns the previous production (or None).

        Promoting the current production again changes nothing.
        """
        version = self._version(kind, name, ref)
        previous: list[str | None] = []

        def change(state: dict[str, Any]) -> None:
            previous[:] = [state["aliases"].get("production")]
            if previous[0] != version:
                state["aliases"]["production"] = version
                state["history"].append(
                    {"event": "promote", "version": version, "previous": previous[0], "at": _now()}
                )

        self._update(kind, name, change)
        return previous[0]

    def rollback(self, kind: str, name: str) -> str:
        """Point ``production`` back at the production before the current one; returns it.

        Raises:
            RegistryError: no earlier production version exists.
        """
        target: list[str] = []

        def change(state: dict[str, Any]) -> None:
            stack = _production_stack(state["history"])
            if len(stack) < 2:
                raise RegistryError(
                    f"{kind}/{name}: no earlier production version to roll back to (production: {stack[-1] if stack else None})"
                )
            target[:] = [stack[-2]]
            state["aliases"]["production"] = stack[-2]
            state["history"].append(
                {"event": "rollback", "version": stack[-2], "previous": stack[-1], "at": _now()}
            )

        self._update(kind, name, change)
        return target[0]
