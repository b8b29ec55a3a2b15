"""Experiment tracking: the only module that imports ``mlflow`` and ``tensorboardX``.

Every job (pretrain, adapt, add-domain, score, retrain) opens one MLflow run with :func:`track`
before it starts work, so a bad ``tracking.uri`` fails in seconds, not after training. A run holds:

* **params**: the job's config, flattened to dotted keys (``loop.epochs``, ``output.root``);
* **metrics**: per evaluation (``step``) and per domain, ``<split>/<domain>/<metric>``
  (``val/a/auc``), plus run-level figures; the same scalars go to a TensorBoard event file;
* **tags**: ``mdlora.job``, ``mdlora.model``, ``mdlora.backbone_hash``, ``mdlora.data_window``,
  ``mdlora.run_key`` (a retrain's record name) and the registry links (``mdlora.registry``,
  versions, content hashes): links, not copies of the artefacts;
* **artefacts**: small text only (a retrain's champion/challenger table).

The default store is an embedded SQLite database under ``output.root`` (MLflow 3 refuses its
plain-file store unless told otherwise, and SQLite needs no server)::

    <output.root>/tracking/mlflow.db          MLflow runs (mlflow ui --backend-store-uri sqlite:///...)
    <output.root>/tracking/artifacts/         MLflow artefacts of the experiments it created
    <output.root>/tracking/tensorboard/<experiment>/<run>/   event files (tensorboard --logdir ...)

Pretraining logs its per-evaluation history from the driver once the Ray Train run is over (the
history every rank-0 report carried, read from the last checkpoint): the store need not be
reachable from the workers' nodes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from mdlora.config import ConfigError, to_dict
from mdlora.infra.storage import is_s3
from mdlora.trainer.config import OutputConfig, TrackingConfig

log = logging.getLogger("mdlora.tracking")
STORE_DIR = "tracking"
"""Directory of the embedded store (and the TensorBoard event files) under ``output.root``."""
_QUIET = ("mlflow", "alembic")  # their INFO lines (database migrations) are not the user's business


@dataclass(frozen=True)
class Target:
    """Where a job's tracking goes, resolved from ``tracking`` and ``output``."""

    uri: str
    """MLflow tracking URI."""
    experiment: str
    tensorboard: str
    """Local directory for TensorBoard event files ('' for none)."""
    artifacts: str = ""
    """Artefact location of an experiment this store creates ('' for MLflow's default)."""


def target(tracking: TrackingConfig, output: OutputConfig) -> Target | None:
    """Resolve the tracking target of a job; None when tracking is off.

    ``tracking.uri`` empty means the embedded store under a local ``output.root``; on an S3 root
    there is no embedded store (SQLite needs a local file): the job runs untracked, with a warning.
    Event files go beside a local store, else under a local ``output.root``, else nowhere.
    """
    if not tracking.enabled:
        return None
    experiment = tracking.experiment or f"mdlora-{output.model}"
    local_root = "" if is_s3(output.root) else os.path.abspath(output.root)
    tb_root = os.path.join(local_root, STORE_DIR) if local_root else ""
    if tracking.uri:
        store = _local_store(tracking.uri)
        tb = os.path.join(os.path.dirname(store), "tensorboard") if store else (tb_root and f"{tb_root}/tensorboard")
        return Target(tracking.uri, experiment, tb)
    if not local_root:
        log.warning("tracking.uri: not set and output.root %s is on S3 (the embedded SQLite store needs a "
                    "local path): this job is not tracked; set tracking.uri to an MLflow server", output.root)
        return None
    return Target(f"sqlite:///{tb_root}/mlflow.db", experiment, f"{tb_root}/tensorboard", f"{tb_root}/artifacts")


def _local_store(uri: str) -> str:
    """The local path of a ``sqlite:///`` or ``file:`` store URI ('' for anything else)."""
    for prefix in ("sqlite:///", "file://", "file:"):
        if uri.startswith(prefix):
            return uri[len(prefix):] if prefix != "sqlite:///" else "/" + uri[len(prefix):].lstrip("/")
    return ""


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config mapping as ``{dotted key: str(value)}`` (a list is one value)."""
    out: dict[str, str] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out |= flatten(v, f"{key}.")
        else:
            out[key] = "{}" if isinstance(v, Mapping) else str(v)
    return out


class Tracker:
    """One MLflow run plus its TensorBoard writer; :data:`OFF` does nothing.

    The run is opened before the job works (:func:`start`: a bad store fails the job early);
    a store that fails later (disk full, server gone) costs a warning and the rest of the
    run's tracking, never the job's result.
    """

    def __init__(self, client: Any = None, run_id: str = "", writer: Any = None) -> None:
        self.client, self.run_id, self.writer = client, run_id, writer

    @property
    def active(self) -> bool:
        """Whether this tracker records anything."""
        return self.client is not None

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except Exception as e:  # noqa: BLE001 - tracking is a side channel of the job
            log.warning("tracking: MLflow run %s stops recording: %s", self.run_id, str(e).splitlines()[0] if str(e) else e)
            self.client = None

    def params(self, config: Any) -> None:
        """Log a config (dataclass or mapping) as dotted-key params."""
        if not self.active:
            return
        from mlflow.entities import Param

        items = sorted(flatten(to_dict(config)).items())
        with self._guard():
            for lo in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in items[lo:lo + 100]])

    def tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (values as strings; None and '' are left out)."""
        if not self.active:
            return
        from mlflow.entities import RunTag

        with self._guard():
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()
                                                     if v is not None and v != ""])

    def metrics(self, metrics: Mapping[str, float | None], step: int = 0) -> None:
        """Log finite numeric metrics at ``step`` to MLflow and TensorBoard (None and NaN skipped)."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
        batch = [Metric(k, v, now, step) for k, v in sorted(clean.items())]
        with self._guard():
            for lo in range(0, len(batch), 1000):
                self.client.log_batch(self.run_id, metrics=batch[lo:lo + 1000])
            if self.writer is not None:
                for k, v in clean.items():
                    self.writer.add_scalar(k, v, step)

    def text(self, text: str, name: str) -> None:
        """Store a small text artefact (a table, a report) as ``name`` in the run."""
        if self.active:
            with self._guard():
                self.client.log_text(self.run_id, text, name)

    def end(self, status: str) -> None:
        """Close the event file and mark the run ``FINISHED`` / ``FAILED``."""
        if self.writer is not None:
            with self._guard():
                self.writer.close()
        if self.active:
            with self._guard():
                self.client.set_terminated(self.run_id, status)


OFF = Tracker()


def per_domain(split: str, scores: Mapping[str, Any]) -> dict[str, float | None]:
    """``{"<split>/<domain>/<metric>": value}`` from a per-domain scores mapping
    (``{domain: {"auc": .., "logloss": .., ...}}``); non-numeric values are left out."""
    return {f"{split}/{d}/{k}": v for d, m in scores.items() if isinstance(m, Mapping)
            for k, v in m.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def per_domain_splits(domain: str, metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """``{"<split>/<domain>/<metric>": value}`` from one domain's ``{split: {metric: value}}``."""
    return {f"{split}/{domain}/{k}": v for split, m in metrics.items() for k, v in m.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def log_history(tracker: Tracker, history: list[dict], losses: list[list[float]] = ()) -> None:
    """A training loop's evaluations, each at its step: ``val/{wauc,auc,logloss,ne,calibration}``,
    ``val/<domain>/<metric>`` and ``epoch``/``samples``; and the mean training loss of each progress
    interval as ``train/loss`` (:class:`mdlora.trainer.loop.TrainState`'s ``history``/``losses``)."""
    for entry in history:
        val = entry.get("val") or {}
        tracker.metrics({"epoch": entry.get("epoch"), "samples": entry.get("samples")}
                        | {f"val/{k}": entry.get(k) for k in ("wauc", "auc", "logloss", "ne", "calibration")}
                        | per_domain("val", val.get("domains", {})), step=int(entry["step"]))
    for step, loss in losses:
        tracker.metrics({"train/loss": loss}, step=int(step))


def _quiet() -> None:
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)


def start(tracking: TrackingConfig, output: OutputConfig, *, job: str, name: str,
          tags: Mapping[str, Any] | None = None) -> Tracker:
    """Open the MLflow run (and event file) of a job; :data:`OFF` when tracking is off.

    Args:
        tracking: the job's ``tracking`` section.
        output: the job's ``output`` section (root, model).
        job: ``pretrain``, ``adapt``, ``add-domain``, ``score`` or ``retrain``.
        name: the MLflow run name (also the event-file directory).
        tags: extra tags, set at once.

    Returns:
        The tracker; the caller ends it (:func:`track` does).

    Raises:
        ConfigError: the store at ``tracking.uri`` cannot be opened or written (named).
    """
    where = target(tracking, output)
    if where is None:
        return OFF
    from mlflow.tracking import MlflowClient

    _quiet()  # after the import: mlflow sets its own logger's level on import

    store = _local_store(where.uri)
    try:
        with _few_retries(), _store_lock(store):
            client = MlflowClient(where.uri)
            exp = client.get_experiment_by_name(where.experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(
                where.experiment, artifact_location=where.artifacts or None)
            run = client.create_run(exp_id, run_name=name, tags={"mdlora.job": job, "mdlora.model": output.model})
    except Exception as e:  # noqa: BLE001 - MlflowException, OSError, sqlalchemy's errors: all name the store

        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = (f"tracking.uri: cannot open the MLflow store {where.uri!r}" if tracking.uri else
                f"tracking: cannot open the embedded MLflow store {where.uri!r} (set tracking.uri, or "
                "tracking.enabled=false)")
        raise ConfigError(f"{what}: {first}") from None
    writer = None
    if where.tensorboard:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(logdir=os.path.join(where.tensorboard, where.experiment, name))
    tracker = Tracker(client, run.info.run_id, writer)
    tracker.tags(dict(tags or {}))
    log.debug("tracking %s run %s in experiment %s at %s", job, name, where.experiment, where.uri)
    return tracker


@contextlib.contextmanager
def _store_lock(store: str) -> Iterator[None]:
    """Serialise opening a local store among this host's jobs: the first one creates its tables,
    and jobs started together (four ``add-domain`` at once) must not each migrate a new file."""
    if not store:
        yield
        return
    import fcntl

    os.makedirs(os.path.dirname(store) or ".", exist_ok=True)
    with open(f"{store}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _few_retries() -> Iterator[None]:
    """An unreachable tracking server fails in seconds, not after MLflow's minutes of retries."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: os.environ.get(k) or v for k, v in keys.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def track(tracking: TrackingConfig, output: OutputConfig, *, job: str, name: str,
          tags: Mapping[str, Any] | None = None) -> Iterator[Tracker]:
    """:func:`start` a run, yield its tracker, end it ``FINISHED`` or (on an error) ``FAILED``."""
    tracker = start(tracking, output, job=job, name=name, tags=tags)
    try:
        yield tracker
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
