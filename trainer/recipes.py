"""Build, shard and wire a pretrain run inside one worker process. No Ray, no I/O of logs.

``setup_pretrain`` is called on every rank after the process group exists (Ray Train or
torchrun made it). It builds the model on the meta device, plans and applies TorchRec
sharding, creates the dense optimiser and LR schedule, and returns the closures that save and
load this rank's checkpoint files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mdlora.atomic import write_json
from mdlora.embeddings import checkpoint as ckpt
from mdlora.embeddings import sharding
from mdlora.embeddings.schema import Schema
from mdlora.embeddings.tables import build_ebc
from mdlora.trainer.backbone import Backbone, build_backbone
from mdlora.trainer.config import DistConfig, ModelConfig, RunConfig, local_batch
from mdlora.trainer.env import DistEnv
from mdlora.trainer.loop import TrainState, lr_factor
from mdlora.trainer.task import CTRTask

STATE_FILE = "train_state.json"
PLAN_FILE = "plan.json"


@dataclass
class Setup:
    """Everything the loop needs from a built, sharded model."""

    model: torch.nn.Module
    """DistributedModelParallel(CTRTask) (a 1-rank process group at world size 1)."""
    optimizer: torch.optim.Optimizer
    """Dense Adam (embeddings are updated by the fused optimiser inside backward)."""
    scheduler: torch.optim.lr_scheduler.LRScheduler
    """Dense LR schedule (a pure function of the step)."""
    dense_params: list[torch.nn.Parameter]
    """Parameters the dense optimiser owns (for gradient clipping)."""
    plan: dict
    """JSON form of the sharding plan."""

    def save(self, directory: Path, state: TrainState) -> None:
        """Write this rank's checkpoint shards (+ state and plan on rank 0) into ``directory``."""
        ckpt.write_shards(directory, self.model, self.optimizer)
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return
        write_json(directory / STATE_FILE, state.to_dict())
        write_json(directory / PLAN_FILE, self.plan)

    def load(self, directory: Path) -> TrainState:
        """Restore weights and optimiser state from a checkpoint dir (any world size)."""
        ckpt.read_shards(directory, self.model, self.optimizer)
        return TrainState.from_dict(json.loads((directory / STATE_FILE).read_text()))


def setup_pretrain(cfg: RunConfig, env: DistEnv, schema: Schema, total_steps: int,
                   init: str | Path | None = None) -> Setup:
    """Build the backbone on meta, shard its tables over the process group, wire optimisers.

    Args:
        cfg: the run config.
        env: this rank's place in the job.
        schema: the log schema (tables, features).
        total_steps: planned optimiser steps (for the cosine schedule).
        init: warm start: a published backbone / checkpoint dir (same architecture, any world
            size or plan) whose weights and fused sparse-optimiser state are loaded into the
            sharded model; the dense optimiser starts fresh. None: random initialisation.

    Returns:
        The :class:`Setup` for :func:`mdlora.trainer.loop.train`.
    """
    torch.manual_seed(cfg.loop.seed)  # same dense init on every rank (DDP also broadcasts)
    o = cfg.optim
    task, plan, model = _sharded(schema, cfg.model, cfg.dist, env, cfg.data.batch_size,
                                 o.sparse_optimizer, o.sparse_lr)
    if init:
        ckpt.read_shards(Path(init), model)
    params = list(sharding.dense_params(model))
    optimizer = torch.optim.Adam(params, lr=o.dense_lr, weight_decay=o.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=o.warmup_steps, total=total_steps, schedule=o.schedule)
    )
    plan_view = sharding.plan_to_dict(plan, schema.tables, o.sparse_optimizer, device_type=env.device.type)
    return Setup(model, optimizer, scheduler, params, plan_view)


def plan_tables(module: torch.nn.Module, dist: DistConfig, batch_size: int, *, world_size: int | None = None,
                device: str | None = None, hbm_gb: float | None = None,
                pg: torch.distributed.ProcessGroup | None = None) -> sharding.ShardingPlan:
    """The sharding plan of ``module``'s tables under ``dist``: the one translation of a
    :class:`DistConfig` into planner arguments (pretrain, adapt, ``mdlora plan``, preflight).

    Args:
        module: unsharded model or EBC, usually on meta, sparse optimiser attached.
        dist: the run's ``dist`` section.
        batch_size: the global ``data.batch_size`` (the planner costs a rank's share).
        world_size, device, hbm_gb: overrides of ``dist`` (planning for another topology).
        pg: the process group of a running job (rank 0 plans, every rank gets its plan); None
            simulates.

    Returns:
        The ``ShardingPlan``.
    """
    world = world_size or dist.world_size
    return sharding.plan_for(
        module, world, device or dist.device, hbm_gb=dist.hbm_gb if hbm_gb is None else hbm_gb,
        sharding_types=dist.sharding_types, table_sharding=dist.table_sharding,
        batch_size=local_batch(batch_size, world), uvm=dist.uvm, host_gb=dist.host_gb,
        cache_ratio=dist.uvm_cache_ratio, pg=pg)


def _sharded(schema: Schema, model_cfg: ModelConfig, dist: DistConfig, env: DistEnv, batch_size: int,
             sparse_optimizer: str, sparse_lr: float) -> tuple[CTRTask, sharding.ShardingPlan, torch.nn.Module]:
    """CTRTask built on meta and sharded over ``env``'s process group: (unsharded task, plan, DMP)."""
    task = CTRTask(build_backbone(schema, model_cfg, build_ebc(schema, device="meta")))
    sharding.apply_sparse_optimizer(task, sparse_optimizer, sparse_lr, env.device.type)
    plan = plan_tables(task, dist, batch_size, world_size=env.world_size, device=env.device.type,
                       pg=torch.distributed.group.WORLD if env.distributed else None)
    model = sharding.shard_model(task, plan=plan, device=env.device, sparse_optimizer=sparse_optimizer,
                                 sparse_lr=sparse_lr)
    return task, plan, model


def build_frozen(backbone: RunConfig, dist: DistConfig, env: DistEnv, schema: Schema, checkpoint: str | Path,
                 batch_size: int) -> Backbone:
    """A published backbone, sharded over the process group like pretraining and frozen.

    The tables are planned under ``dist`` (any world size: DCP reshards ``checkpoint``), the
    fused kernel gets plain SGD (no optimiser state) and is never stepped, and no dense optimiser
    is made: nothing can update it (callers run it under ``torch.no_grad``).

    Args:
        backbone: the config the backbone was pretrained with (its architecture).
        dist: this job's ``dist`` section.
        env: this rank's place in the job.
        schema: the backbone's schema.
        checkpoint: the backbone version's directory.
        batch_size: the job's global batch size (for the planner's cost model).

    Returns:
        The backbone (eval mode) whose tables are this rank's shards; it lives as long as the
        returned module is referenced.
    """
    _, _, model = _sharded(schema, backbone.model, dist, env, batch_size, "sgd", backbone.optim.sparse_lr)
    task = model.module  # the sharded CTRTask without its wrappers: weights only, no optimiser state
    ckpt.read_shards(Path(checkpoint), task)
    return task.backbone.eval()


def load_unsharded(directory: str | Path, schema: Schema, model_cfg) -> CTRTask:
    """A published backbone / checkpoint loaded whole into one process (CPU, eval mode).

    The shards were written by any number of ranks under any plan; DCP reads them into
    unsharded tables here (resharding N -> 1), so predictions equal the sharded model's.
    """
    task = CTRTask(build_backbone(schema, model_cfg, build_ebc(schema, device="cpu")))
    ckpt.read_shards(Path(directory), task)
    return task.eval()
