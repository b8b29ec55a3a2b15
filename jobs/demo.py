"""``make demo``: the whole pipeline on an embedded default, end to end, in a few minutes.

synthetic logs (one domain held out) -> validate -> embedded local Ray -> pretrain on 2 workers
with sharded tables -> adapt every domain in parallel -> publish bundles -> add the held-out
domain -> score the test split -> per-domain AUC table (backbone vs adapter), Markdown + PNG.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from mdlora.infra.log import setup_logging

STEPS = 7
ALPHA = 32  # LoRA temperature: ranks [4, 2, 1] on the demo's 128-64 tower
SHIFTS = "a,b,c,d,e"  # every shift family of gen-logs: what surfaces differ in (infra/synth_world.py)


def step(i: int, text: str) -> None:
    """Progress line for the demo's steps."""
    print(f"\n[{i}/{STEPS}] {text}", flush=True)


def run(out: Path, rows: int, domains: int, seed: int) -> dict:
    """Run every stage into ``out``; return the summary (also written as JSON)."""
    from mdlora.config import from_dict
    from mdlora.infra.adapt import adapt, add_domain
    from mdlora.infra.logs import validate_dataset
    from mdlora.infra.pretrain import pretrain
    from mdlora.infra.report import auc_table, write_report
    from mdlora.infra.runs import load_schema
    from mdlora.infra.score import Scorer
    from mdlora.infra.synth import generate
    from mdlora.trainer.config import AdaptConfig, RunConfig

    t0 = time.time()
    logs, root = out / "logs", out / "registry"
    step(1, f"synthetic logs: {rows:,} rows, {domains} domains (the smallest held out), shift families "
            f"{SHIFTS} -> {logs}")
    gen = generate(str(logs), rows=rows, domains=domains, seed=seed, holdout_domains=1,
                   users=2_000, items=2_000, shifts=SHIFTS)
    held = sorted(p.name for p in (logs / "heldout").iterdir())
    schema = load_schema(str(logs / "schema.yaml"))
    step(2, "validate the training logs against the schema")
    report = validate_dataset(str(logs / "train"), schema)
    if report["errors"]:
        raise SystemExit("\n".join(report["errors"]))
    print(f"  {report['rows']:,} rows, {len(report['domains'])} domains, no problems")

    data = {"schema": str(logs / "schema.yaml"), "train": str(logs / "train"),
            "val": str(logs / "val"), "test": str(logs / "test")}
    step(3, "pretrain the backbone: 2 Ray Train workers (gloo), tables sharded table-wise")
    run_cfg = from_dict(RunConfig, {
        "data": {**data, "batch_size": 1024}, "model": {"hidden": [128, 64]},
        "optim": {"dense_lr": 0.002, "sparse_lr": 0.05},
        "loop": {"epochs": 3, "log_every": 100, "seed": seed},
        "dist": {"world_size": 2, "sharding_types": ["table_wise"]},
        "output": {"root": str(root), "model": "demo"},
    })
    backbone = pretrain(run_cfg, run_name="demo-pretrain")
    print(f"  backbone {backbone['version']} at {backbone['path']} (validation WAUC "
          f"{backbone['metrics'].get('wauc', float('nan')):.4f})")

    adapt_cfg = from_dict(AdaptConfig, {
        "data": {**data, "batch_size": 2048}, "lora": {"method": "mlora", "alpha": ALPHA, "wide": ["*"]},
        "dist": {"world_size": 2}, "loop": {"epochs": 8, "patience": 2, "seed": seed},
        "output": {"root": str(root), "model": "demo"},
    })
    step(4, f"adapt all {len(schema.domain.values)} domains in parallel (MLoRA + wide), publish bundles")
    adapted = adapt(adapt_cfg)
    step(5, f"add the held-out domain {held[0]} (touches no other bundle)")
    added = add_domain(adapt_cfg, held[0], str(logs / "heldout" / held[0]))

    step(6, "score the test split: backbone alone vs each row routed to its domain's adapter")
    tests = [str(logs / "test"), str(logs / "heldout" / held[0] / "test")]
    base, tuned = Scorer(str(root), "demo", bundles={}), Scorer(str(root), "demo")
    scores = {"backbone": [base.score_dataset(t, str(out / f"pred-backbone-{i}.parquet")) for i, t in enumerate(tests)],
              "adapters": [tuned.score_dataset(t, str(out / f"pred-adapters-{i}.parquet")) for i, t in enumerate(tests)]}
    table = auc_table(scores["backbone"], scores["adapters"])

    step(7, "report")
    summary = {"seconds": round(time.time() - t0, 1), "logs": gen, "backbone": backbone,
               "adapt": adapted, "add_domain": added, "auc": table, "out": str(out)}
    paths = write_report(out, summary)
    print(paths["markdown_table"])
    print(f"\nwritten: registry {root}\n         report {paths['md']}\n         plot {paths['png']}"
          f"\n         summary {out / 'summary.json'}\ndone in {summary['seconds']} s")
    return summary


MARKER = ".mdlora-demo"
"""Marks a demo's output directory: only such a directory is replaced by the next run."""


def main() -> None:
    """CLI of the demo (``python -m mdlora.jobs.demo``)."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo-out",
                    help="output directory: created, or replaced when it holds an earlier demo's output")
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--domains", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    setup_logging()
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():  # never delete a directory this demo did not make
            sys.exit(f"demo: --out {out} exists and is not an earlier demo's output (no {MARKER}); "
                     "give an empty or new directory")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `python -m mdlora.jobs.demo`; the next demo run replaces this directory\n")
    summary = run(out, args.rows, args.domains, args.seed)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
