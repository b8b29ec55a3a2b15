"""Storage: one place that turns a path or ``s3://`` URI into an fsspec filesystem.

Credentials and endpoint come from the environment (or explicit arguments), never from code:

* botocore's credential chain: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
  ``AWS_SESSION_TOKEN``, a profile, IRSA (web identity) or the instance role,
* ``MDLORA_S3_ENDPOINT`` (or ``AWS_ENDPOINT_URL``) for S3-compatible stores (moto, MinIO),
* ``AWS_DEFAULT_REGION`` (default ``us-east-1``).

Lower layers write local directories only; this module moves them to/from S3.
"""

from __future__ import annotations

import errno
import os
import uuid
from typing import Any

import fsspec


def is_s3(uri: str) -> bool:
    """True for ``s3://`` URIs."""
    return str(uri).startswith("s3://")


def s3_options() -> dict[str, Any]:
    """s3fs keyword arguments from the environment (no secrets are logged or returned in errors)."""
    endpoint = os.environ.get("MDLORA_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs: dict[str, Any] = {"region_name": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    # no key/secret here: botocore reads them (and AWS_SESSION_TOKEN, profiles, IRSA, instance
    # roles) from its own credential chain, so no filesystem object (pickled to Ray workers too)
    # ever carries a secret
    return {"client_kwargs": client_kwargs}


def open_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and in-filesystem path for a local path or ``s3://bucket/key`` URI.

    Args:
        uri: local path or ``s3://`` URI.

    Returns:
        ``(fs, path)`` where ``path`` has the scheme stripped (``bucket/key`` for S3).
    """
    if is_s3(uri):
        import s3fs

        return s3fs.S3FileSystem(**s3_options()), str(uri)[len("s3://") :].rstrip("/")
    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(str(uri)))


def check_writable(uri: str, what: str) -> None:
    """Refuse, before any work starts, an output location this process cannot write.

    Writes and deletes an empty probe object: in the nearest existing directory of a local
    path (so nothing is left behind, not even the missing directories), under the prefix on S3
    (a missing bucket, no ``PutObject`` permission). A full disk is not detected here (the
    probe is empty); writers report it with the file they could not write.

    Args:
        uri: local path or ``s3://`` URI.
        what: the config key it comes from, named in the error.

    Raises:
        OSError: naming ``what``, ``uri`` and the reason; its builtin subclass is kept
            (``PermissionError``, ``FileNotFoundError`` for a missing bucket, ``NotADirectoryError``).
    """
    fs, path = open_fs(uri)
    if not is_s3(uri):
        while not os.path.exists(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)
        if not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, f"{what}: {uri}: {path} is not a directory")
    probe = f"{path}/.mdlora-write-probe-{uuid.uuid4().hex}"
    try:
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except OSError as e:
        kind = type(e) if type(e).__module__ == "builtins" else OSError  # FileNotFoundError: no bucket
        message = f"{what}: {uri} is not writable ({e.strerror or e})"
        raise (kind(e.errno, message) if e.errno else kind(message)) from None
