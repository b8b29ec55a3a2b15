"""The CUDA path on a real GPU: nccl, row-wise sharding, CUDA fbgemm-gpu fused optimisers.

Runs the same code the CPU jobs run (``mdlora.trainer.recipes.setup_pretrain``, ``mdlora.trainer.loop``,
``mdlora.embeddings.sharding``/``checkpoint``) on ``cuda`` with a 1-rank nccl group, on the reference
model (10 tables x 100k x 16, MLP 256-128, batch 2048), and checks:

* the plan is row-wise with fused (TBE) kernels on cuda, and the planner can plan 8 x 80 GB;
* training with fused rowwise-Adagrad and with fused Adam (GPU-only) lowers the loss;
* a checkpoint written on the GPU, loaded unsharded on the CPU, predicts the same.

Usage (needs a GPU)::

    python -m benchmarks.gpu_check --out gpu_check.json
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

TABLES, ROWS, DIM, BATCH = 10, 100_000, 16, 2048


def reference_schema() -> Schema:
    """10 single-valued index features, one table each, plus a domain column."""
    return Schema.from_dict({
        "name": "reference", "label": "click",
        "domain": {"column": "domain", "values": ["d0", "d1", "d2"]},
        "tables": [{"name": f"t{i}", "num_embeddings": ROWS, "dim": DIM} for i in range(TABLES)],
        "sparse": [{"name": f"f{i}", "table": f"t{i}", "policy": "index"} for i in range(TABLES)],
    })


def make_table(rng: np.random.Generator, n: int) -> pa.Table:
    """Zipf-ish ids; the label is a learnable function of f0's and f1's ids."""
    cols = {f"f{i}": (rng.zipf(1.2, n) - 1) % ROWS for i in range(TABLES)}
    logit = np.where(cols["f0"] % 3 == 0, 1.5, -1.0) + np.where(cols["f1"] % 2 == 0, 0.8, -0.8)
    cols["click"] = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    cols["domain"] = np.array(["d0", "d1", "d2"])[rng.integers(0, 3, n)]
    return pa.table(cols)


def run(sparse_optimizer: str, sharding: str, steps: int, schema: Schema, batches: list) -> dict:
    """Build, shard and train on cuda; return plan facts, losses and samples/s."""
    cfg = from_dict(RunConfig, {
        "data": {"batch_size": BATCH}, "model": {"hidden": [256, 128]},
        "optim": {"sparse_optimizer": sparse_optimizer, "sparse_lr": 0.05 if sparse_optimizer != "adam" else 0.005},
        "dist": {"device": "cuda", "sharding_types": [sharding]},
    })
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cuda:0"))
    setup = setup_pretrain(cfg, env, schema, total_steps=steps)
    losses, t0, timed = [], None, 0
    for i in range(steps):
        if i == 20:  # warm-up done
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss = train_step(setup.model, setup.optimizer, batches[i % len(batches)].to(env.device),
                          setup.dense_params, 0.0)
        losses.append(loss)
        timed += i >= 20
    torch.cuda.synchronize()
    rate = timed * BATCH / (time.perf_counter() - t0)
    losses = [x.item() for x in losses]
    tables = setup.plan["tables"]
    return {
        "sparse_optimizer": sparse_optimizer, "sharding_requested": sharding,
        "sharding_types": sorted({t["sharding_type"] for t in tables.values()}),
        "compute_kernels": sorted({t["compute_kernel"] for t in tables.values()}),
        "loss_first_20": float(np.mean(losses[:20])), "loss_last_20": float(np.mean(losses[-20:])),
        "samples_per_s": round(rate), "setup": setup,
    }


def main() -> None:
    """Run every check and write the JSON report."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="gpu_check.json")
    args = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    import fbgemm_gpu
    import torchrec

    schema, rng = reference_schema(), np.random.default_rng(0)
    conv = BatchConverter(schema)
    batches = [conv.convert(make_table(rng, BATCH)) for _ in range(50)]
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "torchrec": torchrec.__version__, "fbgemm_gpu": getattr(fbgemm_gpu, "__version__", "?"),
              "backend": torch.distributed.get_backend(), "runs": []}
    for opt, shard in [("rowwise_adagrad", "row_wise"), ("adam", "row_wise"), ("rowwise_adagrad", "table_wise")]:
        r = run(opt, shard, args.steps, schema, batches)
        setup = r.pop("setup")
        report["runs"].append(r)
        print(json.dumps(r), flush=True)
    # GPU-written checkpoint -> unsharded CPU model: same predictions
    with tempfile.TemporaryDirectory() as d:
        from mdlora.embeddings.checkpoint import write_shards

        write_shards(Path(d), setup.model, setup.optimizer)
        cpu = load_unsharded(d, schema, from_dict(RunConfig, {"model": {"hidden": [256, 128]}}).model)
        setup.model.eval()
        with torch.no_grad():
            b = batches[0]
            _, (_, gpu_logits, _) = setup.model(b.to("cuda:0"))
            _, (_, cpu_logits, _) = cpu(b)
        report["gpu_to_cpu_max_abs_diff"] = float((gpu_logits.cpu() - cpu_logits).abs().max())
    # planning for a cluster topology (simulation): 8 x 80 GB
    from mdlora.embeddings import sharding
    from mdlora.embeddings.tables import build_ebc
    from mdlora.trainer.backbone import build_backbone
    from mdlora.trainer.task import CTRTask

    sim = CTRTask(build_backbone(schema, from_dict(RunConfig, {}).model, build_ebc(schema, "meta")))
    sharding.apply_sparse_optimizer(sim, "adam", 0.01, "cuda")
    plan = sharding.plan_to_dict(sharding.plan_for(sim, 8, "cuda", hbm_gb=80, sharding_types=["row_wise"]),
                                 schema.tables, "adam")
    report["plan_8x80gb_row_wise_ranks"] = sorted({r for t in plan["tables"].values() for r in t["ranks"]})
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
