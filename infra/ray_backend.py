"""The only module that imports ``ray``: TorchTrainer launch, worker context -> DistEnv, report.

Workers are Ray Train workers with a torch process group (gloo on CPU, nccl on cuda). TorchRec's
DistributedModelParallel wraps the dense part in DDP itself, so Ray's ``prepare_model`` is not
used. Checkpoints go through ``ray.train.report``: every rank writes its own DCP shard files
into a local temp dir and reports it; Ray merges the ranks' files into one checkpoint dir in
``storage_path`` (local, shared FS or s3://) and registers it only when every rank reported,
which is what makes a checkpoint commit atomic. After a worker failure
(``FailureConfig(max_failures)``) the group restarts and resumes from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mdlora import faults
from mdlora.trainer.env import DistEnv

log = logging.getLogger("mdlora.ray")
WORKER_NICENESS = 0
"""Niceness of the workers of an embedded Ray (Ray's own default is 15)."""
_EMBEDDED = [False]
"""Whether :func:`init_ray` started this process's Ray itself (else it joined a cluster)."""


@dataclass
class RunResult:
    """What a finished Ray Train run left behind."""

    checkpoint: Path | None
    """Local copy of the chosen checkpoint (best by ``score`` when given, else latest); None
    when there is none or ``local_copy`` was off."""
    metrics: dict
    """The last metrics reported by rank 0."""
    workdir: Path
    """Temp dir holding ``checkpoint``; the caller removes it."""
    uri: str | None = None
    """Where the chosen checkpoint is stored (a local path or s3://), for readers that stream it."""
    run_uri: str = ""
    """The run's directory under ``storage_path`` (its checkpoints and Ray's run state)."""
    latest_uri: str | None = None
    """Where the latest checkpoint is stored (local path or s3://): its state holds every
    evaluation of the run, the chosen (best) one only those up to it."""


def init_ray(address: str = "", num_cpus: int | None = None) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS`` (a submitted job) or start an embedded Ray."""
    from mdlora.infra.log import quiet_ray_logs

    quiet_ray_logs()  # before ray is imported: it reads its log filter then
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    _EMBEDDED[0] = not address
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Ray starts workers at nice 15, below its own nice-0 daemons and every other process:
        # on a small shared host the trainers then stall whenever anything else runs (at world
        # size 1 one descheduled OpenMP thread stalls the step). This Ray serves this job only,
        # so its trainers run at the normal priority (an explicit env value wins).
        os.environ.setdefault("RAY_worker_niceness", str(WORKER_NICENESS))
        # the dashboard (127.0.0.1 only) serves the state API Ray Train's controller polls
        ray.init(num_cpus=num_cpus or os.cpu_count(), dashboard_host="127.0.0.1",
                 configure_logging=False, log_to_driver=True)


def run_workers(
    fn: Callable[[dict], None], config: dict, *, world_size: int, device: str, cpus_per_worker: int,
    max_failures: int, storage_path: str, name: str, score: str | None = None, keep: int = 3,
    local_copy: bool = True,
) -> RunResult:
    """Run ``fn(config)`` on ``world_size`` Ray Train workers; return the chosen checkpoint.

    Args:
        fn: the worker function (module-level, importable by workers).
        config: JSON-able config passed to every worker.
        world_size: number of workers (ranks).
        device: ``cpu`` (gloo) or ``cuda`` (nccl, one GPU per worker).
        cpus_per_worker: CPUs reserved per worker.
        max_failures: worker-group restarts tolerated (resume from the latest checkpoint).
        storage_path: where Ray persists checkpoints (absolute local path or s3://).
        name: run name (a subdirectory of ``storage_path``; reusing it resumes that run).
        score: metric that ranks checkpoints (max is best); None keeps the latest.
        keep: checkpoints kept (the latest is always kept too).
        local_copy: copy the chosen checkpoint to a local temp dir (off: read it at ``uri``).

    Returns:
        A :class:`RunResult` with the best (or latest) checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        functools.partial(_entry, _by_name(fn), faults.armed()),
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=world_size, use_gpu=device == "cuda",
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if device == "cuda" else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if device == "cuda" else "gloo"),
        run_config=RunConfig(
            name=name, storage_path=_storage(storage_path), storage_filesystem=_filesystem(storage_path),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute=score,
                                               checkpoint_score_order="max"),
        ),
    )
    result = trainer.fit()
    chosen = result.checkpoint
    if score and result.best_checkpoints:
        chosen = result.get_best_checkpoint(metric=score, mode="max") or chosen
    workdir = Path(tempfile.mkdtemp(prefix="mdlora-ckpt-"))
    local = Path(chosen.to_directory(str(workdir / "checkpoint"))) if chosen and local_copy else None
    s3 = storage_path.startswith("s3://")
    where = lambda c: None if c is None else ("s3://" + c.path.lstrip("/") if s3 else c.path)  # noqa: E731
    run_uri = f"{storage_path.rstrip('/')}/{name}" if s3 else os.path.join(_storage(storage_path), name)
    return RunResult(checkpoint=local, metrics=dict(result.metrics or {}), workdir=workdir, uri=where(chosen),
                     run_uri=run_uri, latest_uri=where(result.checkpoint))


def _by_name(fn: Callable[[dict], None]) -> Callable[[dict], None] | tuple[str, str]:
    """``fn`` as ``(module, qualname)`` when it can be imported by that name, else ``fn``."""
    try:
        found = functools.reduce(getattr, fn.__qualname__.split("."), sys.modules[fn.__module__])
    except (AttributeError, KeyError):  # a partial, a closure, a lambda: it travels as it is
        return fn
    return (fn.__module__, fn.__qualname__) if found is fn else fn


def _entry(fn: Callable[[dict], None] | tuple[str, str], armed: dict[str, str], config: dict) -> None:
    """Every worker: the driver's armed test faults, quiet library loggers, mdlora progress on
    rank 0 only, then ``fn``.

    ``fn`` comes by name and is imported after the logging setup: importing a worker function's
    module imports torchrec, whose fbgemm logs at INFO on import (see ``infra/log.py``).
    """
    import ray.train

    from mdlora.infra.log import setup_logging

    faults.arm(armed)
    setup_logging(ray.train.get_context().get_world_rank())
    if isinstance(fn, tuple):
        module, name = fn
        fn = functools.reduce(getattr, name.split("."), importlib.import_module(module))
    fn(config)


def _storage(path: str) -> str:
    return path[len("s3://"):] if path.startswith("s3://") else os.path.abspath(path)


def _filesystem(path: str):
    """pyarrow filesystem for S3 storage built from mdlora.infra.storage's fsspec options, else None."""
    if not path.startswith("s3://"):
        return None
    import pyarrow.fs

    from mdlora.infra.storage import open_fs

    fs, _ = open_fs(path)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def worker_env(device: str) -> DistEnv:
    """This worker's :class:`DistEnv` from the Ray Train context (read once per worker)."""
    import ray.train

    ctx = ray.train.get_context()
    local = ctx.get_local_rank()
    dev = torch.device(f"cuda:{local}") if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    return DistEnv(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), local_rank=local, device=dev)


@contextlib.contextmanager
def resume_dir() -> Iterator[Path | None]:
    """The latest committed checkpoint of this run as a local dir, or None on a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as d:
        yield Path(d)


def report(metrics: dict, save: Callable[[Path], None] | None) -> None:
    """Report metrics (every rank); with ``save``, this rank's checkpoint files go along."""
    import ray.train

    clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}
    if save is None:
        ray.train.report(clean)
        return
    tmp = Path(tempfile.mkdtemp(prefix="mdlora-rank-ckpt-"))
    try:
        save(tmp)
        ray.train.report(clean, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # The controller registers a reported checkpoint on its next poll of the workers; a worker
    # killed before that poll would lose it. Wait until it is registered (committed), so a
    # failure never costs more than the steps since the last checkpoint.
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def map_tasks(fn: Callable, items: list, num_cpus: int = 1) -> list:
    """``[fn(item) for item in items]`` as parallel Ray tasks (``num_cpus`` each), results in order.

    Args:
        fn: a module-level (picklable) function of one argument.
        items: its arguments (small: large data is read by the task itself).
        num_cpus: CPUs reserved per task.

    Returns:
        The results, in the order of ``items``.

    Raises:
        Exception: the first failed task's own exception (not Ray's wrapper, whose message is
            the remote traceback), after the other tasks were cancelled and have stopped, so
            nothing they write lands after the caller cleaned up.
    """
    import ray

    remote = ray.remote(num_cpus=num_cpus, max_retries=1)(fn)
    refs = [remote.remote(item) for item in items]
    try:
        return ray.get(refs)
    except Exception as e:
        for ref in refs:
            ray.cancel(ref)
        ray.wait(refs, num_returns=len(refs), timeout=60)
        cause = getattr(e, "cause", None)
        if isinstance(e, ray.exceptions.RayTaskError) and isinstance(cause, Exception):
            raise cause from e
        raise


def check_cluster(world_size: int, cpus_per_worker: int, device: str) -> None:
    """Refuse a CPU job an embedded Ray cannot place; on a cluster, warn and let it wait.

    A joined cluster (``dist.address`` / ``RAY_ADDRESS``: KubeRay, the cluster launcher) may
    autoscale: a job asking for more CPUs than it has now is what makes it add nodes, so refusing
    it would make a scaled-down cluster refuse every nightly retrain.

    Raises:
        ValueError: the embedded Ray has fewer CPUs than ``world_size`` x ``cpus_per_worker``.
    """
    import ray

    need, have = world_size * cpus_per_worker, available_cpus()
    if device != "cpu" or have >= need:
        return
    if _EMBEDDED[0]:
        raise ValueError(f"dist.world_size: {world_size} workers x {cpus_per_worker} CPUs need {need} CPUs, "
                         f"the embedded Ray has {have}")
    log.warning("the Ray cluster at %s has %d CPUs now, this job needs %d: it waits until the cluster's "
                "autoscaler adds nodes", ray.get_runtime_context().gcs_address, have, need)


def available_cpus() -> int:
    """CPUs of the Ray cluster this process is connected to (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
