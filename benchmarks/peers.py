"""Peer implementations of the reference workload that mdlora's pretrain is measured against.

Each peer trains the reference model (see :mod:`benchmarks.common`) on batches materialised
before the clock starts, so it measures the training step alone (an upper bound for a system
that also reads Parquet):

- ``plain``: one process, ``nn.EmbeddingBag`` per feature + MLP, dense Adam; the tables are
  updated by ``--variant``: ``sparse_adagrad`` (sparse=True gradients, torch Adagrad),
  ``sparse_adam`` (sparse=True, SparseAdam) or ``dense_adagrad`` (sparse=False, torch Adagrad).
- ``torchrec``: raw TorchRec under torchrun: EBC on meta, EmbeddingShardingPlanner
  (Topology compute_device cpu), DistributedModelParallel over gloo, fused rowwise Adagrad via
  ``apply_optimizer_in_backward``, dense Adam. Each rank trains on its own B / W rows per step.

Run::

    python benchmarks/peers.py plain --steps 200 --out plain.json
    python -m torch.distributed.run --nproc-per-node 2 benchmarks/peers.py torchrec --steps 200 --out tr.json

Each writes one JSON: samples/s over the timed steps (after ``--warmup`` steps; at most
``--steps`` and ``--max-seconds``), the unix time at which the first step finished (the caller
subtracts its launch time), peak RSS per process (MiB), torch threads. :func:`measure_peers`
runs every peer this way, one subprocess (group) each, at nice ``RAY_WORKER_NICE``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __name__ == "__main__":  # run as a script (torchrun): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    Reference,
    failure,
    launch,
    peak_rss_mb,
    reference_ids,
    reference_labels,
)

ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(__file__).resolve()
VARIANTS = ("sparse_adagrad", "sparse_adam", "dense_adagrad")
RAY_WORKER_NICE = 15
"""Ray starts its workers at nice 15 (``RAY_worker_niceness``); peers run at the same niceness so
that other load on a shared machine slows every trainer alike."""
DISTINCT_BATCHES = 32  # batches cycled through; enough that hot rows differ step to step


def mlp(ref: Reference) -> nn.Sequential:
    """The reference tower: Linear+ReLU per hidden width, then Linear(H, 1): [B, F*D] -> [B, 1]."""
    widths, layers = [ref.features * ref.dim, *ref.hidden], []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], 1))


def _timed(
    step,
    batches: list,
    steps: int,
    warmup: int,
    max_seconds: float,
    sync=lambda: None,
    agree=lambda stop: stop,
) -> dict:
    """Run ``warmup`` then up to ``steps`` timed steps cycling over ``batches``.

    The timed phase also ends, every 10 steps, once it has run ``max_seconds`` (``agree``
    makes every rank take the same decision), so a loaded machine cannot stretch the run.
    """
    done = 0
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        if i > warmup and (i - warmup) % 10 == 0 and agree(time.perf_counter() - t0 > max_seconds):
            break
        step(batches[i % len(batches)])
        done += i >= warmup
        if i == 0:
            first = time.time()
    sync()
    seconds = time.perf_counter() - t0
    return {"steps": done, "warmup": warmup, "seconds": seconds, "first_step_unix": first}


# ---- running the peers (from the benchmark driver) -----------------------------------------


def _peer(args: list[str], nproc: int, out: Path, timeout: float, retries: int = 1) -> dict:
    """One peer run (``plain`` alone, ``torchrec`` under torchrun with ``nproc`` processes).

    A failed run is retried ``retries`` times (a 2-process gloo run here aborted
    once in about ten runs); the failure stays in the result as ``failed_attempts``.
    """
    launcher = [sys.executable]
    if args[0] == "torchrec":
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    failed = []
    for _ in range(retries + 1):
        out.unlink(missing_ok=True)
        cmd = [*launcher, str(PEERS), *args, "--out", str(out)]
        run = launch(cmd, ROOT, timeout, nice=RAY_WORKER_NICE)
        if run["rc"] == 0 and out.exists():
            break
        failed.append(failure(run, f"{args[0]} ({nproc} processes)"))
    else:
        return {**failed[-1], "failed_attempts": failed}
    r = json.loads(out.read_text())
    r["time_to_first_batch_s"] = r.pop("first_step_unix") - run["t_launch"]
    r["wall_s"], r["nice"], r["load"] = run["wall"], RAY_WORKER_NICE, run["load"]
    return {**r, "failed_attempts": failed} if failed else r


def measure_peers(
    ref: Reference,
    steps: int,
    warmup: int,
    work: Path,
    *,
    variants=VARIANTS,
    world_sizes=(1, 2),
    max_seconds: float = 30.0,
    timeout: float = 300,
) -> dict:
    """Plain PyTorch (each variant) and raw TorchRec (each world size), one subprocess each."""
    common = [
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--rows",
        str(ref.rows),
        "--max-seconds",
        str(max_seconds),
    ]
    out: dict = {"plain": {}, "torchrec": {}}
    for v in variants:
        out["plain"][v] = _peer(
            ["plain", *common, "--variant", v], 1, work / f"plain_{v}.json", timeout
        )
    for w in world_sizes:
        out["torchrec"][str(w)] = _peer(
            ["torchrec", *common], w, work / f"torchrec_{w}.json", timeout
        )
    return out


# ---- plain PyTorch --------------------------------------------------------------------------


class PlainModel(nn.Module):
    """One ``nn.EmbeddingBag`` (sum) per feature + the reference MLP."""

    def __init__(self, ref: Reference, sparse: bool) -> None:
        super().__init__()
        self.tables = nn.ModuleList(
            nn.EmbeddingBag(ref.rows, ref.dim, mode="sum", sparse=sparse)
            for _ in range(ref.features)
        )
        for t in self.tables:
            nn.init.uniform_(t.weight, -0.01, 0.01)
        self.mlp = mlp(ref)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """ids int64 [F, B, 1], labels [B] -> mean BCE loss."""
        x = torch.cat([t(i) for t, i in zip(self.tables, ids, strict=True)], dim=1)  # [B, F*D]
        return F.binary_cross_entropy_with_logits(self.mlp(x).squeeze(1), labels)


def plain_pytorch(
    ref: Reference, steps: int, warmup: int, threads: int, variant: str, max_seconds: float = 30.0
) -> dict:
    """Train the plain model for ``warmup + steps`` steps in this process; return the timings."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = PlainModel(ref, sparse=variant.startswith("sparse"))
    emb = list(model.tables.parameters())
    sparse_opt = {
        "sparse_adagrad": lambda: torch.optim.Adagrad(emb, lr=ref.sparse_lr),
        "sparse_adam": lambda: torch.optim.SparseAdam(emb, lr=ref.dense_lr),
        "dense_adagrad": lambda: torch.optim.Adagrad(emb, lr=ref.sparse_lr),
    }[variant]()
    dense_opt = torch.optim.Adam(model.mlp.parameters(), lr=ref.dense_lr)
    batches = []
    for k in range(DISTINCT_BATCHES):
        ids = torch.from_numpy(reference_ids(ref, ref.batch, seed=k)).unsqueeze(2)  # [F, B, 1]
        batches.append((ids, torch.from_numpy(reference_labels(ref.batch, seed=k))))

    def step(batch) -> None:
        sparse_opt.zero_grad(set_to_none=True)
        dense_opt.zero_grad(set_to_none=True)
        model(*batch).backward()
        sparse_opt.step()
        dense_opt.step()

    out = _timed(step, batches, steps, warmup, max_seconds)
    out.update(
        system="plain",
        variant=variant,
        world_size=1,
        threads=threads,
        samples_per_s=ref.batch * out["steps"] / out["seconds"],
        peak_rss_mb=[peak_rss_mb()],
    )
    return out


# ---- raw TorchRec ---------------------------------------------------------------------------


class TorchRecModel(nn.Module):
    """EmbeddingBagCollection + the reference MLP; DMP shards ``ebc`` and DDP-wraps ``mlp``."""

    def __init__(self, ebc: nn.Module, ref: Reference) -> None:
        super().__init__()
        self.ebc = ebc
        self.mlp = mlp(ref)

    def forward(self, kjt, labels: torch.Tensor) -> torch.Tensor:
        """KJT (F keys, B rows) and labels [B] -> mean BCE loss."""
        x = self.ebc(kjt).values()  # [B, F*D]
        return F.binary_cross_entropy_with_logits(self.mlp(x).squeeze(1), labels)


def torchrec_rank(ref: Reference, steps: int, warmup: int, max_seconds: float = 30.0) -> dict:
    """One torchrun rank (the process group must exist); returns rank 0's view of the run."""
    import torch.distributed as dist
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.optim import RowWiseAdagrad, apply_optimizer_in_backward
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(
            name=f"t{i}", embedding_dim=ref.dim, num_embeddings=ref.rows, feature_names=[f]
        )
        for i, f in enumerate(ref.names)
    ]
    model = TorchRecModel(EmbeddingBagCollection(tables=tables, device=torch.device("meta")), ref)
    apply_optimizer_in_backward(RowWiseAdagrad, model.ebc.parameters(), {"lr": ref.sparse_lr})
    local = ref.batch // world
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"), batch_size=local, debug=False
    )
    sharders = [EmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    dense_opt = torch.optim.Adam(
        [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())], lr=ref.dense_lr
    )
    batches = []
    for k in range(DISTINCT_BATCHES):
        seed = k * world + rank  # every rank reads its own rows
        ids = torch.from_numpy(reference_ids(ref, local, seed=seed))  # [F, b], key-major
        kjt = KeyedJaggedTensor(
            keys=ref.names,
            values=ids.reshape(-1),
            lengths=torch.ones(ref.features * local, dtype=torch.int64),
        )
        batches.append((kjt, torch.from_numpy(reference_labels(local, seed=seed))))

    def step(batch) -> None:
        dense_opt.zero_grad(set_to_none=True)
        dmp(*batch).backward()  # the tables update themselves in backward (fused)
        dense_opt.step()

    def agree(stop: bool) -> bool:
        flag = torch.tensor([int(stop)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    out = _timed(step, batches, steps, warmup, max_seconds, sync=dist.barrier, agree=agree)
    rss = [None] * world
    dist.all_gather_object(rss, peak_rss_mb())
    sharding = {name: ps.sharding_type for mod in plan.plan.values() for name, ps in mod.items()}
    rank_bytes = [0] * world
    for mod in plan.plan.values():
        for ps in mod.values():
            for s in ps.sharding_spec.shards if ps.sharding_spec else []:
                rank_bytes[s.placement.rank()] += s.shard_sizes[0] * s.shard_sizes[1] * 4
    out.update(
        system="torchrec",
        world_size=world,
        threads=torch.get_num_threads(),
        samples_per_s=ref.batch * out["steps"] / out["seconds"],
        peak_rss_mb=rss,
        sharding_types=sorted(set(sharding.values())),
        embedding_weight_bytes_per_rank=rank_bytes,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: ``plain`` or ``torchrec`` (under torchrun); writes the result JSON to ``--out``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("system", choices=["plain", "torchrec"])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--rows", type=int, default=Reference().rows, help="rows per table")
    p.add_argument(
        "--variant",
        default="sparse_adagrad",
        choices=["sparse_adagrad", "sparse_adam", "dense_adagrad"],
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: cores / processes)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="cap on the timed phase")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    ref = Reference(rows=a.rows)
    world = int(os.environ.get("WORLD_SIZE", 1))
    threads = a.threads or max(1, (os.cpu_count() or 1) // world)
    if a.system == "plain":
        result = plain_pytorch(ref, a.steps, a.warmup, threads, a.variant, a.max_seconds)
    else:
        import torch.distributed as dist

        torch.set_num_threads(threads)
        dist.init_process_group("gloo")
        try:
            result = torchrec_rank(ref, a.steps, a.warmup, a.max_seconds)
        finally:
            dist.destroy_process_group()
        if int(os.environ.get("RANK", 0)) != 0:
            return 0
    result["reference"] = ref.to_dict()
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
