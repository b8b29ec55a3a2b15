"""Embedding sharding: planner, sharders, fused sparse optimiser and the DMP wrap.

The only ``torchrec.distributed`` user besides ``checkpoint.py`` / ``snapshot.py``. Flow::

    model = Model(build_ebc(schema), ...)                      # tables on meta
    apply_sparse_optimizer(model, "rowwise_adagrad", 0.05, "cpu")  # optional: planner counts state
    plan = plan_for(model, world, "cpu", pg=dist.group.WORLD)    # pg=None: offline simulation
    dmp = shard_model(model, plan=plan, device=torch.device("cpu"),
                      sparse_optimizer="rowwise_adagrad", sparse_lr=0.05)
    dense_opt = torch.optim.Adam(dense_params(dmp), lr=1e-3)

Tables live in device memory: HBM on cuda, host DDR on cpu (``hbm_gb`` is the per-rank budget
for both). Kernels are ``fused`` (TBE) and ``dense`` (data parallel), so by default the planner
never offloads a table to UVM; tables that do not fit are a ValueError naming the bytes. On cuda,
``uvm=True`` also offers ``fused_uvm_caching``: a table's rows and optimiser state live in host
memory (``host_gb`` per rank) behind an HBM cache of ``cache_ratio`` of them (fbgemm's UVM-cached
TBE; torchrec's ``CacheParams.load_factor``). The planner picks it only where it must or where it
is cheaper (its cost model ranks HBM tables first); see :mod:`plan_view` for the bytes.
``row_wise`` / ``table_row_wise`` exist only on cuda (fbgemm's CPU TBE).

Fused sparse optimisers run inside the embedding kernels' backward
(``apply_optimizer_in_backward``): ``sgd``, ``adagrad``, ``rowwise_adagrad`` (one float of state
per row) on both devices, ``adam`` (two floats per weight) on cuda only.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.constants import DDR_CAP, HBM_CAP
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import (
    KernelConfig,
    PlannerError,
    PlannerErrorType,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import CacheParams, ShardingEnv, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad, apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizer
from torchrec.optim.optimizers import in_backward_optimizer_filter

from mdlora.embeddings.plan_view import (  # noqa: F401  (re-exported: sharding.plan_to_dict, ...)
    STATE_FLOATS,
    UVM_CACHING,
    format_plan,
    gb,
    plan_to_dict,
    table_bytes,
)
from mdlora.embeddings.schema import TableSpec

DEVICE_TYPES = ("cpu", "cuda")
CPU_SHARDING = ("table_wise", "column_wise", "table_column_wise", "data_parallel")
# Planner's choices when the config names none. data_parallel only on request: it all-reduces
# whole tables every step, and its in-backward optimiser state is not in the fused optimiser
# (so not checkpointed).
DEFAULT_SHARDING = {
    "cpu": ["table_wise", "column_wise", "table_column_wise"],
    "cuda": ["table_wise", "column_wise", "table_column_wise", "row_wise", "table_row_wise"],
}
# name -> (optimizer class, floats of state per weight; rowwise_adagrad keeps 1 per row instead)
SPARSE_OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], float]] = {
    name: (cls, STATE_FLOATS[name])
    for name, cls in [
        ("sgd", torch.optim.SGD),
        ("adagrad", torch.optim.Adagrad),
        ("rowwise_adagrad", RowWiseAdagrad),
        ("adam", torch.optim.Adam),
    ]
}
_KERNELS = ["fused", "dense"]  # keep tables in device memory (no UVM offload)
_UVM_KERNELS = [*_KERNELS, UVM_CACHING]  # dist.uvm: host memory behind an HBM cache (cuda)
_RESERVED = 0.15  # share of each rank's HBM held back for dense parts, activations and KJTs
_TABLE_KEY = re.compile(r"(?:^|\.)embedding_bags\.([^.]+)\.weight$")

# The planner warns on every call about topology construction and dry-run estimates.
logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)


def _check_device_type(device_type: str) -> None:
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device: {device_type!r} is not one of {list(DEVICE_TYPES)}")


def sharders(device_type: str) -> list:
    """``[EmbeddingBagCollectionSharder()]`` (checks ``device_type``; the sharder offers row-wise
    types only on cuda, and takes its fused optimiser from the parameters, see
    :func:`apply_sparse_optimizer`)."""
    _check_device_type(device_type)
    return [EmbeddingBagCollectionSharder()]


def module_tables(module: nn.Module) -> list[TableSpec]:
    """One ``TableSpec`` (global shape) per ``...embedding_bags.<table>.weight`` of ``module``
    (a model holding an ``EmbeddingBagCollection``, or its DMP), in state-dict order."""
    return [
        TableSpec(name=m.group(1), num_embeddings=int(v.shape[0]), dim=int(v.shape[1]))
        for k, v in module.state_dict().items()
        if (m := _TABLE_KEY.search(k))
    ]


def _constraints(
    tables: list[str],
    device_type: str,
    sharding_types: list[str],
    table_sharding: dict[str, list[str]],
    cache_ratio: float | None = None,
) -> dict[str, ParameterConstraints]:
    """Per-table constraints; ``cache_ratio`` (cuda) also allows the UVM-cached kernel."""
    unknown = sorted(set(table_sharding) - set(tables))
    if unknown:
        raise ValueError(f"dist.table_sharding: unknown tables {unknown} (tables: {tables})")
    out = {}
    for t in tables:
        allowed = list(table_sharding.get(t) or sharding_types or DEFAULT_SHARDING[device_type])
        bad = [s for s in allowed if device_type == "cpu" and s not in CPU_SHARDING]
        if bad:
            raise ValueError(
                f"table {t!r}: {bad[0]} sharding needs device cuda (cpu: {CPU_SHARDING})"
            )
        out[t] = (
            ParameterConstraints(sharding_types=allowed, compute_kernels=list(_KERNELS))
            if cache_ratio is None
            else ParameterConstraints(
                sharding_types=allowed,
                compute_kernels=list(_UVM_KERNELS),
                cache_params=CacheParams(load_factor=cache_ratio),
            )
        )
    return out


def make_planner(
    world_size: int,
    device_type: str,
    hbm_gb: float = 0.0,
    constraints: dict[str, ParameterConstraints] | None = None,
    batch_size: int = 512,
    host_gb: float = 0.0,
) -> EmbeddingShardingPlanner:
    """An ``EmbeddingShardingPlanner`` for ``world_size`` ranks (which need not exist).

    Args:
        world_size: ranks to plan for.
        device_type: ``cpu`` (tables in host DDR) or ``cuda`` (tables in HBM).
        hbm_gb: memory per rank in GB (2**30 bytes), 15% of it reserved; 0 keeps torchrec's
            default (32 GB HBM on cuda, 128 GB DDR on cpu).
        constraints: per-table ``ParameterConstraints`` (see :func:`plan_for`).
        batch_size: per-rank batch size, for the planner's cost model.
        host_gb: cuda only: host memory per rank in GB for UVM-cached tables, none reserved; 0
            keeps torchrec's default (128 GB).
    """
    _check_device_type(device_type)
    cap = int(hbm_gb * 2**30) if hbm_gb > 0 else None
    host = int(host_gb * 2**30) if host_gb > 0 else None
    trainer = (
        TrainerConfig(world_size=world_size, hbm_cap_bytes=cap, ddr_cap_bytes=host)
        if device_type == "cuda"
        else TrainerConfig(world_size=world_size, ddr_cap_bytes=cap)
    )
    topology = TopologyFactory.create_topology(
        trainer, kernel_config=KernelConfig(compute_device=device_type)
    )
    return EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        constraints=constraints,
        storage_reservation=FixedPercentageStorageReservation(_RESERVED),
        debug=False,
    )


def apply_sparse_optimizer(module: nn.Module, name: str, lr: float, device_type: str) -> None:
    """Attach fused sparse optimiser ``name`` (lr ``lr``) to every EBC table of ``module``.

    Call it before planning (the planner then counts the optimiser state) or let
    :func:`shard_model` call it; a second call with the same arguments is a no-op.

    Raises:
        ValueError: unknown optimiser, ``adam`` on cpu, or a different optimiser is attached.
    """
    _check_device_type(device_type)
    if name not in SPARSE_OPTIMIZERS:
        raise ValueError(f"optim.sparse_optimizer: {name!r} not in {list(SPARSE_OPTIMIZERS)}")
    if name == "adam" and device_type != "cuda":
        raise ValueError("optim.sparse_optimizer: adam is GPU-only in fbgemm; needs cuda")
    cls = SPARSE_OPTIMIZERS[name][0]
    params = [
        p for m in module.modules() if isinstance(m, EmbeddingBagCollection) for p in m.parameters()
    ]
    attached = {
        (p._optimizer_classes[0], p._optimizer_kwargs[0]["lr"])
        for p in params
        if hasattr(p, "_optimizer_classes")
    }
    if attached and attached != {(cls, lr)}:
        raise ValueError(f"a different sparse optimizer is already attached: {attached}")
    if not attached:
        apply_optimizer_in_backward(cls, params, {"lr": lr})


def plan_for(
    module: nn.Module,
    world_size: int,
    device_type: str,
    *,
    hbm_gb: float = 0.0,
    sharding_types: list[str] | None = None,
    table_sharding: dict[str, list[str]] | None = None,
    batch_size: int = 512,
    uvm: bool = False,
    host_gb: float = 0.0,
    cache_ratio: float = 0.2,
    pg: dist.ProcessGroup | None = None,
) -> ShardingPlan:
    """Plan the embedding tables of ``module`` over ``world_size`` ranks.

    Without ``pg`` this is a simulation that needs no process group nor the hardware (plan 8
    cuda ranks on a laptop); with ``pg`` rank 0 plans and broadcasts (``collective_plan``) so
    every rank shards identically.

    Args:
        module: unsharded model, usually on meta; attach the sparse optimiser first to have
            its state counted.
        world_size: number of ranks.
        device_type: ``cpu`` or ``cuda``.
        hbm_gb: memory per rank for tables (see :func:`make_planner`).
        sharding_types: allowed sharding types for every table (empty: planner's choice among
            :data:`DEFAULT_SHARDING`).
        table_sharding: per-table override of ``sharding_types``.
        batch_size: per-rank batch size for the cost model.
        uvm: cuda only: also allow ``fused_uvm_caching``, so tables that do not fit in HBM live
            in host memory behind an HBM cache (the planner picks the kernel per table).
        host_gb: host memory per rank for UVM-cached tables (see :func:`make_planner`).
        cache_ratio: share of a UVM-cached table held in the HBM cache, in (0, 1].
        pg: process group for a collective plan; ``None`` plans locally.

    Returns:
        The ``ShardingPlan``.

    Raises:
        ValueError: unknown table, a cuda-only sharding type on cpu, ``uvm`` on cpu, a shard
            whose columns are not a multiple of 4, or the tables do not fit (message gives the
            bytes needed and the memory per rank).
    """
    if pg is not None and pg.size() != world_size:
        raise ValueError(f"world_size {world_size} differs from the process group size {pg.size()}")
    if uvm and device_type != "cuda":
        raise ValueError(
            f"dist.uvm: UVM caching keeps tables in host memory behind a GPU cache, so it needs "
            f"device cuda (on {device_type} tables are in host memory already); set dist.uvm=false"
        )
    if not 0 < cache_ratio <= 1:
        raise ValueError(f"dist.uvm_cache_ratio: must be in (0, 1], got {cache_ratio}")
    tables = {t.name: (t.num_embeddings, t.dim) for t in module_tables(module)}
    cons = _constraints(
        list(tables),
        device_type,
        sharding_types or [],
        table_sharding or {},
        cache_ratio if uvm else None,
    )
    planner = make_planner(
        world_size, device_type, hbm_gb, cons, batch_size, host_gb if uvm else 0.0
    )

    def plan() -> ShardingPlan:
        try:
            return _check_columns(planner.plan(module, sharders(device_type)))
        except PlannerError as e:
            if e.error_type != PlannerErrorType.INSUFFICIENT_STORAGE:
                raise ValueError(f"sharding planner: {e}") from None
            opt = _attached_optimizer(module)
            need = sum(table_bytes(r, d, opt) for r, d in tables.values())
            raise _does_not_fit(
                need, opt, world_size, device_type, hbm_gb, uvm, host_gb, cache_ratio
            ) from None

    if pg is None:
        return plan()
    # torchrec's collective_plan, but a planning error on rank 0 reaches every rank (no hang)
    box: list[Any] = [None]
    if dist.get_rank(pg) == 0:
        try:
            box = [plan()]
        except ValueError as e:
            box = [e]
    dist.broadcast_object_list(box, src=dist.get_global_rank(pg, 0), group=pg)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def _does_not_fit(
    need: int,
    opt: str | None,
    world: int,
    device_type: str,
    hbm_gb: float,
    uvm: bool,
    host_gb: float,
    cache_ratio: float,
) -> ValueError:
    """The planner's INSUFFICIENT_STORAGE as a ValueError naming the bytes and the knobs."""
    cap = hbm_gb * 2**30 if hbm_gb > 0 else (HBM_CAP if device_type == "cuda" else DDR_CAP)
    usable = world * cap * (1 - _RESERVED)
    head = (
        f"embedding tables do not fit on {world} x {device_type} ranks: they need {gb(need)} in "
        f"all (weights + {opt or 'no'} optimizer state) and each rank has {gb(cap)} "
        f"({_RESERVED:.0%} reserved: {gb(usable)} usable in all)"
    )
    if device_type == "cpu":
        return ValueError(f"{head}; add ranks, raise dist.hbm_gb or shrink the tables")
    if not uvm:
        return ValueError(
            f"{head}; add ranks, raise dist.hbm_gb, shrink the tables, or set dist.uvm=true to "
            "keep tables that do not fit in host memory behind an HBM cache (dist.host_gb, "
            "dist.uvm_cache_ratio)"
        )
    host = host_gb * 2**30 if host_gb > 0 else DDR_CAP
    return ValueError(
        f"{head}, and with dist.uvm=true {gb(host)} of host memory for UVM-cached tables "
        f"({gb(world * host)} in all; their HBM cache holds {cache_ratio:g} of them); add ranks, "
        "raise dist.host_gb or dist.hbm_gb, lower dist.uvm_cache_ratio or shrink the tables"
    )


class ShardShapeError(ValueError):
    """A table's shape cannot be sharded for fbgemm's kernels (a schema problem, not a config one)."""


def _check_columns(plan: ShardingPlan) -> ShardingPlan:
    """Refuse a plan with a shard fbgemm's fused (TBE) kernels cannot hold: they need every
    shard's column count to be a multiple of 4, on CPU and GPU alike, and otherwise fail inside
    every worker at DMP construction. Data-parallel tables are plain replicas and exempt."""
    for module_plan in plan.plan.values():
        for name, ps in module_plan.items():
            for s in ps.sharding_spec.shards if ps.sharding_spec is not None else []:
                if s.shard_sizes[1] % 4:
                    raise ShardShapeError(
                        f"table {name!r}: its {ps.sharding_type} shard on rank {s.placement.rank()} has "
                        f"{s.shard_sizes[1]} columns, not a multiple of 4 as fbgemm's fused embedding kernels "
                        "need; make the table's dim a multiple of 4 (x the column shards), or shard it "
                        "data_parallel"
                    )
    return plan


def _attached_optimizer(module: nn.Module) -> str | None:
    """Name of the sparse optimiser attached to ``module``'s tables, if any."""
    classes = {getattr(p, "_optimizer_classes", [None])[0] for p in module.parameters()}
    return next((name for name, (cls, _) in SPARSE_OPTIMIZERS.items() if cls in classes), None)


def shard_model(
    module: nn.Module,
    *,
    plan: ShardingPlan,
    device: torch.device,
    pg: dist.ProcessGroup | None = None,
    sparse_optimizer: str,
    sparse_lr: float,
) -> DistributedModelParallel:
    """Shard ``module``'s tables by ``plan`` with a fused sparse optimiser; DDP-wrap the rest.

    Args:
        module: unsharded model on meta (materialised shard by shard) or cpu.
        plan: the same plan on every rank (:func:`plan_for` with ``pg``).
        device: this rank's device (``cpu`` or ``cuda:<local rank>``).
        pg: process group; ``None`` uses the default (world) group.
        sparse_optimizer: fused optimiser name (see :func:`apply_sparse_optimizer`).
        sparse_lr: its learning rate.

    Returns:
        The ``DistributedModelParallel``. Train the dense part with an optimiser over
        :func:`dense_params`; the tables update themselves in backward.
    """
    if pg is None and not dist.is_initialized():
        raise ValueError("shard_model: needs an initialised process group (world size 1 is ok)")
    apply_sparse_optimizer(module, sparse_optimizer, sparse_lr, device.type)
    env = ShardingEnv.from_process_group(pg or dist.GroupMember.WORLD)
    shard = sharders(device.type)
    return DistributedModelParallel(module, env=env, device=device, plan=plan, sharders=shard)


def dense_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters not updated by an in-backward (fused) optimiser: what the dense optimiser owns."""
    return [p for _, p in in_backward_optimizer_filter(model.named_parameters())]


def fused_optimizer(dmp: DistributedModelParallel) -> KeyedOptimizer:
    """The keyed fused optimiser of the sharded tables (its ``state_dict`` is sharded too)."""
    return dmp.fused_optimizer
