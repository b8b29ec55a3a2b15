"""What a sharding plan costs: bytes per shard and per rank (HBM and host), as JSON and text.

A shard [R, C] of an fp32 table with a fused optimiser holds ``table_bytes(R, C, opt)``. Where
those bytes live depends on its compute kernel:

* ``fused`` / ``dense``: all in device memory (HBM on cuda, host DDR on cpu).
* ``fused_uvm_caching`` (cuda only): rows and optimiser state in host memory (UVM), plus an HBM
  cache of ``clf`` (the cache ratio) of them and fbgemm's cache bookkeeping, ``R * (4 + 16 clf)``
  bytes (index map + LRU slot state). This is torchrec's storage estimator's count
  (``shard_estimators.calculate_shard_storages``), so the planner's budget and this view agree.

Pure arithmetic over a ``ShardingPlan``: no process group, no device.
"""

from __future__ import annotations

import math
from typing import Any

import torch

UVM_CACHING = "fused_uvm_caching"
_FP32 = 4
# name -> floats of optimiser state per weight (rowwise_adagrad keeps 1 per row instead)
STATE_FLOATS = {"sgd": 0.0, "adagrad": 1.0, "rowwise_adagrad": 0.0, "adam": 2.0}


def gb(n: float) -> str:
    """``n`` bytes in GB (2**30), three decimals."""
    return f"{n / 2**30:.3f} GB"


def table_bytes(rows: int, cols: int, sparse_optimizer: str | None) -> int:
    """Bytes of one fp32 shard [rows, cols] plus its fused optimiser state.

    State floats: sgd 0, adagrad rows*cols, adam 2*rows*cols, rowwise_adagrad rows (one per row,
    kept by every column shard of the row); ``None`` counts weights only.
    """
    if sparse_optimizer == "rowwise_adagrad":
        state = rows
    else:
        state = STATE_FLOATS[sparse_optimizer] * rows * cols if sparse_optimizer else 0.0
    return int(math.ceil((rows * cols + state) * _FP32))


def shard_memory(
    rows: int,
    cols: int,
    sparse_optimizer: str | None,
    kernel: str,
    device_type: str,
    cache_ratio: float | None = None,
) -> tuple[int, int]:
    """(HBM bytes, host bytes) of one shard [rows, cols] under compute kernel ``kernel``.

    Args:
        rows, cols: shard size.
        sparse_optimizer: fused optimiser whose state is counted (see :func:`table_bytes`).
        kernel: the plan's compute kernel (``fused``, ``dense``, ``fused_uvm_caching``).
        device_type: ``cpu`` (everything in host memory) or ``cuda``.
        cache_ratio: share of a UVM-cached shard held in HBM (required for that kernel).

    Returns:
        ``(hbm, host)``: for ``fused_uvm_caching``, host = the whole shard and
        hbm = ``ceil(clf * host) + ceil(rows * (4 + 16 clf))`` (cache + its bookkeeping).
    """
    full = table_bytes(rows, cols, sparse_optimizer)
    if kernel == UVM_CACHING:
        if cache_ratio is None:
            raise ValueError(f"{UVM_CACHING} shard without a cache ratio")
        return math.ceil(full * cache_ratio) + math.ceil(rows * (4 + cache_ratio * 16)), full
    return (full, 0) if device_type == "cuda" else (0, full)


def _plan_device(params: dict) -> str:
    """cuda if any shard of the plan is placed on a cuda device, else cpu."""
    for ps in params.values():
        for s in ps.sharding_spec.shards if ps.sharding_spec is not None else []:
            if torch.device(s.placement.device()).type == "cuda":
                return "cuda"
    return "cpu"


def plan_to_dict(
    plan: Any,
    tables: list,
    sparse_optimizer: str | None = None,
    *,
    world_size: int | None = None,
    device_type: str | None = None,
) -> dict:
    """JSON-able view of ``plan``: where each table's shards live and bytes per rank.

    Args:
        plan: a ``ShardingPlan`` (from ``sharding.plan_for``).
        tables: the schema's tables (``schema.tables``: name, num_embeddings, dim), for order.
        sparse_optimizer: optimiser whose state is counted in the bytes.
        world_size: ranks of the plan (default: highest rank holding a shard + 1).
        device_type: ``cpu`` or ``cuda`` (default: read from the shards' placements).

    Returns:
        ``{"world_size", "device_type", "sparse_optimizer", "rank_bytes", "rank_hbm_bytes",
        "rank_host_bytes", "tables": {name: {"sharding_type", "compute_kernel", "cache_ratio",
        "ranks", "shards": [{"rank", "offsets": [row, col], "sizes": [rows, cols]}]}}}``.
        ``rank_bytes`` is weights + optimiser state per rank wherever they live; HBM and host
        split it by kernel (see :func:`shard_memory`; a UVM table's HBM cache is counted on top).
        ``cache_ratio`` is None unless the kernel is ``fused_uvm_caching``. A data-parallel
        table has one whole shard per rank.
    """
    params = {name: ps for mod in plan.plan.values() for name, ps in mod.items()}
    missing = [t.name for t in tables if t.name not in params]
    if missing:
        raise ValueError(f"plan has no entry for tables {missing}")
    device = device_type or _plan_device(params)
    out: dict[str, Any] = {}
    world = world_size or 1 + max(r for ps in params.values() for r in ps.ranks or [0])
    rank_bytes, hbm, host = [0] * world, [0] * world, [0] * world
    for t in tables:
        ps = params[t.name]
        if ps.sharding_spec is None:  # data parallel: a full replica on every rank
            shards = [
                {"rank": r, "offsets": [0, 0], "sizes": [t.num_embeddings, t.dim]} for r in ps.ranks
            ]
        else:
            shards = [
                {
                    "rank": s.placement.rank(),
                    "offsets": list(s.shard_offsets),
                    "sizes": list(s.shard_sizes),
                }
                for s in ps.sharding_spec.shards
            ]
        clf = ps.cache_params.load_factor if ps.compute_kernel == UVM_CACHING else None
        for s in shards:
            r = s["rank"]
            rank_bytes[r] += table_bytes(*s["sizes"], sparse_optimizer)
            h, d = shard_memory(*s["sizes"], sparse_optimizer, ps.compute_kernel, device, clf)
            hbm[r] += h
            host[r] += d
        out[t.name] = {
            "sharding_type": ps.sharding_type,
            "compute_kernel": ps.compute_kernel,
            "cache_ratio": clf,
            "ranks": sorted({s["rank"] for s in shards}),
            "shards": shards,
        }
    return {
        "world_size": world,
        "device_type": device,
        "sparse_optimizer": sparse_optimizer,
        "tables": out,
        "rank_bytes": rank_bytes,
        "rank_hbm_bytes": hbm,
        "rank_host_bytes": host,
    }


def format_plan(d: dict) -> str:
    """Human-readable table of a :func:`plan_to_dict` result (one line per table, then per rank)."""
    lines = [f"{'table':<20} {'sharding':<16} {'kernel':<17} {'cache':>5}  {'shards':>6}  ranks"]
    for name, t in d["tables"].items():
        ranks = ",".join(map(str, t["ranks"]))
        cache = "-" if t.get("cache_ratio") is None else f"{t['cache_ratio']:.2f}"
        lines.append(
            f"{name:<20} {t['sharding_type']:<16} {t['compute_kernel']:<17} {cache:>5}  "
            f"{len(t['shards']):>6}  {ranks}"
        )
    lines.append(
        f"memory per rank (fp32 weights + {d['sparse_optimizer'] or 'no'} optimizer state; "
        "UVM tables in host memory, their cache in HBM):"
    )
    lines.append(f"  {'rank':<8} {'HBM':>14} {'host':>14} {'weights+state':>14}")
    hbm = d.get("rank_hbm_bytes") or [0] * len(d["rank_bytes"])
    host = d.get("rank_host_bytes") or d["rank_bytes"]
    for r, b in enumerate(d["rank_bytes"]):
        lines.append(f"  rank {r:<3} {gb(hbm[r]):>14} {gb(host[r]):>14} {gb(b):>14}")
    return "\n".join(lines)
