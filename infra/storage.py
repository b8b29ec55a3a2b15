"""Storage: one place that turns a path or ``s3://`` URI into an fsspec filesystem.

Credentials and endpoint come from the environment (or explicit arguments), never from code:

* botocore's credential chain: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
  ``AWS_SESSION_TOKEN``, a profile, IRSA (web identity) or the instance role,
* ``MDLORA_S3_ENDPOINT`` (or ``AWS_ENDPOINT_URL``) for S3-compatible stores (moto, MinIO),
* ``AWS_DEFAULT_REGION`` (default ``us-east-1``).

Lower layers write local directories only; this module moves them to/from S3.
"""

from __future__ import annotations

import os
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
