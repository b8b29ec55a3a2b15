"""Small JSON documents (a registry name's aliases) replaced whole, read-modify-write serialised.

Readers see the old document or the new one, never a half: a temp file + rename locally, a single
PUT on S3. Updates are serialised per document: locally by ``fcntl.flock`` on a ``.lock`` file
beside it; on S3 by compare-and-swap (``If-Match`` on the ETag, or ``If-None-Match: *`` for the
first write), retried on conflict. Each update tags the ``history`` events it appends with an id,
so a retry whose earlier PUT landed (its reply lost, then a 412) is not applied twice. S3 stores
that ignore the conditional headers cannot serialise concurrent writers.
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from mdlora.atomic import write_bytes

CAS_ATTEMPTS = 100


class UpdateConflict(RuntimeError):
    """Every compare-and-swap attempt lost to another writer."""


def precondition_failed(e: OSError) -> bool:
    """True when an S3 conditional write lost a race (412, or 409 for concurrent conditionals)."""
    if isinstance(e, FileExistsError):
        return True
    response = getattr(e.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") in {"PreconditionFailed", "ConditionalRequestConflict"}


def update_json(fs: fsspec.AbstractFileSystem, path: str, read: Callable[[], tuple[dict[str, Any], str | None]],
                change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Apply ``change`` (mutates the document; may raise) to the document at ``path``.

    Args:
        fs: local or S3 filesystem.
        path: the document inside ``fs``.
        read: ``() -> (document, S3 ETag or None)``; an empty document when there is none.
        change: the update.

    Returns:
        The document as written.

    Raises:
        UpdateConflict: ``CAS_ATTEMPTS`` conflicting writes in a row (S3).
    """
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{os.path.dirname(path)}/.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                doc, _ = read()
                change(doc)
                write_bytes(path, json.dumps(doc, indent=2, sort_keys=True).encode())
                return doc
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    op = uuid.uuid4().hex
    for _ in range(CAS_ATTEMPTS):
        doc, etag = read()
        if any(e.get("op") == op for e in doc.get("history", [])):
            return doc  # an earlier attempt's PUT landed though its reply was lost: done once
        doc = copy.deepcopy(doc)
        before = len(doc.get("history", []))
        change(doc)
        for event in doc.get("history", [])[before:]:
            event["op"] = op
        body = json.dumps(doc, indent=2, sort_keys=True).encode()
        try:
            fs.pipe_file(path, body, **({"mode": "create"} if etag is None else {"IfMatch": etag}))
            return doc
        except OSError as e:
            if not precondition_failed(e):
                raise
            time.sleep(random.uniform(0.01, 0.1))
    raise UpdateConflict(f"gave up updating {path} after {CAS_ATTEMPTS} conflicting writes")
