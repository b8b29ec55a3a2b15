"""Run support shared by every stage (pretrain, adapt, score, retrain): paths, preflight checks,
caches. Stages import this module and :mod:`mdlora.infra.artifacts`, never each other (a
retrain composes the others through their public entry points only)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mdlora.config import ConfigError
from mdlora.embeddings.schema import Schema
from mdlora.infra.storage import check_writable, is_s3, open_fs
from mdlora.trainer.config import DistConfig


def _abs(path: str) -> str:
    return path if not path or is_s3(path) else os.path.abspath(path)


def resolve_paths(cfg):
    """Make every local path of a run or adapt config absolute (Ray workers do not share the
    driver's cwd); ``output.run_dir`` defaults to ``<output.root>/runs``. Returns ``cfg``."""
    for k in ("schema", "train", "val", "test"):
        setattr(cfg.data, k, _abs(getattr(cfg.data, k)))
    cfg.output.root = _abs(cfg.output.root)
    cfg.output.run_dir = _abs(cfg.output.run_dir) or os.path.join(cfg.output.root, "runs")
    return cfg


def load_schema(uri: str) -> Schema:
    """Load a schema from a local path or s3:// (ConfigError / FileNotFoundError naming it)."""
    fs, path = open_fs(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri}: schema file not found")
    import yaml

    with fs.open(path, "r") as f:
        data = yaml.safe_load(f.read()) or {}
    try:
        return Schema.from_dict(data)
    except ConfigError as e:  # name the file, as Schema.load does for local paths
        raise ConfigError(f"{uri}: {e}") from None


def check_cpus(d: DistConfig) -> None:
    """Refuse ``dist.world_size`` x ``dist.cpus_per_worker`` beyond this machine's CPUs when Ray
    is embedded (Ray Train would wait forever for CPUs that never come).

    A cluster (``dist.address`` / ``RAY_ADDRESS``) is not checked here: its autoscaler adds
    nodes when the job asks for more CPUs than it has (:func:`mdlora.infra.ray_backend.check_cluster`).

    Raises:
        ValueError: naming ``dist.world_size``, the CPUs needed and the CPUs there are.
    """
    need, have = d.world_size * d.cpus_per_worker, os.cpu_count() or 1
    if d.device == "cpu" and not (d.address or os.environ.get("RAY_ADDRESS")) and need > have:
        raise ValueError(f"dist.world_size: {d.world_size} workers x {d.cpus_per_worker} CPUs need {need} "
                         f"CPUs, this machine has {have}; lower it or set dist.address to a Ray cluster")


def check_outputs(root: str, run_dir: str) -> None:
    """Refuse an ``output.root`` / ``output.run_dir`` this process cannot write, before Ray starts
    (:func:`mdlora.infra.storage.check_writable`)."""
    check_writable(root, "output.root")
    check_writable(run_dir, "output.run_dir")


def cache_dir(run_dir: str) -> Path:
    """Local directory for artefacts fetched from an S3 registry (unused for local ones)."""
    if is_s3(run_dir):
        return Path(tempfile.gettempdir()) / "mdlora-cache"
    return Path(run_dir) / "cache"


def remove_run(uri: str) -> None:
    """Remove a finished run's directory (its checkpoints, feature cache and Ray's run state),
    local or on S3; a missing one is not an error."""
    fs, path = open_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
