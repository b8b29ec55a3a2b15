"""Typed run configuration: one dataclass per section, one source of defaults.

A run config YAML is a short diff over these defaults::

    data: {schema: logs/schema.yaml, train: logs/train, val: logs/val}
    model: {tower: mlp, hidden: [256, 128]}
    dist: {world_size: 2}

Unknown keys and wrong types are errors naming the dotted key (see ``mdlora.config``);
``__post_init__`` checks ranges and names the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mdlora.adapters.config import LoraConfig
from mdlora.config import load_config


@dataclass(kw_only=True)
class DataConfig:
    """Where the logs are and how they are batched."""

    schema: str = ""
    """Schema YAML path (local or s3://)."""
    train: str = ""
    """Training log dataset (Parquet dir/file, local or s3://)."""
    val: str = ""
    """Validation log dataset; empty: no validation."""
    test: str = ""
    """Test log dataset; empty: none."""
    batch_size: int = 2048
    """Global batch size (split evenly across ranks)."""
    window: str = ""
    """Date window ``START..END`` (inclusive, YYYY-MM-DD) on ``schema.date_column``; empty: all."""
    domains: list[str] = field(default_factory=list)
    """Keep only these natural domains; empty: all."""
    shuffle: bool = True
    """Shuffle fragment order and rows within a read-ahead buffer each epoch."""
    prefetch: int = 2
    """Batches converted ahead of the training step by a background thread."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.prefetch < 0:
            raise ValueError(f"prefetch: must be >= 0, got {self.prefetch}")
        if self.window and ".." not in self.window:
            raise ValueError(f"window: expected START..END, got {self.window!r}")


@dataclass(kw_only=True)
class ModelConfig:
    """Backbone: embeddings -> interaction tower -> logit."""

    tower: Literal["mlp", "dcnv2", "deepfm", "widedeep"] = "mlp"
    """Feature-interaction tower."""
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    """Hidden widths of the MLP (deep part of every tower)."""
    dropout: float = 0.0
    """Dropout after each hidden layer."""
    cross_layers: int = 2
    """DCN-v2 cross layers."""
    cross_rank: int = 0
    """DCN-v2 low-rank cross (0: full-rank)."""
    init_from: str = ""
    """Warm start: a version or alias (``production``, ``v0003``) of ``backbones/<output.model>``
    in ``output.root`` whose weights and fused sparse-optimiser state initialise the run (the
    dense optimiser starts fresh); its architecture and schema must equal this run's. The
    published backbone records the resolved version. Empty: random initialisation."""

    def __post_init__(self) -> None:
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden: widths must be >= 1, got {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.cross_layers < 0 or self.cross_rank < 0:
            raise ValueError("cross_layers/cross_rank: must be >= 0")


@dataclass(kw_only=True)
class OptimConfig:
    """Optimisers: fused sparse (in the embedding kernels) + dense Adam."""

    dense_lr: float = 1e-3
    """Adam learning rate of the dense (tower) parameters."""
    sparse_lr: float = 0.05
    """Learning rate of the fused embedding optimiser."""
    sparse_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd", "adam"] = "rowwise_adagrad"
    """Fused embedding optimiser (``adam`` is GPU-only in fbgemm)."""
    weight_decay: float = 0.0
    """Dense weight decay."""
    clip_norm: float = 0.0
    """Dense gradient-norm clip; 0 disables."""
    warmup_steps: int = 0
    """Linear warm-up steps of the dense learning rate."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Dense learning-rate schedule after warm-up."""

    def __post_init__(self) -> None:
        for k in ("dense_lr", "sparse_lr"):
            if getattr(self, k) <= 0:
                raise ValueError(f"{k}: must be > 0, got {getattr(self, k)}")
        if self.clip_norm < 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("clip_norm/weight_decay/warmup_steps: must be >= 0")


@dataclass(kw_only=True)
class LoopConfig:
    """Training loop cadence."""

    epochs: int = 1
    """Passes over the training data."""
    max_steps: int = 0
    """Stop after this many steps (0: no limit)."""
    eval_every: int = 0
    """Validate every N steps (0: at the end of each epoch only)."""
    checkpoint_every: int = 0
    """Checkpoint every N steps (0: at the end of each epoch only)."""
    patience: int = 0
    """Early stopping: evaluations without WAUC improvement before stopping (0: off)."""
    log_every: int = 50
    """Progress line every N steps."""
    seed: int = 0
    """Seed for initialisation and shuffling."""

    def __post_init__(self) -> None:
        for k in ("epochs",):
            if getattr(self, k) < 1:
                raise ValueError(f"{k}: must be >= 1, got {getattr(self, k)}")
        for k in ("max_steps", "eval_every", "checkpoint_every", "patience", "log_every"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k}: must be >= 0, got {getattr(self, k)}")


@dataclass(kw_only=True)
class DistConfig:
    """Workers, devices and embedding sharding."""

    world_size: int = 1
    """Ray Train workers (each one rank)."""
    device: Literal["cpu", "cuda"] = "cpu"
    """cpu (gloo) or cuda (nccl)."""
    sharding_types: list[str] = field(default_factory=list)
    """Allowed sharding types for every table (empty: planner's choice), e.g. [table_wise]."""
    table_sharding: dict[str, list[str]] = field(default_factory=dict)
    """Per-table override of allowed sharding types, e.g. {user: [row_wise]}."""
    hbm_gb: float = 0.0
    """Per-device memory for planning (0: planner default for the device)."""
    uvm: bool = False
    """cuda only: tables that do not fit in HBM may live in host memory behind an HBM cache
    (fbgemm's UVM-cached kernel, ``fused_uvm_caching``); the planner picks it per table under
    ``host_gb``. false: every table must fit in HBM (else a ValueError naming the bytes). Planning
    with uvm true for device cpu is an error (checked where the device is known: ``mdlora plan
    --device`` may override ``device``); there tables are in host memory already."""
    host_gb: float = 0.0
    """Host (DDR) memory per rank in GB for UVM-cached tables, none of it reserved; 0: the
    planner default (128 GB). Read only when ``uvm`` is true."""
    uvm_cache_ratio: float = 0.2
    """Share of a UVM-cached table's rows held in its HBM cache, in (0, 1] (torchrec's
    ``CacheParams.load_factor``): more HBM per table, fewer cache misses."""
    address: str = ""
    """Ray cluster address; empty: start an embedded local Ray (or join RAY_ADDRESS)."""
    max_failures: int = 2
    """Worker failures tolerated; the run resumes from the latest checkpoint."""
    cpus_per_worker: int = 1
    """CPUs reserved per Ray worker (also torch intra-op threads)."""

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size: must be >= 1, got {self.world_size}")
        if self.max_failures < 0 or self.cpus_per_worker < 1:
            raise ValueError("max_failures must be >= 0 and cpus_per_worker >= 1")
        if self.host_gb < 0:
            raise ValueError(f"host_gb: must be >= 0, got {self.host_gb}")
        if not 0 < self.uvm_cache_ratio <= 1:
            raise ValueError(f"uvm_cache_ratio: must be in (0, 1], got {self.uvm_cache_ratio}")
        known = {"table_wise", "column_wise", "table_column_wise", "row_wise", "table_row_wise", "data_parallel"}
        for t in self.sharding_types + [s for v in self.table_sharding.values() for s in v]:
            if t not in known:
                raise ValueError(f"sharding_types: unknown sharding type {t!r} (known: {sorted(known)})")


def local_batch(batch_size: int, world_size: int) -> int:
    """Rows per rank and step: the global ``data.batch_size`` over ``world_size`` ranks (>= 1)."""
    return max(1, batch_size // world_size)


@dataclass(kw_only=True)
class OutputConfig:
    """Where runs, checkpoints and published artefacts go."""

    root: str = "registry"
    """Registry root (local dir or s3://): backbones/ and adapters/ live under it."""
    model: str = "default"
    """Backbone name (``backbones/<model>/vNNNN``)."""
    run_dir: str = ""
    """Working dir for checkpoints and metrics of this run; empty: ``<root>/runs/<model>``."""


@dataclass(kw_only=True)
class TrackingConfig:
    """Experiment tracking: an MLflow run per job (config as params, per-evaluation metrics, tags,
    artefact links) and TensorBoard event files beside the store."""

    enabled: bool = True
    """Track this job; false: no MLflow run, no event files."""
    uri: str = ""
    """MLflow tracking URI (``http(s)://`` server, ``sqlite:///abs/path.db``, ``databricks``);
    empty: an embedded SQLite store ``<output.root>/tracking/mlflow.db`` (a local root only: on
    an S3 root set a URI, or the job runs untracked with a warning)."""
    experiment: str = ""
    """MLflow experiment; empty: ``mdlora-<output.model>`` (a retrain's stages and its gate
    table land in the same one)."""


@dataclass(kw_only=True)
class RunConfig:
    """A pretrain run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def load_run_config(path: str | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a :class:`RunConfig` from YAML plus ``key=value`` overrides."""
    return load_config(RunConfig, path, overrides)


# ---- adapter runs (mdlora adapt / add-domain) -------------------------------------------------


@dataclass(kw_only=True)
class AdaptTrainConfig:
    """Adapter optimisation on the cached embedding-layer output (one Adam per domain for MLoRA)."""

    lr: float = 1e-2
    """Adam learning rate of the adapter parameters."""
    weight_decay: float = 0.0
    """Adam weight decay of the adapter parameters."""
    batch_size: int = 512
    """Rows per adapter step (single-domain batches for MLoRA, mixed for MultiLoRA)."""
    tasks: int = 0
    """Parallel Ray tasks the MLoRA domains are partitioned over (0: one per available CPU)."""
    pack: int = 1
    """MLoRA domains trained together in one routed model (each keeps its own batches, Adam
    state and early stopping; a step holds one batch of each): steps follow the largest domain.
    1 (default) trains each domain alone on the single-domain fast path, which measured 1.75x
    faster per row on CPU than packs of 16 (the routed path's masking costs more than the
    steps it saves); larger packs pay off when per-step overhead dominates (many tiny domains,
    GPU)."""
    eval_every: int = 0
    """Validate every N steps as well as at the end of each epoch (0: once per epoch);
    ``loop.patience`` then counts these evaluations. A frozen backbone trained to its best
    validation epoch leaves little to learn on the same rows: an adapter's validation peak can
    come after a few dozen steps, well inside the first epoch (ML-1M)."""
    min_delta: float = 0.0
    """A validation score counts as better only when it beats the best so far by more than
    this (AUC units): a guard against keeping noise on small validation sets, where a state
    that merely looks better than the backbone would be negative transfer on new data."""
    confidence: float = 0.9
    """MLoRA's no-negative-transfer gate: each domain's validation rows are split in two seeded
    halves; early stopping uses the first, and the kept adapter must beat the frozen backbone's
    AUC on the second in at least this share of bootstrap resamples, else the domain keeps the
    backbone exactly (the zero update). It scales with the domain's size: a few hundred
    validation rows need a large gain, a hundred thousand a small one. 0: no gate, early
    stopping on all validation rows."""
    resamples: int = 200
    """Bootstrap resamples of the ``confidence`` gate."""
    buffer_rows: int = 1_000_000
    """Bound on the feature rows an MLoRA adapter task holds (README "Adapting at scale"). A task
    whose domains have at most this many rows (train, validation and test) holds them all, as
    before; a larger one streams them from the feature cache: each epoch reads every domain's
    training rows in seeded random blocks through a shuffle buffer of this many rows per pack
    (each domain of a pack gets its share, two batches at least), and validation and test keep
    only a probability, label and domain id a row. 1M rows are about 400 MB of features at the
    gen-logs schema's width. MultiLoRA holds its rows whatever their number."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.tasks < 0:
            raise ValueError(f"tasks: must be >= 0, got {self.tasks}")
        if self.pack < 1:
            raise ValueError(f"pack: must be >= 1, got {self.pack}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every: must be >= 0, got {self.eval_every}")
        if self.min_delta < 0:
            raise ValueError(f"min_delta: must be >= 0, got {self.min_delta}")
        if not 0.0 <= self.confidence < 1.0:
            raise ValueError(f"confidence: must be in [0, 1), got {self.confidence}")
        if self.resamples < 1:
            raise ValueError(f"resamples: must be >= 1, got {self.resamples}")
        if self.buffer_rows < 2 * self.batch_size:
            raise ValueError(f"buffer_rows: must hold two batches (>= 2 * batch_size = {2 * self.batch_size}), "
                             f"got {self.buffer_rows}")


@dataclass(kw_only=True)
class AdaptOutputConfig(OutputConfig):
    """Registry root and backbone name (as for pretrain) plus which backbone version to adapt."""

    backbone: str = "production"
    """Backbone version to adapt: an alias (``production``, ``latest``) or ``vNNNN``."""
    keep_features: bool = False
    """Keep the run's feature cache (the frozen backbone's output of every row, under
    ``run_dir``) after its bundles are published; by default it is removed then."""

    def __post_init__(self) -> None:
        if not self.backbone:
            raise ValueError("backbone: needs an alias or a version, got ''")


@dataclass(kw_only=True)
class ScoreConfig:
    """How ``mdlora score`` and the retrain gate spread a dataset over processes.

    One worker scores in the calling process (no Ray start: the fastest for small inputs) and
    writes one Parquet file; more spread the input's row groups, contiguous and balanced by
    rows, over Ray tasks that each load the backbone and the bundles their rows need and write
    one part of a directory ``out/part-NNNNN.parquet`` + ``_SUCCESS``, committed at once.
    """

    workers: int = 1
    """Ray tasks the input is spread over (capped by its row groups); 1: in this process,
    no Ray; 0: one per ``cpus_per_worker`` CPUs of the Ray cluster."""
    cpus_per_worker: int = 1
    """CPUs reserved per task and its torch threads (one worker: this process's torch threads
    while it scores)."""

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0, got {self.workers}")
        if self.cpus_per_worker < 1:
            raise ValueError(f"cpus_per_worker: must be >= 1, got {self.cpus_per_worker}")


def _adapt_loop() -> LoopConfig:
    return LoopConfig(epochs=10, patience=2)


@dataclass(kw_only=True)
class AdaptConfig:
    """An adapter run: per-domain LoRA on a published, frozen backbone.

    ``data`` names the logs (``domains`` restricts the run, ``batch_size`` is the materialisation
    batch per worker), ``loop.epochs``/``loop.patience`` bound each domain's training (patience
    counts per-domain validation AUC evaluations, one per epoch), ``dist`` sizes the sharded
    materialisation job.
    """

    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: AdaptTrainConfig = field(default_factory=AdaptTrainConfig)
    loop: LoopConfig = field(default_factory=_adapt_loop)
    dist: DistConfig = field(default_factory=DistConfig)
    output: AdaptOutputConfig = field(default_factory=AdaptOutputConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    """``mdlora score``: workers the scored dataset is spread over (``dist.address``: the cluster)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def load_adapt_config(path: str | None, overrides: list[str] | None = None) -> AdaptConfig:
    """Load an :class:`AdaptConfig` from YAML plus ``key=value`` overrides."""
    return load_config(AdaptConfig, path, overrides)


# ---- scheduled retrain (mdlora retrain) -------------------------------------------------------


@dataclass(kw_only=True)
class GateConfig:
    """Promotion gate: challenger vs champion per domain on a fixed holdout."""

    holdout: str
    """Fixed holdout log dataset (Parquet, local or s3://) both sides are scored on."""
    metric: Literal["auc", "logloss"] = "auc"
    """Per-domain holdout metric the gate compares (exact, ``mdlora.trainer.metrics``)."""
    tolerance: float = 0.002
    """A challenger is promoted when it is not worse than the champion by more than this:
    AUC_challenger >= AUC_champion - tolerance (LogLoss: <= champion + tolerance)."""
    score: ScoreConfig = field(default_factory=ScoreConfig)
    """Workers the holdout is scored with (``pretrain.dist.address``: the cluster)."""

    def __post_init__(self) -> None:
        if not self.holdout:
            raise ValueError("holdout: needs a holdout dataset path, got ''")
        if self.tolerance < 0:
            raise ValueError(f"tolerance: must be >= 0, got {self.tolerance}")


@dataclass(kw_only=True)
class RetrainConfig:
    """A scheduled retrain (``mdlora retrain --window START..END``); one source for every path::

        pretrain: {data: {schema: s3://b/logs/schema.yaml, train: s3://b/logs/train, val: s3://b/logs/val},
                   loop: {epochs: 1}, dist: {world_size: 2}, output: {root: s3://b/mdlora, model: ctr}}
        adapt:    {lora: {method: mlora, alpha: 128}, loop: {epochs: 10, patience: 2}, dist: {world_size: 2}}
        gate:     {holdout: s3://b/logs/holdout, metric: auc, tolerance: 0.002}

    ``pretrain`` trains the challenger backbone on the window, warm-started from the production
    backbone (whose architecture it takes, so ``pretrain.model`` stays unset). ``adapt`` rebases
    every domain onto it; its data paths, window and output come from ``pretrain`` (only
    ``adapt.data.batch_size/domains/prefetch`` may be set there).
    """

    pretrain: RunConfig = field(default_factory=RunConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    gate: GateConfig
    lock_ttl: int = 900
    """S3 registries: seconds the retrain lock lease lasts; the running job renews it every
    third of that, so a crashed job's lock frees itself after at most this long."""

    def __post_init__(self) -> None:
        if self.pretrain.model != ModelConfig():
            raise ValueError("pretrain.model: the architecture is the production backbone's (warm start); "
                             "leave the section out")
        if self.pretrain.data.window:
            raise ValueError(f"pretrain.data.window: set by --window, got {self.pretrain.data.window!r} in the config")
        data = self.adapt.data
        for k in ("schema", "train", "val", "test", "window"):
            if getattr(data, k):
                raise ValueError(f"adapt.data.{k}: taken from pretrain.data and --window; leave it out")
        if self.adapt.score != ScoreConfig():
            raise ValueError("adapt.score: the gate scores with gate.score; leave it out")
        if self.adapt.output != AdaptOutputConfig():
            raise ValueError("adapt.output: taken from pretrain.output (the backbone is the new version); "
                             "leave it out")
        if self.adapt.tracking != TrackingConfig():
            raise ValueError("adapt.tracking: taken from pretrain.tracking (one experiment per retrain); "
                             "leave it out")
        if self.lock_ttl < 30:
            raise ValueError(f"lock_ttl: must be >= 30 seconds, got {self.lock_ttl}")


def load_retrain_config(path: str | None, overrides: list[str] | None = None) -> RetrainConfig:
    """Load a :class:`RetrainConfig` from YAML plus ``key=value`` overrides."""
    return load_config(RetrainConfig, path, overrides)
