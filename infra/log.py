"""Logger setup: mdlora's own progress at INFO on rank 0, libraries at WARNING, known noise off.

Third-party lines silenced at their source:

* fbgemm_gpu logs ``Successfully loaded: 'fbgemm_gpu_*.so'`` through the root logger at INFO
  while it is imported: the root logger stays at WARNING (Ray Train sets it to INFO in its
  workers, so ``infra/ray_backend.py`` imports the worker function only after
  :func:`setup_logging`);
* torch.fx warns that ``is_fx_tracing`` covers torch.export too, once per process, when
  TorchRec calls it: that logger is set to ERROR;
* Ray Train's controller starts a ``PreemptionWatcher`` actor, and Ray core logs an error line
  for it at every start (ray-project/ray#53727), harmless here: :func:`quiet_ray_logs` adds it
  to Ray's own filter of worker lines, ``RAY_DEDUP_LOGS_SKIP_REGEX``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

RAY_SKIP_LINES = (r"Actor with class name: 'PreemptionWatcher' .*max_restarts > 0",)
"""Regexes of harmless lines Ray workers print that the driver drops (see the module doc)."""


class _Stderr(logging.StreamHandler):
    """A stream handler on whatever ``sys.stderr`` is at emit time (test runners swap it)."""

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    """Send ``mdlora.*`` records to stderr (rank 0 only unless MDLORA_LOG_ALL_RANKS=1).

    Library loggers (torchrec, fbgemm, ray) stay at WARNING so progress lines are readable.
    """
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # deprecation notices from torch/torchrec internals are not actionable for users
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    logging.getLogger().setLevel(logging.WARNING)  # fbgemm logs through the root logger
    for name in ("torchrec", "fbgemm_gpu", "torch.distributed", "ray.train", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # is_fx_tracing notice
    ours = logging.getLogger("mdlora")
    ours.propagate = False
    ours.handlers.clear()
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    ours.addHandler(handler)
    show = rank == 0 or os.environ.get("MDLORA_LOG_ALL_RANKS") == "1"
    ours.setLevel(level if show else logging.WARNING)


def quiet_ray_logs() -> None:
    """Make this driver drop the worker lines of :data:`RAY_SKIP_LINES`.

    Ray reads ``RAY_DEDUP_LOGS_SKIP_REGEX`` when it is imported: call this before ``import ray``.
    A regex the user set is kept (either one skips a line).
    """
    ours = "|".join(RAY_SKIP_LINES)
    user = os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX", "")
    if ours not in user:
        os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] = f"{user}|{ours}" if user else ours
