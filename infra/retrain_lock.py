"""The retrain lock: one scheduled retrain per model at a time (:class:`RetrainLock`).

Local registries use ``fcntl.flock``; S3 registries a lease object renewed with
compare-and-swap. :mod:`mdlora.infra.retrain` takes it around a whole run.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from mdlora.infra.artifacts.document import precondition_failed
from mdlora.infra.storage import is_s3, open_fs
from mdlora.names import check_name

log = logging.getLogger("mdlora.retrain")


def now() -> str:
    """UTC now as ``YYYY-MM-DDTHH:MM:SSZ``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class RetrainLocked(RuntimeError):
    """Another retrain of the same model holds the lock, or this run lost it."""


class RetrainLock:
    """Exclusive lock on the retrains of ``model`` in the registry at ``root``.

    * **Local** registries: ``fcntl.flock`` on ``<root>/retrain/<model>/.lock`` (as the registry
      serialises its alias updates). The kernel releases it when the holder exits or dies, so a
      crashed run never leaves a stale lock; the file names the last holder, nothing more.
    * **S3** registries: a lease object ``<root>/retrain/<model>/lock.json`` created with
      ``If-None-Match: *``; the holder renews its ``expires`` every ``ttl / 3`` seconds with
      ``If-Match`` on its ETag (the registry's compare-and-swap). A lease past ``expires`` (its
      holder crashed) is taken over with ``If-Match`` on the stale ETag. To recover a crashed
      holder's lease before it expires, delete ``lock.json`` (after checking the holder it names
      is gone). A holder whose lease was taken over fails in :meth:`check`, before any alias moves.

    Args:
        root: registry root (local dir or s3://).
        model: backbone name.
        owner: what to tell a refused retrain about this holder (run, window).
        ttl: S3 lease seconds.
    """

    def __init__(self, root: str, model: str, owner: dict, ttl: float) -> None:
        self.fs, base = open_fs(root)
        self.local = not is_s3(root)
        self.path = f"{base.rstrip('/')}/retrain/{check_name(model, 'model')}/" + (".lock" if self.local else "lock.json")
        self.uri = self.path if self.local else self.fs.unstrip_protocol(self.path)
        self.owner = {**owner, "host": socket.gethostname(), "pid": os.getpid(), "since": now()}
        self.ttl = ttl
        self._file, self._etag, self._lost = None, None, None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _refuse(self, holder: str) -> RetrainLocked:
        how = ("it is released when that process exits" if self.local else
               f"the lease expires unless renewed (ttl {self.ttl:.0f} s); if its holder is gone, delete {self.uri}")
        return RetrainLocked(f"another retrain of this model is running: lock {self.uri} is held by {holder} ({how})")

    def acquire(self) -> None:
        """Take the lock or raise :class:`RetrainLocked` naming the holder."""
        if self.local:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")  # held open (and locked) until release()
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise self._refuse(holder) from None
            f.truncate(0)
            f.write(json.dumps(self.owner))
            f.flush()
            self._file = f
            return
        try:
            self.fs.pipe_file(self.path, self._lease(), mode="create")
        except OSError as e:
            if not precondition_failed(e):
                raise
            self._take_over()
        self._etag = self._current_etag()
        self._beat = threading.Thread(target=self._renew, name="retrain-lock", daemon=True)
        self._beat.start()

    def _lease(self) -> bytes:
        return json.dumps({**self.owner, "expires": time.time() + self.ttl}).encode()

    def _current_etag(self) -> str | None:
        self.fs.invalidate_cache(self.path)
        try:
            return self.fs.info(self.path)["ETag"]
        except FileNotFoundError:
            return None

    def _take_over(self) -> None:
        """Replace an expired S3 lease (compare-and-swap on its ETag) or refuse."""
        etag = self._current_etag()
        holder = json.loads(self.fs.cat_file(self.path)) if etag else {}
        if etag and holder.get("expires", 0) > time.time():
            raise self._refuse(json.dumps(holder))
        try:
            if etag is None:
                self.fs.pipe_file(self.path, self._lease(), mode="create")
            else:
                self.fs.pipe_file(self.path, self._lease(), IfMatch=etag)
        except OSError as e:
            if not precondition_failed(e):
                raise
            raise self._refuse("a retrain that took the expired lease first") from None
        log.warning("took over the expired retrain lock %s of %s", self.uri, holder)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.fs.pipe_file(self.path, self._lease(), IfMatch=self._etag)
                self._etag = self._current_etag()
            except OSError as e:
                self._lost = e
                return

    def check(self) -> None:
        """Raise :class:`RetrainLocked` when this holder no longer owns the lock (S3)."""
        if self.local:
            return
        if self._lost is not None or self._current_etag() != self._etag:
            raise RetrainLocked(f"lost the retrain lock {self.uri} (taken over or deleted); nothing promoted")

    def release(self) -> None:
        """Release the lock (S3: delete the lease if it is still ours)."""
        if self.local:
            if self._file is not None:
                fcntl.flock(self._file, fcntl.LOCK_UN)
                self._file.close()
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self._lost is None and self._current_etag() == self._etag:
            self.fs.rm_file(self.path)

    def __enter__(self) -> RetrainLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
