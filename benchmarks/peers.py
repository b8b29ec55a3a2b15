"""Peer implementations of a workload that mdlora's pretrain is measured against.

A workload is a schema YAML plus a Parquet train dir (the reference workload of
:mod:`benchmarks.common`, or ML-1M-shaped logs). Every peer trains the same tower
(MLP ``hidden`` then Linear(H, 1) over E = sum_f D_f + N inputs) on the first
``DISTINCT_BATCHES`` batches of the data, converted to tensors BEFORE the clock starts, so it
measures the training step alone (an upper bound for a system that also reads Parquet):

- ``plain``: one process, ``nn.EmbeddingBag`` (sum, offsets) per feature + MLP, dense Adam,
  tables updated by ``--variant``: ``sparse_adagrad`` / ``sparse_adam`` (sparse gradients) or
  ``dense_adagrad``.
- ``torchrec``: raw TorchRec under torchrun: EBC on meta, ``EmbeddingShardingPlanner``
  (cpu topology, no constraints), DMP over gloo, fused rowwise Adagrad via
  ``apply_optimizer_in_backward``, dense Adam. Each rank trains its own B / W rows per step.
- ``ab``: under torchrun, raw TorchRec and mdlora's own step (``mdlora.trainer.recipes.setup_pretrain``
  + ``mdlora.trainer.loop.train_step``) built side by side in ONE process group and timed in
  alternating blocks of ``BLOCK`` steps on the same batches: on a shared machine both see the
  same load, so their ratio isolates the model/step from Ray, Parquet and the machine.

Run::

    python benchmarks/peers.py plain --schema S --data D --steps 200 --out plain.json
    python -m torch.distributed.run --nproc-per-node 2 benchmarks/peers.py torchrec --schema S --data D --out tr.json

Each writes one JSON: samples/s over the timed steps (after ``--warmup``; at most ``--steps``
and ``--max-seconds``), the unix time the first step finished, peak RSS per process (MiB),
torch threads. :func:`benchmarks.pretrain.run_peer` launches one.
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

if __name__ == "__main__":  # run as a script (torchrun): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import peak_rss_mb
from mdlora.embeddings.batch import Batch, BatchConverter
from mdlora.embeddings.schema import Schema
from mdlora.infra.logs import LogDataset

VARIANTS = ("sparse_adagrad", "sparse_adam", "dense_adagrad")
DISTINCT_BATCHES = 32  # batches cycled through; enough that hot rows differ step to step
BLOCK = 10  # steps per alternating block of the A/B run
DENSE_LR, SPARSE_LR = 1e-3, 0.05


def mlp(in_features: int, hidden: list[int]) -> nn.Sequential:
    """Linear+ReLU per hidden width, then Linear(H, 1): [B, E] -> [B, 1]."""
    widths, layers = [in_features, *hidden], []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], 1))


def load_batches(
    schema: Schema, data: str, batch: int, rank: int = 0, world: int = 1
) -> list[Batch]:
    """This rank's first ``DISTINCT_BATCHES`` batches (B rows each), converted once, unshuffled."""
    ds = LogDataset(data, schema)
    n = min(DISTINCT_BATCHES, ds.num_batches(batch, world))
    it = ds.iter_batches(
        batch,
        rank=rank,
        world_size=world,
        shuffle=False,
        prefetch=0,
        converter=BatchConverter(schema),
    )
    return list(itertools.islice(it, n))


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
    return {
        "steps": done,
        "warmup": warmup,
        "seconds": time.perf_counter() - t0,
        "first_step_unix": first,
    }


# ---- plain PyTorch --------------------------------------------------------------------------


class PlainModel(nn.Module):
    """One ``nn.EmbeddingBag`` (sum) per sparse feature + the MLP over [pooled, dense]."""

    def __init__(self, schema: Schema, hidden: list[int], sparse: bool) -> None:
        super().__init__()
        specs = [schema.table(f.table) for f in schema.sparse]
        self.tables = nn.ModuleList(
            nn.EmbeddingBag(t.num_embeddings, t.dim, mode="sum", sparse=sparse) for t in specs
        )
        for t in self.tables:
            nn.init.uniform_(t.weight, -0.01, 0.01)
        self.mlp = mlp(sum(t.dim for t in specs) + len(schema.dense), hidden)

    def forward(self, ids: list, dense: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """ids: per feature (values, offsets); dense [B, N]; labels [B] -> mean BCE loss."""
        x = torch.cat([t(v, o) for t, (v, o) in zip(self.tables, ids, strict=True)] + [dense], 1)
        return F.binary_cross_entropy_with_logits(self.mlp(x).squeeze(1), labels)


def plain_pytorch(
    schema: Schema,
    data: str,
    batch: int,
    hidden: list[int],
    steps: int,
    warmup: int,
    threads: int,
    variant: str,
    max_seconds: float = 30.0,
) -> dict:
    """Train the plain model for ``warmup + steps`` steps in this process; return the timings."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = PlainModel(schema, hidden, sparse=variant.startswith("sparse"))
    emb = list(model.tables.parameters())
    sparse_opt = {
        "sparse_adagrad": lambda: torch.optim.Adagrad(emb, lr=SPARSE_LR),
        "sparse_adam": lambda: torch.optim.SparseAdam(emb, lr=DENSE_LR),
        "dense_adagrad": lambda: torch.optim.Adagrad(emb, lr=SPARSE_LR),
    }[variant]()
    dense_opt = torch.optim.Adam(model.mlp.parameters(), lr=DENSE_LR)
    batches = []
    for b in load_batches(schema, data, batch):
        jt = b.sparse.to_dict()
        ids = [(jt[f].values(), jt[f].offsets()[:-1]) for f in schema.feature_names]
        batches.append((ids, b.dense, b.labels))

    def step(b) -> None:
        sparse_opt.zero_grad(set_to_none=True)
        dense_opt.zero_grad(set_to_none=True)
        model(*b).backward()
        sparse_opt.step()
        dense_opt.step()

    out = _timed(step, batches, steps, warmup, max_seconds)
    return out | {
        "system": "plain",
        "variant": variant,
        "world_size": 1,
        "threads": threads,
        "samples_per_s": batch * out["steps"] / out["seconds"],
        "peak_rss_mb": [peak_rss_mb()],
    }


# ---- raw TorchRec and the A/B run ------------------------------------------------------------


class TorchRecModel(nn.Module):
    """EmbeddingBagCollection + the MLP; DMP shards ``ebc`` and DDP-wraps ``mlp``."""

    def __init__(self, ebc: nn.Module, in_features: int, hidden: list[int]) -> None:
        super().__init__()
        self.ebc = ebc
        self.mlp = mlp(in_features, hidden)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Batch of B rows -> mean BCE loss."""
        x = torch.cat([self.ebc(batch.sparse).values(), batch.dense], 1)  # [B, E]
        return F.binary_cross_entropy_with_logits(self.mlp(x).squeeze(1), batch.labels)


def torchrec_step(schema: Schema, hidden: list[int], batch: int):
    """Raw TorchRec DMP (planner's free choice) -> (step function, plan)."""
    import torch.distributed as dist
    from torchrec import EmbeddingBagCollection
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.optim import RowWiseAdagrad, apply_optimizer_in_backward
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=schema.embedding_bag_configs(), device=torch.device("meta"))
    model = TorchRecModel(ebc, schema.pooled_dim() + len(schema.dense), hidden)
    apply_optimizer_in_backward(RowWiseAdagrad, model.ebc.parameters(), {"lr": SPARSE_LR})
    world = dist.get_world_size()
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"),
        batch_size=batch // world,
        debug=False,
    )
    sharders = [EmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    dense_opt = torch.optim.Adam(
        [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())], lr=DENSE_LR
    )

    def step(b: Batch) -> None:
        dense_opt.zero_grad(set_to_none=True)
        dmp(b).backward()  # the tables update themselves in backward (fused)
        dense_opt.step()

    return step, plan


def mdlora_step(schema: Schema, hidden: list[int], batch: int):
    """mdlora's own model, optimisers and step (``setup_pretrain`` + ``train_step``) -> step."""
    import torch.distributed as dist

    from mdlora.trainer.config import RunConfig
    from mdlora.trainer.env import DistEnv
    from mdlora.trainer.loop import train_step
    from mdlora.trainer.recipes import setup_pretrain

    cfg = RunConfig()
    cfg.data.batch_size, cfg.model.hidden = batch, hidden
    cfg.optim.dense_lr, cfg.optim.sparse_lr = DENSE_LR, SPARSE_LR
    env = DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size())
    s = setup_pretrain(cfg, env, schema, 10**6)

    def step(b: Batch) -> None:
        train_step(s.model, s.optimizer, b, s.dense_params, 0.0)
        s.scheduler.step()

    return step


def _rank_bytes(plan, world: int) -> list[int]:
    """Embedding weight bytes per rank of a torchrec ShardingPlan."""
    out = [0] * world
    for mod in plan.plan.values():
        for ps in mod.values():
            for s in ps.sharding_spec.shards if ps.sharding_spec else []:
                out[s.placement.rank()] += s.shard_sizes[0] * s.shard_sizes[1] * 4
    return out


def distributed(a: argparse.Namespace, schema: Schema) -> dict:
    """``torchrec`` or ``ab`` on this torchrun rank; returns rank 0's view of the run."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    local = a.batch // world
    batches = load_batches(schema, a.data, local, rank, world)  # every rank reads its own rows
    tr_step, plan = torchrec_step(schema, a.hidden, a.batch)

    def agree(stop: bool) -> bool:
        flag = torch.tensor([int(stop)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    if a.system == "torchrec":
        out = _timed(tr_step, batches, a.steps, a.warmup, a.max_seconds, dist.barrier, agree)
        out["samples_per_s"] = a.batch * out["steps"] / out["seconds"]
    else:
        md_step = mdlora_step(schema, a.hidden, a.batch)
        steps = {"torchrec": tr_step, "mdlora": md_step}
        secs, n = dict.fromkeys(steps, 0.0), dict.fromkeys(steps, 0)
        for b in batches[: max(1, a.warmup)]:
            tr_step(b)
            md_step(b)
        out = {"warmup": a.warmup, "first_step_unix": time.time()}
        t_end, i = time.perf_counter() + a.max_seconds, 0
        while i * BLOCK < a.steps and not agree(time.perf_counter() > t_end):
            for name in steps if i % 2 == 0 else reversed(steps):  # ABBA order
                r = _timed(
                    steps[name],
                    batches[(i * BLOCK) % len(batches) :] + batches,
                    BLOCK,
                    0,
                    1e9,
                    dist.barrier,
                )
                secs[name], n[name] = secs[name] + r["seconds"], n[name] + r["steps"]
            i += 1
        out.update(
            steps=n["mdlora"],
            block=BLOCK,
            seconds=secs,
            samples_per_s={k: a.batch * n[k] / secs[k] for k in steps},
            ratio=(n["mdlora"] / secs["mdlora"]) / (n["torchrec"] / secs["torchrec"]),
        )
    rss = [None] * world
    dist.all_gather_object(rss, peak_rss_mb())
    sharding = sorted({ps.sharding_type for mod in plan.plan.values() for ps in mod.values()})
    return out | {
        "system": a.system,
        "world_size": world,
        "threads": torch.get_num_threads(),
        "peak_rss_mb": rss,
        "sharding_types": sharding,
        "embedding_weight_bytes_per_rank": _rank_bytes(plan, world),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI: ``plain``, ``torchrec`` or ``ab`` (the last two under torchrun); JSON to ``--out``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("system", choices=["plain", "torchrec", "ab"])
    p.add_argument("--schema", required=True)
    p.add_argument("--data", required=True, help="Parquet train dir")
    p.add_argument("--batch", type=int, default=2048, help="global batch size")
    p.add_argument("--hidden", type=lambda s: [int(x) for x in s.split(",")], default=[256, 128])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--variant", default="sparse_adagrad", choices=VARIANTS)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: cores / processes)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="cap on the timed phase")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    schema = Schema.load(a.schema)
    world = int(os.environ.get("WORLD_SIZE", 1))
    threads = a.threads or max(1, (os.cpu_count() or 1) // world)
    if a.system == "plain":
        result = plain_pytorch(
            schema, a.data, a.batch, a.hidden, a.steps, a.warmup, threads, a.variant, a.max_seconds
        )
    else:
        import torch.distributed as dist

        torch.set_num_threads(threads)
        dist.init_process_group("gloo")
        try:
            result = distributed(a, schema)
        finally:
            dist.destroy_process_group()
        if int(os.environ.get("RANK", 0)) != 0:
            return 0
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    rc = main()
    # Leave without interpreter finalisation: the DMP/DDP still holds the gloo group, whose worker
    # thread may be freeing a finished collective's tensors (a Python decref) while Python shuts
    # down; that thread is then cancelled inside a noexcept frame and the process aborts (SIGABRT,
    # "terminate called without an active exception"; seen in 2 of 5 two-process runs here).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
