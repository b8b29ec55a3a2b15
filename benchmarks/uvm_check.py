"""UVM caching (``dist.uvm``) on a real GPU: a table kept in host memory behind an HBM cache.

Prepared for the first session with a GPU lent (not yet run: the CPU tests plan it by
simulation, ``tests/embeddings/test_uvm.py``). On one GPU, 1-rank nccl group, it trains the same
model twice on the same batches: ``hbm_gb=3`` with ``uvm: true`` (the 20M x 64 table, 5.2 GB with
its rowwise-Adagrad state, cannot fit and must plan as ``fused_uvm_caching``) after ``hbm_gb=80``
(all ``fused``, the reference). It checks:

* the plan puts the big table on ``fused_uvm_caching`` with the configured cache ratio;
* the loss falls as in the HBM run, and the peak allocated HBM stays under the budget;
* a checkpoint of the UVM-cached model, loaded unsharded on the CPU, predicts the same.

Usage (needs a GPU, ~2 min on an H100)::

    python -m benchmarks.uvm_check --out uvm_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from mdlora.config import from_dict
from mdlora.embeddings.batch import BatchConverter
from mdlora.embeddings.schema import Schema
from mdlora.trainer.config import RunConfig
from mdlora.trainer.env import DistEnv
from mdlora.trainer.loop import train_step
from mdlora.trainer.recipes import load_unsharded, setup_pretrain

BIG, SMALL, BATCH, HIDDEN = 20_000_000, 100_000, 2048, [256, 128]


def uvm_schema() -> Schema:
    """One 20M x 64 table (too big for a 3 GB budget) and three 100k x 16 ones."""
    tables = [{"name": "big", "num_embeddings": BIG, "dim": 64}]
    tables += [{"name": f"t{i}", "num_embeddings": SMALL, "dim": 16} for i in range(3)]
    return Schema.from_dict({
        "name": "uvm", "label": "click",
        "domain": {"column": "domain", "values": ["d0", "d1"]},
        "tables": tables,
        "sparse": [{"name": f"f_{t['name']}", "table": t["name"], "policy": "index"} for t in tables],
    })


def make_table(rng: np.random.Generator, n: int) -> pa.Table:
    """Zipf ids over each table's rows (the cache sees a hot head and a long tail); a learnable label."""
    cols = {"f_big": (rng.zipf(1.05, n) - 1) % BIG}
    cols |= {f"f_t{i}": (rng.zipf(1.2, n) - 1) % SMALL for i in range(3)}
    logit = np.where(cols["f_big"] % 3 == 0, 1.5, -1.0) + np.where(cols["f_t0"] % 2 == 0, 0.8, -0.8)
    cols["click"] = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    cols["domain"] = np.array(["d0", "d1"])[rng.integers(0, 2, n)]
    return pa.table(cols)


def run(dist: dict, steps: int, schema: Schema, batches: list):
    """Build, shard and train on cuda:0 under ``dist``; return (facts, setup)."""
    cfg = from_dict(RunConfig, {
        "data": {"batch_size": BATCH}, "model": {"hidden": HIDDEN},
        "optim": {"sparse_optimizer": "rowwise_adagrad", "sparse_lr": 0.05},
        "dist": {"device": "cuda", **dist},
    })
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cuda:0"))
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    setup = setup_pretrain(cfg, env, schema, total_steps=steps)
    losses, t0 = [], 0.0
    for i in range(steps):
        if i == 20:  # warm-up (and cache fill) done
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        losses.append(train_step(setup.model, setup.optimizer, batches[i % len(batches)].to(env.device),
                                 setup.dense_params, 0.0))
    torch.cuda.synchronize()
    losses = [x.item() for x in losses]
    big = setup.plan["tables"]["big"]
    return {
        "dist": dist, "big_kernel": big["compute_kernel"], "big_cache_ratio": big["cache_ratio"],
        "planned_hbm_bytes": setup.plan["rank_hbm_bytes"][0],
        "planned_host_bytes": setup.plan["rank_host_bytes"][0],
        "peak_allocated_bytes": torch.cuda.max_memory_allocated() - base,
        "loss_first_20": float(np.mean(losses[:20])), "loss_last_20": float(np.mean(losses[-20:])),
        "samples_per_s": round((steps - 20) * BATCH / (time.perf_counter() - t0)),
    }, setup


def main() -> None:
    """Run both configurations and the checkpoint check; write the JSON report."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default="uvm_check.json")
    args = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29534")
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    schema, rng = uvm_schema(), np.random.default_rng(0)
    conv = BatchConverter(schema)
    batches = [conv.convert(make_table(rng, BATCH)) for _ in range(50)]
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": []}
    for dist in [{"hbm_gb": 80}, {"hbm_gb": 3, "uvm": True, "host_gb": 32, "uvm_cache_ratio": 0.2}]:
        facts, uvm_setup = run(dist, args.steps, schema, batches)  # the last one is kept
        report["runs"].append(facts)
        print(json.dumps(facts), flush=True)
    torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as d:  # UVM-cached shards -> unsharded CPU model
        from mdlora.embeddings.checkpoint import write_shards

        write_shards(Path(d), uvm_setup.model, uvm_setup.optimizer)
        cpu = load_unsharded(d, schema, from_dict(RunConfig, {"model": {"hidden": HIDDEN}}).model)
        uvm_setup.model.eval()
        with torch.no_grad():
            _, (_, gpu_logits, _) = uvm_setup.model(batches[0].to("cuda:0"))
            _, (_, cpu_logits, _) = cpu(batches[0])
        report["uvm_gpu_to_cpu_max_abs_diff"] = float((gpu_logits.cpu() - cpu_logits).abs().max())
    report["uvm_planned"] = report["runs"][1]["big_kernel"] == "fused_uvm_caching"
    report["uvm_peak_under_budget"] = report["runs"][1]["peak_allocated_bytes"] <= 3 * 2**30
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
