"""Logger setup: mdlora's own progress at INFO on rank 0, libraries at WARNING."""

from __future__ import annotations

import logging
import os
import sys
import warnings


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
    ours = logging.getLogger("mdlora")
    ours.propagate = False
    ours.handlers.clear()
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    ours.addHandler(handler)
    show = rank == 0 or os.environ.get("MDLORA_LOG_ALL_RANKS") == "1"
    ours.setLevel(level if show else logging.WARNING)
