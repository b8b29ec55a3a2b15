"""infra/log.py: third-party noise is silenced at its source (checked on the filters, no Ray job)."""

from __future__ import annotations

import io
import logging
import os
import re

import pytest

from mdlora.infra import ray_backend
from mdlora.infra.log import RAY_SKIP_LINES, quiet_ray_logs, setup_logging

PREEMPTION = (
    "[2026-12-07 20:20:07,748 E 6214 6252] core_worker.cc:2465: Actor with class name: "
    "'PreemptionWatcher' and ID: '26d661d0482c025919aafad001000000' has constructor arguments in "
    "the object store and max_restarts > 0. If the arguments in the object store go out of scope "
    "or are lost, the actor restart will fail. See https://github.com/ray-project/ray/issues/53727"
)


@pytest.fixture
def logging_state():
    """Restore the loggers setup_logging changes."""
    names = ["", "mdlora", "torch.fx._symbolic_trace"]
    saved = [(lg, lg.level, lg.handlers[:], lg.propagate) for lg in map(logging.getLogger, names)]
    yield
    for lg, level, handlers, propagate in saved:
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.propagate = propagate


def test_fbgemm_and_torch_fx_lines_are_dropped_in_a_ray_train_worker(logging_state, capsys):
    console = io.StringIO()  # Ray Train's worker setup: a console handler on the root at INFO
    logging.getLogger().addHandler(logging.StreamHandler(console))
    logging.getLogger().setLevel(logging.INFO)
    setup_logging(rank=0)
    logging.info("Successfully loaded: 'fbgemm_gpu_tbe_cache.so'")  # as fbgemm_gpu/__init__.py
    fx = logging.getLogger("torch.fx._symbolic_trace")  # torch's own handler, not the root's
    assert not fx.isEnabledFor(logging.WARNING) and fx.isEnabledFor(logging.ERROR)
    logging.getLogger("mdlora.pretrain").info("step 15 validation: WAUC 0.6564")
    logging.getLogger("torchrec.x").error("a real error")
    out = console.getvalue() + capsys.readouterr().err
    assert "Successfully loaded" not in out
    assert "a real error" in out and "step 15 validation" in out


def test_rays_filter_drops_the_preemption_watcher_line_only(monkeypatch):
    from ray._private.ray_logging import LogDeduplicator

    monkeypatch.delenv("RAY_DEDUP_LOGS_SKIP_REGEX", raising=False)
    quiet_ray_logs()
    regex = os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"]
    assert regex == "|".join(RAY_SKIP_LINES)
    other = "[2026-12-07 20:20:07,748 E 1 2] core_worker.cc:1: Actor with class name: 'RayTrainWorker' died"
    batch = {"ip": "127.0.0.1", "pid": 1, "is_err": True, "lines": [PREEMPTION, other, "step 15"]}
    kept = LogDeduplicator(5, None, regex).deduplicate(batch)[0]["lines"]
    assert kept == [other, "step 15"]
    monkeypatch.setenv("RAY_DEDUP_LOGS_SKIP_REGEX", "mine")
    quiet_ray_logs()
    quiet_ray_logs()  # idempotent; the user's regex is kept
    assert os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] == f"mine|{regex}"
    assert re.search(f"mine|{regex}", PREEMPTION)


def _worker(config: dict) -> None:
    """A module-level worker function."""


def test_worker_functions_travel_by_name_to_be_imported_after_the_logging_setup():
    assert ray_backend._by_name(_worker) == (__name__, "_worker")
    closure = lambda config: None  # noqa: E731
    assert ray_backend._by_name(closure) is closure
