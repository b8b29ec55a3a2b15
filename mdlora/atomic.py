"""Atomic local writes: readers see the old state or the new one, never a partial one.

* :func:`write_bytes` / :func:`write_json` write a file through a temp file + ``os.replace``;
  :func:`staging_file` yields such a temp file for writers that stream (Parquet writers).
* :func:`staging_dir` yields a hidden temp directory next to the destination; on success it is
  renamed into place in one ``os.rename`` (directories that already exist are refused, so a
  version is never overwritten), on error it is removed.

S3 has no rename: ``infra/storage.py`` uploads data files first and the manifest last.

Crash tests: ``MDLORA_FAULT_WRITE="SUBSTRING[:NTH[:MARKER]]"`` SIGKILLs the process at the NTH
(default first) commit whose destination path contains SUBSTRING, after the data is staged and
before the rename that publishes it (:func:`mdlora.faults.before_write`). Unset, it costs one env lookup.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mdlora import faults


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once at import: os.umask is process-wide and racy under threads


def _naming(e: OSError, path: Path) -> OSError:
    """``e`` with ``path`` as its file name when it has none (a failed ``write`` on a full disk
    says only "[Errno 28] No space left on device"; the user needs to know where)."""
    if e.filename is not None or e.errno is None:
        return e
    return OSError(e.errno, e.strerror, str(path))


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, replace).

    Raises:
        OSError: the write failed (disk full, read-only, ...); it names ``path``.
    """
    with staging_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def staging_file(dest: str | Path) -> Iterator[Path]:
    """Yield a temp file path next to ``dest`` that replaces ``dest`` when the block exits
    without error (fsync, ``os.replace``); on error it is removed and ``dest`` is untouched.

    Yields:
        The path to write (it exists, empty, mode 0666 & ~umask).

    Raises:
        OSError: writing or committing failed (disk full, ...); it names ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; readers are other users too
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        faults.before_write(dest)
        os.replace(tmp, dest)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        named = _naming(e, dest)
        if named is e:
            raise
        raise named from e
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(dest.parent)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON atomically."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def staging_dir(dest: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir that becomes ``dest`` atomically when the block exits without error.

    Args:
        dest: final directory path.
        overwrite: replace an existing ``dest`` (old one moved aside, then deleted). Default
            refuses with ``FileExistsError`` so that published versions are immutable.

    Yields:
        The staging directory to fill.

    Raises:
        FileExistsError: ``dest`` exists and ``overwrite`` is False.
        OSError: filling or committing it failed (disk full, ...); one without a file name (a
            failed ``write``) is raised again naming ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest}: already exists (versions are immutable)")
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".staging"))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; readers are other users too
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        faults.before_write(dest)
        if dest.exists() and overwrite:
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
        _fsync_dir(dest.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        named = _naming(e, dest)
        if named is e:
            raise
        raise named from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(root: str | Path, exclude: tuple[str, ...] = ()) -> tuple[str, dict[str, str]]:
    """Hash every file under ``root`` (relative paths sorted); return (tree hash, per-file hashes).

    The tree hash is the sha256 of ``"<relpath>\\0<filehash>\\n"`` lines, so it changes when any
    file's bytes or name change and does not depend on file system order.
    """
    root = Path(root)
    files = {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() not in exclude
    }
    h = hashlib.sha256()
    for rel, digest in sorted(files.items()):
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest(), files
