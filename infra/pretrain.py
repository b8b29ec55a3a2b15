"""``mdlora pretrain``: Ray Train workers running the TorchRec-sharded backbone, then publish.

Data parallelism: every worker streams its own contiguous share of the (per-epoch permuted)
Parquet row groups with :class:`mdlora.infra.logs.LogDataset` — rows per rank differ by at most one,
so every rank runs exactly the same number of steps and the sharded all-to-all never waits on
a rank that ran dry. We chose per-worker file shards over Ray Data because TorchRec needs the
Arrow -> KJT conversion on the rank that trains (no object-store round trip), the shard of
each rank is known from Parquet metadata alone, and the conversion runs in a prefetch thread
next to the training step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from mdlora.adapters.registry import Registry
from mdlora.embeddings import sharding
from mdlora.embeddings.batch import BatchConverter, LogValidationError, find_problems
from mdlora.embeddings.schema import Schema
from mdlora.embeddings.sharding import format_plan
from mdlora.embeddings.tables import build_ebc
from mdlora.infra import ray_backend
from mdlora.infra.logs import LogDataset
from mdlora.infra.storage import check_writable, is_s3, open_fs
from mdlora import __version__
from mdlora.artifact import seal
from mdlora.atomic import write_json
from mdlora.config import ConfigError, from_dict, to_dict
from mdlora.trainer.config import DistConfig, RunConfig
from mdlora.trainer.loop import Hooks, train
from mdlora.trainer.recipes import STATE_FILE, setup_pretrain

log = logging.getLogger("mdlora.pretrain")


def _abs(path: str) -> str:
    return path if not path or is_s3(path) else os.path.abspath(path)


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """Make every local path absolute (Ray workers do not share the driver's cwd)."""
    for k in ("schema", "train", "val", "test"):
        setattr(cfg.data, k, _abs(getattr(cfg.data, k)))
    cfg.output.root = _abs(cfg.output.root)
    cfg.output.run_dir = _abs(cfg.output.run_dir) or os.path.join(cfg.output.root, "runs")
    return cfg


def load_schema(uri: str) -> Schema:
    """Load a schema from a local path or s3://."""
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


def datasets(cfg: RunConfig, schema: Schema) -> tuple[LogDataset, LogDataset | None]:
    """Train and (optional) validation datasets with the run's window and domain filters."""
    kw = {"window": cfg.data.window, "domains": cfg.data.domains or None}
    train_ds = LogDataset(cfg.data.train, schema, **kw)
    val_ds = LogDataset(cfg.data.val, schema, domains=cfg.data.domains or None) if cfg.data.val else None
    return train_ds, val_ds


def preflight(cfg: RunConfig, schema: Schema, logs: list[LogDataset]) -> None:
    """Refuse in the driver, before Ray starts, what would otherwise fail (or hang) in the workers.

    * ``dist.world_size`` x ``dist.cpus_per_worker`` must fit this machine's CPUs when Ray is
      embedded (Ray Train would wait for the missing CPUs forever);
    * the tables must be shardable over ``dist.world_size`` ranks with the allowed sharding types
      (the same planner call as ``mdlora plan``, on the meta device);
    * every log dataset must have the schema's columns, and the first record batch of its first
      file must convert cleanly (a cheap probe: the converter still checks every batch);
    * ``output.root`` and ``output.run_dir`` must be writable (:func:`check_outputs`).

    Raises:
        ValueError: naming the config key, table, file, column or value at fault.
    """
    d = cfg.dist
    check_cpus(d)
    ebc = build_ebc(schema)  # meta: nothing is allocated
    sharding.apply_sparse_optimizer(ebc, cfg.optim.sparse_optimizer, cfg.optim.sparse_lr, d.device)
    try:
        sharding.plan_for(ebc, d.world_size, d.device, hbm_gb=d.hbm_gb, sharding_types=d.sharding_types,
                          table_sharding=d.table_sharding, batch_size=max(1, cfg.data.batch_size // d.world_size))
    except sharding.ShardShapeError as e:
        raise sharding.ShardShapeError(f"{cfg.data.schema}: {e}") from None
    for data in logs:
        if data.missing_columns:
            raise LogValidationError(f"{data.uri}: missing column {data.missing_columns[0]!r} "
                                     f"(schema columns: {schema.columns()})")
        for piece in data.fragments()[:1]:  # no piece: an empty dataset, reported by its reader
            problems = find_problems(schema, next(iter(data.read_piece(piece))))
            if problems:
                raise LogValidationError(problems[0].message(piece.path))
    check_outputs(cfg.output.root, cfg.output.run_dir)  # not after an hour of training


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


def worker(config: dict) -> None:
    """One Ray Train worker: build + shard, resume if a checkpoint exists, train, report."""
    cfg = from_dict(RunConfig, config["run"])
    if config.get("fault_write"):  # reliability tests: see mdlora.atomic._fault_point
        os.environ["MDLORA_FAULT_WRITE"] = config["fault_write"]
    env = ray_backend.worker_env(cfg.dist.device)
    torch.set_num_threads(cfg.dist.cpus_per_worker)
    schema = load_schema(cfg.data.schema)
    train_ds, val_ds = datasets(cfg, schema)
    local_batch = max(1, cfg.data.batch_size // env.world_size)
    steps = train_ds.num_batches(local_batch, env.world_size)
    if steps < 1:
        raise ValueError(f"{cfg.data.train}: fewer rows than one batch of {cfg.data.batch_size} per "
                         f"{env.world_size} workers; lower data.batch_size")
    total = cfg.loop.max_steps or steps * cfg.loop.epochs
    setup = setup_pretrain(cfg, env, schema, total, init=config.get("init") or None)
    if env.is_main:
        log.info("sharding plan (%d ranks):\n%s", env.world_size, format_plan(setup.plan))
    conv = BatchConverter(schema)
    def train_batches(epoch: int):
        batches = train_ds.iter_batches(
            local_batch, rank=env.rank, world_size=env.world_size, epoch=epoch, seed=cfg.loop.seed,
            shuffle=cfg.data.shuffle, prefetch=cfg.data.prefetch, converter=conv)
        return _inject_fault(batches, config.get("fault", ""), env.rank, epoch * steps)

    hooks = Hooks(
        train_batches=train_batches,
        val_batches=(lambda: val_ds.iter_batches(
            local_batch, rank=env.rank, world_size=env.world_size, shuffle=False, drop_last=False,
            prefetch=cfg.data.prefetch, converter=conv)) if val_ds else None,
        report=ray_backend.report,
        steps_per_epoch=steps,
    )
    state = None
    with ray_backend.resume_dir() as d:
        if d is not None:
            state = setup.load(d)
            state.resumed_from.append(state.step)
            if env.is_main:
                log.info("resumed from step %d (epoch %d)", state.step, state.epoch)
    train(setup.model, setup.optimizer, setup.scheduler, setup.dense_params, cfg.loop,
          cfg.optim.clip_norm, env, hooks, schema.domain.values, setup.save, state)


def _inject_fault(batches, spec: str, rank: int, first_step: int):
    """Fault injection for reliability tests: ``spec = "RANK:STEP:MARKER"`` SIGKILLs this worker
    process once, just before it trains global step STEP (MARKER file makes it happen once)."""
    kill_rank, kill_step, marker = (spec.split(":", 2) + ["", ""])[:3] if spec else ("-1", "0", "")
    for i, batch in enumerate(batches):
        if rank == int(kill_rank) and first_step + i + 1 == int(kill_step) and not os.path.exists(marker):
            Path(marker).write_text(str(kill_step))
            os.kill(os.getpid(), signal.SIGKILL)
        yield batch


def pretrain(cfg: RunConfig, *, run_name: str | None = None) -> dict:
    """Train the backbone on ``cfg.dist.world_size`` workers and publish it; returns a summary.

    Args:
        cfg: the run config.
        run_name: the Ray Train run (its checkpoints under ``output.run_dir``; a rerun of the
            same name resumes from them) and, when given, the ``run`` recorded in the published
            manifest (see :func:`find_published`).

    Returns:
        ``{"name", "version", "path", "content_hash", "metrics", "step", "seconds"}``.
    """
    cfg = resolve_paths(cfg)
    schema = load_schema(cfg.data.schema)
    train_ds, val_ds = datasets(cfg, schema)  # fails fast on a missing/empty dataset
    if train_ds.num_batches(max(1, cfg.data.batch_size // cfg.dist.world_size), cfg.dist.world_size) < 1:
        raise ValueError(f"{cfg.data.train}: fewer rows than one global batch ({cfg.data.batch_size})")
    preflight(cfg, schema, [train_ds] + ([val_ds] if val_ds else []))
    init = warm_start(cfg, schema)
    t0 = time.time()
    ray_backend.init_ray(cfg.dist.address)
    ray_backend.check_cluster(cfg.dist.world_size, cfg.dist.cpus_per_worker, cfg.dist.device)
    result = ray_backend.run_workers(
        worker, {"run": to_dict(cfg), "fault": os.environ.get("MDLORA_FAULT_KILL", ""),
                 "fault_write": os.environ.get("MDLORA_FAULT_WRITE", ""), "init": init}, world_size=cfg.dist.world_size, device=cfg.dist.device,
        cpus_per_worker=cfg.dist.cpus_per_worker, max_failures=cfg.dist.max_failures,
        storage_path=cfg.output.run_dir, name=run_name or f"{cfg.output.model}-{int(t0)}",
        score="wauc" if cfg.data.val else None,
    )
    try:
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        summary = publish_backbone(cfg, schema, result.checkpoint, run=run_name or "")
    finally:
        shutil.rmtree(result.workdir, ignore_errors=True)
    summary["seconds"] = round(time.time() - t0, 1)
    return summary


def cache_dir(run_dir: str) -> Path:
    """Local directory for artefacts fetched from an S3 registry (unused for local ones)."""
    if is_s3(run_dir):
        return Path(tempfile.gettempdir()) / "mdlora-cache"
    return Path(run_dir) / "cache"


def warm_start(cfg: RunConfig, schema: Schema) -> str:
    """Resolve ``model.init_from`` to a local copy of that backbone; pins the version in ``cfg``.

    Returns:
        The local directory of the backbone version, or '' when ``model.init_from`` is unset.

    Raises:
        ConfigError: the backbone's schema hash or architecture differs from this run's.
    """
    if not cfg.model.init_from:
        return ""
    registry = Registry(*open_fs(cfg.output.root))
    version = Path(registry.resolve("backbones", cfg.output.model, cfg.model.init_from)).name
    path = registry.fetch("backbones", cfg.output.model, version, cache_dir(cfg.output.run_dir))
    parent = from_dict(RunConfig, json.loads((path / "config.json").read_text()))
    what = f"model.init_from: backbone {cfg.output.model} {version}"
    if Schema.load(path / "schema.yaml").content_hash() != schema.content_hash():
        raise ConfigError(f"{what} was trained with another schema than {cfg.data.schema} (schema hash differs)")
    if replace(parent.model, init_from="") != replace(cfg.model, init_from=""):
        raise ConfigError(f"{what} has architecture {to_dict(parent.model)}, this run {to_dict(cfg.model)}")
    cfg.model.init_from = version
    log.info("warm start from backbone %s %s", cfg.output.model, version)
    return str(path)


def find_published(cfg: RunConfig, run: str) -> dict | None:
    """The summary (as :func:`pretrain` returns it) of the backbone published by the run named
    ``run``, or None: a job that died after publishing, rerun, takes it instead of training and
    publishing a second version."""
    registry = Registry(*open_fs(cfg.output.root))
    model = cfg.output.model
    version = registry.find("backbones", model, "run", run) if run else None
    if version is None:
        return None
    manifest = registry.manifest("backbones", model, version)
    metrics = json.loads(registry.read_text("backbones", model, version, "metrics.json"))
    log.info("backbone %s %s was already published by run %s: reusing it", model, version, run)
    return {"name": model, "version": version, "path": registry.resolve("backbones", model, version),
            "content_hash": manifest["content_hash"], "metrics": metrics["final"], "step": manifest["step"]}


def publish_backbone(cfg: RunConfig, schema: Schema, checkpoint: Path, run: str = "") -> dict:
    """Publish a checkpoint dir as ``backbones/<model>/vNNNN`` with its manifest (written last);
    ``run`` (the run's name) is recorded in the manifest for :func:`find_published`."""
    state = json.loads((checkpoint / STATE_FILE).read_text())
    schema.dump(checkpoint / "schema.yaml")
    write_json(checkpoint / "config.json", to_dict(cfg))
    metrics = state["history"][-1] if state["history"] else {}
    write_json(checkpoint / "metrics.json", {"final": metrics, "best_wauc": state["best_wauc"],
                                              "best_step": state["best_step"], "history": state["history"]})
    manifest = seal(checkpoint, {
        "format_version": 1, "kind": "backbone", "name": cfg.output.model,
        "schema_hash": schema.content_hash(), "code_version": __version__,
        "data_window": cfg.data.window, "step": state["step"], "run": run,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    content_hash = manifest["content_hash"]
    fs, root = open_fs(cfg.output.root)
    registry = Registry(fs, root)
    version = registry.publish("backbones", cfg.output.model, checkpoint)
    if "production" not in registry.aliases("backbones", cfg.output.model):
        registry.promote("backbones", cfg.output.model, version)  # the first version serves at once
    path = registry.resolve("backbones", cfg.output.model, version)
    log.info("published backbone %s %s (content hash %s) at %s", cfg.output.model, version, content_hash[:12], path)
    return {"name": cfg.output.model, "version": version, "path": path, "content_hash": content_hash,
            "metrics": metrics, "step": state["step"]}
