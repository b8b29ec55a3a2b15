"""Self-describing artefact directories (backbone snapshots, adapter bundles): the common part.

An artefact is a directory of data files plus ``manifest.json``, written **last**. The manifest
is a JSON object with at least::

    {"format_version": 1, "kind": "...", "files": {"<relpath>": "<sha256>"}, "content_hash": "..."}

``content_hash`` is :func:`mdlora.atomic.sha256_tree` over the data files, so two artefacts with
the same bytes have the same hash. A directory without a manifest is incomplete: readers and the
registry ignore it. The checks here take an fsspec filesystem so that the same code verifies a
local directory and an ``s3://`` prefix.

Example::

    with staging_dir(dest) as tmp:
        save_file(tensors, tmp / "weights.safetensors")
        manifest = seal(tmp, {"format_version": 1, "kind": "backbone", "name": "ctr"})
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import fsspec

from mdlora.atomic import sha256_tree, staging_dir, write_bytes, write_json
from mdlora.config import ConfigError, from_dict
from mdlora.infra.artifacts.layout import MANIFEST


class ArtifactError(ValueError):
    """An artefact is missing its manifest, is corrupt, or does not match what the caller expects."""


M = TypeVar("M")


def typed_manifest(cls: type[M], data: dict[str, Any], source: str, error: type[ArtifactError]) -> M:
    """The manifest dataclass ``cls`` from a parsed ``manifest.json``, as PEFT's config loading
    does: unknown keys warn (a newer writer may add fields), missing required keys fail.

    Raises:
        error: a required key is missing or a value is invalid (the message names ``source``
            and the key).
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        warnings.warn(f"{source}: unknown manifest keys {unknown} ignored (written by a newer mdlora?)", stacklevel=3)
    try:
        return from_dict(cls, {k: v for k, v in data.items() if k in known})
    except (ConfigError, ValueError) as e:
        raise error(f"{source}: {e}") from None


def local_fs() -> fsspec.AbstractFileSystem:
    """The local fsspec filesystem (the default for the checks below)."""
    return fsspec.filesystem("file")


def seal(directory: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every data file under ``directory`` and write ``manifest.json`` last, atomically.

    Args:
        directory: a local directory holding the data files (usually a ``staging_dir``).
        manifest: manifest fields; ``files`` and ``content_hash`` are filled in here.

    Returns:
        The manifest as written (a new dict).
    """
    content_hash, files = sha256_tree(directory, exclude=(MANIFEST,))
    out = {**manifest, "files": files, "content_hash": content_hash}
    write_json(Path(directory) / MANIFEST, out)
    return out


def read_manifest(directory: str, fs: fsspec.AbstractFileSystem | None = None) -> dict[str, Any]:
    """Read ``<directory>/manifest.json``.

    Args:
        directory: artefact directory (local path or in-filesystem path of ``fs``).
        fs: filesystem; local by default.

    Returns:
        The manifest as a dict (it has a ``files`` mapping).

    Raises:
        ArtifactError: the manifest is missing (the artefact is incomplete), not JSON, or has no
            ``files`` mapping; the message names the path.
    """
    fs = fs or local_fs()
    path = f"{str(directory).rstrip('/')}/{MANIFEST}"
    try:
        with fs.open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        raise ArtifactError(
            f"{directory}: missing manifest ({MANIFEST}); the artefact is incomplete"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ArtifactError(f"{path}: expected a JSON object with a 'files' mapping")
    return data


def safe_relpath(rel: str) -> bool:
    """True when a manifest's file name stays inside its artefact directory (relative, no
    ``..``) and is not the manifest itself."""
    p = PurePosixPath(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts and rel != MANIFEST


def sha256_fs(fs: fsspec.AbstractFileSystem, path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file read through ``fs`` (streamed in ``chunk``-byte blocks)."""
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_files(
    directory: str, files: dict[str, str], fs: fsspec.AbstractFileSystem | None = None
) -> list[str]:
    """Compare each listed file's sha256 with the manifest.

    Args:
        directory: artefact directory (local path or in-filesystem path of ``fs``).
        files: ``{relpath: sha256}`` from the manifest.
        fs: filesystem; local by default.

    Returns:
        One line per problem (unsafe path, missing file, checksum mismatch), each naming the file;
        empty when every file matches.
    """
    fs = fs or local_fs()
    problems = []
    for rel, digest in sorted(files.items()):
        path = f"{str(directory).rstrip('/')}/{rel}"
        if not safe_relpath(rel):
            problems.append(f"{rel!r}: unsafe file name in manifest")
        elif not fs.exists(path):
            problems.append(f"{path}: listed in the manifest but missing")
        elif (actual := sha256_fs(fs, path)) != digest:
            problems.append(
                f"{path}: sha256 mismatch (manifest {digest[:12]}, file {actual[:12]}); the file was modified or corrupted"
            )
    return problems


def _files(directory: Path) -> dict[str, str] | None:
    """The ``files`` of a local artefact's manifest, or None when there is no (readable) one."""
    try:
        return read_manifest(str(directory))["files"]
    except ArtifactError:
        return None


def local_copy(fs: fsspec.AbstractFileSystem, src: str, dest: Path) -> None:
    """Make ``dest`` a local copy of the artefact at ``src`` on ``fs`` (e.g. S3), atomically.

    An existing copy is kept only when its manifest lists exactly the files and hashes of
    ``src``'s and its files match them; otherwise (none, another artefact's, a damaged one) it is
    downloaded again. Processes copying the same artefact at once all end up with one copy.

    Raises:
        ArtifactError: ``src``'s manifest is missing, or names a file outside its directory
            (refused before anything is written).
    """
    remote = read_manifest(src, fs)
    unsafe = sorted(rel for rel in remote["files"] if not safe_relpath(rel))
    if unsafe:
        raise ArtifactError(f"{fs.unstrip_protocol(src)}: its manifest names files outside the version: {unsafe}")
    if _files(dest) == remote["files"] and not check_files(str(dest), remote["files"]):
        return
    try:
        with staging_dir(dest, overwrite=dest.exists()) as tmp:
            for rel in sorted(remote["files"]):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{src}/{rel}", str(tmp / rel))
            write_bytes(tmp / MANIFEST, json.dumps(remote, indent=2, sort_keys=True).encode())
    except OSError:
        if _files(dest) != remote["files"]:
            raise  # else another process copied the same artefact at the same time: its copy serves
