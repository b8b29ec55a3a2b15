"""The training loop: train step, progress, validation, early stopping, checkpoint, report.

It knows nothing of Ray or storage: infra passes a :class:`Hooks` whose ``report`` forwards
metrics (and, when asked, a checkpoint writer) to Ray Train, or writes locally in tests.
Every rank runs the same loop and calls ``report`` the same number of times (Ray's report is a
barrier; DMP's all-to-all needs the same number of batches on every rank).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import torch

from mdlora import faults
from mdlora.embeddings.batch import Batch
from mdlora.trainer.config import LoopConfig
from mdlora.trainer.env import DistEnv
from mdlora.trainer.metrics import DomainMetrics

log = logging.getLogger("mdlora.loop")


class DataExhaustedError(Exception):
    """Raised when an epoch yields no batch at all (dataset smaller than one global batch)."""


@dataclass
class TrainState:
    """What a checkpoint must restore besides the weights."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_wauc: float = -math.inf
    best_step: int = 0
    evals_since_best: int = 0
    samples: int = 0
    history: list[dict] = field(default_factory=list)
    """Validation/report metrics, one entry per evaluation."""
    losses: list[list[float]] = field(default_factory=list)
    """``[step, mean training loss since the previous entry]`` at every progress line."""
    resumed_from: list[int] = field(default_factory=list)
    """Steps this run resumed from after a failure (steps lost = failure step - resumed step)."""

    def to_dict(self) -> dict:
        """JSON-able copy (infinite best_wauc written as None)."""
        d = asdict(self)
        d["best_wauc"] = None if math.isinf(self.best_wauc) else self.best_wauc
        return d

    @staticmethod
    def from_dict(d: dict) -> TrainState:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["best_wauc"] = -math.inf if d.get("best_wauc") is None else d["best_wauc"]
        return TrainState(**d)


@dataclass
class Hooks:
    """Callbacks from the loop to its host (Ray or a local harness).

    Attributes:
        train_batches: ``epoch -> iterator`` of this rank's training batches (same count on
            every rank).
        val_batches: ``() -> iterator`` of this rank's validation batches (counts may differ
            by one batch; the loop pads), or None for no validation.
        report: ``(metrics, save)``; ``save`` is None or a function ``dir -> None`` that writes
            this rank's checkpoint files into ``dir``. Called on every rank.
        steps_per_epoch: batches per epoch on each rank (for ETA and LR schedules).
    """

    train_batches: Callable[[int], Iterable[Batch]]
    val_batches: Callable[[], Iterable[Batch]] | None
    report: Callable[[dict, Callable[[Path], None] | None], None]
    steps_per_epoch: int


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Dense learning-rate multiplier at ``step``: linear warm-up, then constant or cosine."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine" and total > warmup:
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch,
               dense_params: list[torch.nn.Parameter], clip_norm: float) -> torch.Tensor:
    """One step: forward, backward (fused sparse update happens inside), clip, dense update.

    Returns:
        The detached scalar loss of this rank's batch.
    """
    optimizer.zero_grad(set_to_none=True)
    loss, _ = model(batch)
    loss.backward()
    if clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(dense_params, clip_norm)
    optimizer.step()
    return loss.detach()


def _synced(batches: Iterable[Batch], env: DistEnv) -> Iterator[tuple[Batch, bool]]:
    """Yield ``(batch, real)`` until every rank is out of batches; exhausted ranks repeat
    their last batch with ``real=False`` so sharded lookups stay in lock-step."""
    it, last = iter(batches), None
    while True:
        batch = next(it, None)
        batch = None if batch is not None and len(batch) == 0 else batch  # ranks' last batches may be empty
        more = torch.tensor([0 if batch is None else 1])
        if env.distributed:
            torch.distributed.all_reduce(more, op=torch.distributed.ReduceOp.MAX)
        if not more.item():
            return
        if batch is None and last is None:
            raise DataExhaustedError(f"rank {env.rank} has no validation rows")
        yield (batch, True) if batch is not None else (last, False)
        last = batch if batch is not None else last


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[Batch], env: DistEnv, domains: list[str]) -> dict:
    """Exact per-domain AUC/LogLoss/WAUC over all ranks' validation rows."""
    model.eval()
    metrics = DomainMetrics(domains)
    for batch, real in _synced(batches, env):
        _, (_, logits, labels) = model(batch.to(env.device))
        if real:
            metrics.update(torch.sigmoid(logits).cpu(), labels.cpu(), batch.domains.cpu())
    model.train()
    return metrics.compute(gather=env.distributed)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, dense_params: list,
          cfg: LoopConfig, clip_norm: float, env: DistEnv, hooks: Hooks, domains: list[str],
          save: Callable[[Path, TrainState], None], state: TrainState | None = None) -> TrainState:
    """Run epochs until done, ``max_steps`` or early stopping; returns the final state.

    ``save(dir, state)`` writes this rank's checkpoint files; it is handed to ``hooks.report``
    whenever a checkpoint is due (every ``checkpoint_every`` steps, each evaluation, the end).
    """
    state = state or TrainState()
    total = cfg.max_steps or hooks.steps_per_epoch * cfg.epochs
    meter, stop = _Meter(), False
    model.train()
    while not stop and state.epoch < cfg.epochs:
        # resume mid-epoch: the epoch's batch order is a pure function of (seed, epoch)
        for batch in islice(hooks.train_batches(state.epoch), state.step_in_epoch, None):
            faults.before_step(env.rank, state.step + 1)  # reliability tests only (unarmed: a no-op)
            loss = train_step(model, optimizer, batch.to(env.device), dense_params, clip_norm)
            scheduler.step()
            state.step, state.step_in_epoch = state.step + 1, state.step_in_epoch + 1
            state.samples += len(batch) * env.world_size
            meter.add(loss, len(batch) * env.world_size)
            if cfg.log_every and state.step % cfg.log_every == 0:
                meter.log(env, state, total)
            if cfg.max_steps and state.step >= cfg.max_steps:
                stop = True
                break
            if hooks.val_batches and cfg.eval_every and state.step % cfg.eval_every == 0:
                if stop := _validate_and_report(model, env, hooks, domains, state, cfg, save):
                    break
            elif cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                hooks.report({"step": state.step, "loss": float(loss)}, lambda d: save(d, state))
        else:  # the epoch ran out of batches
            if state.step_in_epoch == 0:
                raise DataExhaustedError(f"epoch {state.epoch} yielded no batch on rank {env.rank}")
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
            if state.epoch < cfg.epochs:
                stop = _validate_and_report(model, env, hooks, domains, state, cfg, save)
    # final validation + checkpoint, unless the last step was just validated (early stop)
    if not state.history or state.history[-1]["step"] != state.step:
        _validate_and_report(model, env, hooks, domains, state, cfg, save)
    return state


def _validate_and_report(model, env, hooks, domains, state, cfg, save) -> bool:
    metrics = {"step": state.step, "epoch": state.epoch, "samples": state.samples}
    stop = False
    if hooks.val_batches is not None:
        val = evaluate(model, hooks.val_batches(), env, domains)
        wauc = val["wauc"] if val["wauc"] is not None else -math.inf
        if wauc > state.best_wauc:
            state.best_wauc, state.best_step, state.evals_since_best = wauc, state.step, 0
        else:
            state.evals_since_best += 1
        stop = bool(cfg.patience) and state.evals_since_best >= cfg.patience
        metrics.update(wauc=val["wauc"], auc=val["auc"], logloss=val["logloss"], ne=val["ne"],
                       calibration=val["calibration"], val=val)
        if env.is_main:
            nan = float("nan")
            log.info("step %d validation: WAUC %.4f AUC %.4f LogLoss %.4f NE %.4f%s", state.step,
                     val["wauc"] or nan, val["auc"] or nan, val["logloss"], val["ne"] or nan,
                     " (early stop)" if stop else "")
    state.history.append(metrics)
    hooks.report(metrics, lambda d: save(d, state))
    return stop


class _Meter:
    """Loss and throughput over the steps since the last progress line."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.samples, self.t0 = 0, time.perf_counter()

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.losses.append(loss)
        self.samples += samples

    def log(self, env: DistEnv, state: TrainState, total: int) -> None:
        now = time.perf_counter()
        if self.losses:
            loss = torch.stack(self.losses).mean().item()
            state.losses.append([state.step, loss])
            rate = self.samples / max(now - self.t0, 1e-9)
            eta = (total - state.step) * (self.samples / len(self.losses)) / max(rate, 1e-9)
            if env.is_main:
                log.info("step %d/%d epoch %d loss %.4f %.0f samples/s ETA %.0fs",
                         state.step, total, state.epoch, loss, rate, eta)
        self.losses, self.samples, self.t0 = [], 0, now
