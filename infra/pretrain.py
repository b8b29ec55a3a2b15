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
import shutil
import time
from dataclasses import replace

import torch

from mdlora.config import ConfigError, from_dict, to_dict
from mdlora.embeddings import sharding
from mdlora.embeddings.batch import BatchConverter, LogValidationError, find_problems
from mdlora.embeddings.schema import Schema
from mdlora.embeddings.sharding import format_plan
from mdlora.embeddings.tables import build_ebc
from mdlora.infra import ray_backend, tracking
from mdlora.infra.artifacts import open_backbone, publish_backbone
from mdlora.infra.logs import LogDataset
from mdlora.infra.runs import cache_dir, check_cpus, check_outputs, load_schema, resolve_paths
from mdlora.infra.storage import open_fs
from mdlora.trainer.config import RunConfig, local_batch
from mdlora.trainer.loop import Hooks, train
from mdlora.trainer.recipes import STATE_FILE, plan_tables, setup_pretrain

log = logging.getLogger("mdlora.pretrain")


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
    check_cpus(cfg.dist)
    ebc = build_ebc(schema)  # meta: nothing is allocated
    sharding.apply_sparse_optimizer(ebc, cfg.optim.sparse_optimizer, cfg.optim.sparse_lr, cfg.dist.device)
    try:
        plan_tables(ebc, cfg.dist, cfg.data.batch_size)
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


def worker(config: dict) -> None:
    """One Ray Train worker: build + shard, resume if a checkpoint exists, train, report."""
    cfg = from_dict(RunConfig, config["run"])
    env = ray_backend.worker_env(cfg.dist.device)
    torch.set_num_threads(cfg.dist.cpus_per_worker)
    schema = load_schema(cfg.data.schema)
    train_ds, val_ds = datasets(cfg, schema)
    local = local_batch(cfg.data.batch_size, env.world_size)
    steps = train_ds.num_batches(local, env.world_size)
    if steps < 1:
        raise ValueError(f"{cfg.data.train}: fewer rows than one batch of {cfg.data.batch_size} per "
                         f"{env.world_size} workers; lower data.batch_size")
    total = cfg.loop.max_steps or steps * cfg.loop.epochs
    setup = setup_pretrain(cfg, env, schema, total, init=config.get("init") or None)
    if env.is_main:
        log.info("sharding plan (%d ranks):\n%s", env.world_size, format_plan(setup.plan))
    conv = BatchConverter(schema)
    hooks = Hooks(
        train_batches=lambda epoch: train_ds.iter_batches(
            local, rank=env.rank, world_size=env.world_size, epoch=epoch, seed=cfg.loop.seed,
            shuffle=cfg.data.shuffle, prefetch=cfg.data.prefetch, converter=conv),
        val_batches=(lambda: val_ds.iter_batches(
            local, rank=env.rank, world_size=env.world_size, shuffle=False, drop_last=False,
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


def pretrain(cfg: RunConfig, *, run_name: str | None = None) -> dict:
    """Train the backbone on ``cfg.dist.world_size`` workers and publish it; returns a summary.
    The job is one MLflow run of ``cfg.tracking`` (:mod:`mdlora.infra.tracking`).

    Args:
        cfg: the run config.
        run_name: the Ray Train run (its checkpoints under ``output.run_dir``; a rerun of the
            same name resumes from them) and, when given, the ``run`` recorded in the published
            manifest (see :func:`mdlora.infra.artifacts.find_backbone`).

    Returns:
        ``{"name", "version", "path", "content_hash", "metrics", "step", "seconds"}``.
    """
    cfg = resolve_paths(cfg)
    schema = load_schema(cfg.data.schema)
    train_ds, val_ds = datasets(cfg, schema)  # fails fast on a missing/empty dataset
    if train_ds.num_batches(local_batch(cfg.data.batch_size, cfg.dist.world_size), cfg.dist.world_size) < 1:
        raise ValueError(f"{cfg.data.train}: fewer rows than one global batch ({cfg.data.batch_size})")
    preflight(cfg, schema, [train_ds] + ([val_ds] if val_ds else []))
    t0 = time.time()
    name = run_name or f"{cfg.output.model}-{int(t0)}"
    with tracking.track(cfg.tracking, cfg.output, job="pretrain", name=name,
                        tags={"mdlora.run_key": run_name, "mdlora.data_window": cfg.data.window or "all"}) as tracker:
        init = warm_start(cfg, schema)
        tracker.params(cfg)
        ray_backend.init_ray(cfg.dist.address)
        ray_backend.check_cluster(cfg.dist.world_size, cfg.dist.cpus_per_worker, cfg.dist.device)
        result = ray_backend.run_workers(
            worker, {"run": to_dict(cfg), "init": init}, world_size=cfg.dist.world_size, device=cfg.dist.device,
            cpus_per_worker=cfg.dist.cpus_per_worker, max_failures=cfg.dist.max_failures,
            storage_path=cfg.output.run_dir, name=name, score="wauc" if cfg.data.val else None,
        )
        try:
            if result.checkpoint is None:
                raise RuntimeError("training finished without a checkpoint")
            summary = publish_backbone(cfg, schema, result.checkpoint, run=run_name or "")
        finally:
            shutil.rmtree(result.workdir, ignore_errors=True)
        summary["seconds"] = round(time.time() - t0, 1)
        if tracker.active:
            _track(tracker, summary, result.latest_uri, schema.content_hash())
    return summary


def _track(tracker: tracking.Tracker, summary: dict, latest: str | None, schema_hash: str) -> None:
    """Every evaluation of the run (read from its latest checkpoint's state), the training loss,
    and the published backbone's registry links."""
    state = {}
    if latest:
        fs, path = open_fs(latest)
        try:
            with fs.open(f"{path.rstrip('/')}/{STATE_FILE}", "r") as f:
                state = json.load(f)
        except (OSError, ValueError) as e:  # published already: the history is not worth failing the job
            log.warning("tracking: no evaluation history from %s: %s", latest, e)
    tracking.log_history(tracker, state.get("history", []), state.get("losses", []))
    tracker.tags({"mdlora.backbone_hash": summary["content_hash"], "mdlora.backbone_version": summary["version"],
                  "mdlora.registry": summary["path"], "mdlora.schema_hash": schema_hash})
    tracker.metrics({"final/step": summary["step"], "seconds": summary["seconds"]}, summary["step"])


def warm_start(cfg: RunConfig, schema: Schema) -> str:
    """Resolve ``model.init_from`` to a local copy of that backbone; pins the version in ``cfg``.

    Returns:
        The local directory of the backbone version, or '' when ``model.init_from`` is unset.

    Raises:
        ConfigError: the backbone's schema hash or architecture differs from this run's.
    """
    if not cfg.model.init_from:
        return ""
    parent = open_backbone(cfg.output.root, cfg.output.model, cfg.model.init_from, cache_dir(cfg.output.run_dir))
    what = f"model.init_from: backbone {cfg.output.model} {parent.version}"
    if parent.schema.content_hash() != schema.content_hash():
        raise ConfigError(f"{what} was trained with another schema than {cfg.data.schema} (schema hash differs)")
    if replace(parent.run.model, init_from="") != replace(cfg.model, init_from=""):
        raise ConfigError(f"{what} has architecture {to_dict(parent.run.model)}, this run {to_dict(cfg.model)}")
    cfg.model.init_from = parent.version
    log.info("warm start from backbone %s %s", cfg.output.model, parent.version)
    return str(parent.path)
