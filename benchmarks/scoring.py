"""Mixed-domain scoring throughput: per-row adapters vs the backbone alone, through ``Scorer``.

Set-up (untimed): the reference schema with ``domains`` natural domains; a backbone built and
checkpointed by mdlora's own recipe (``setup_pretrain`` in a 1-rank gloo group,
``Setup.save``) and published with ``mdlora.infra.pretrain.publish_backbone``; one MLoRA bundle per
domain (default LoRA config, every factor random so no update is zero) written with
``mdlora.infra.artifacts.bundle.write_bundle`` and promoted to production in the registry.

Timed: :meth:`mdlora.infra.score.Scorer.score_table` on the same N mixed-domain rows (an Arrow table in
memory: conversion + lookups + tower + routing, no Parquet I/O) by a Scorer holding every
domain's production bundle and by one holding none (``bundles={}``: the plain backbone).
The two are run in alternating order ``repeat`` times (ABBA), one torch thread; rows/s = rows x
runs / summed seconds, wall and CPU (one thread: Arrow and torch pinned to 1, so CPU seconds
are the per-core cost, immune to a loaded machine); the ratio adapters / backbone of rows per CPU
second is the figure (goal >= ``GOAL``).
The adapter runs are sampled by py-spy (:mod:`benchmarks.profiling`) to name the bottleneck.

Scale mode (:func:`run_scale`, ``python -m benchmarks.scoring --scale``): ``mdlora score`` (the
CLI, its own process, ``--set score.workers=W``) on 1M rows and on M times those rows (the 1M
files hard-linked M times: the same rows, so cost per row compares like with like), each with
1 worker (in process, no Ray) and 2 (Ray tasks). Polled every 0.2 s (/proc): wall time, driver
peak RSS, the largest Ray worker's peak RSS; rows/s = rows / wall (Ray start, loading and the
metrics included); cost per row of M million vs 1 million rows per worker count (goal <= 1.25).

    python -m benchmarks.scoring --scale --rows 1000000,10000000 --workers 1,2 \
        --out benchmarks/results/2026-12-07/scoring_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.common import (
    Reference,
    failure,
    launch,
    machine,
    write_reference_parquet,
    write_results,
)
from benchmarks.profiling import bottleneck, profile_self

GOAL = 0.8
SCALE_GOAL = 1.25
"""Scale mode: cost per row of the largest input over the 1M-row one, at most."""
ROOT = Path(__file__).resolve().parents[1]


def publish_fixture(work: Path, ref: Reference, rows: int) -> tuple[str, str, Path]:
    """Data, a published backbone and one production bundle per domain -> (root, model, data)."""
    from benchmarks.scaling import one_rank_group
    from mdlora.adapters.config import LoraConfig
    from mdlora.adapters.inject import inject
    from mdlora.config import to_dict
    from mdlora.embeddings.schema import Schema
    from mdlora.infra.artifacts import open_backbone, publish_backbone
    from mdlora.infra.artifacts.bundle import BundleManifest, write_bundle
    from mdlora.infra.artifacts.registry import Registry
    from mdlora.infra.storage import open_fs
    from mdlora.trainer.config import RunConfig
    from mdlora.trainer.env import DistEnv
    from mdlora.trainer.loop import TrainState
    from mdlora.trainer.recipes import load_unsharded, setup_pretrain

    train, schema_path = write_reference_parquet(work / "data", ref, n=rows)
    schema = Schema.load(schema_path)
    cfg = RunConfig()
    cfg.data.schema, cfg.data.train, cfg.model.hidden = (
        str(schema_path),
        str(train),
        list(ref.hidden),
    )
    cfg.output.root, cfg.output.model = str(work / "registry"), "score"
    with one_rank_group():
        setup = setup_pretrain(cfg, DistEnv(), schema, 1)
        setup.save(work / "ckpt", TrainState())
    publish_backbone(cfg, schema, work / "ckpt")
    info = open_backbone(cfg.output.root, "score", "production", work / "cache")
    lora, domains = LoraConfig(), schema.domain.values
    backbone = load_unsharded(info.path, info.schema, info.run.model).backbone
    adapted = inject(backbone, lora, domains, None, root="tower")
    registry = Registry(*open_fs(cfg.output.root))
    g = torch.Generator().manual_seed(0)
    dense = sum(p.numel() for n, p in backbone.named_parameters() if not n.startswith("embeddings"))
    for d in domains:
        state = {
            k: torch.randn(v.shape, generator=g) * 0.05 for k, v in adapted.state_for(d).items()
        }
        count = sum(v.numel() for v in state.values())
        manifest = BundleManifest(
            domain=d,
            method="mlora",
            lora=to_dict(lora),
            backbone=info.ref(),
            schema_hash=info.schema.content_hash(),
            param_count=count,
            param_share=count / dense,
        )
        write_bundle(work / "bundles" / d, state, manifest)
        registry.promote("adapters", d, registry.publish("adapters", d, work / "bundles" / d))
    return cfg.output.root, "score", train


def run(work: Path, quick: bool, repeat: int | None = None) -> dict:
    """Build the fixture, time both scorers on the same rows, return the figures."""
    from mdlora.infra.score import Scorer

    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    ref = Reference(rows=10_000 if quick else 100_000, domains=16)
    rows = 20_000 if quick else 200_000
    repeat = repeat or (2 if quick else 4)
    root, model, data = publish_fixture(work, ref, rows)
    table = pq.read_table(data)
    with tempfile.TemporaryDirectory(prefix="mdlora-score-cache-") as cache:
        scorers = {
            "adapters": Scorer(root, model, cache_dir=Path(cache) / "a"),
            "backbone": Scorer(root, model, bundles={}, cache_dir=Path(cache) / "b"),
        }
        probs = {k: s.score_table(table) for k, s in scorers.items()}  # warm-up, and a check
        secs, cpu = dict.fromkeys(scorers, 0.0), dict.fromkeys(scorers, 0.0)
        with profile_self(work / "scoring.raw") as prof:
            for i in range(repeat):
                for k in scorers if i % 2 == 0 else reversed(list(scorers)):
                    t0, c0 = time.perf_counter(), time.process_time()
                    scorers[k].score_table(table)
                    secs[k] += time.perf_counter() - t0
                    cpu[k] += time.process_time() - c0
    rate = {k: table.num_rows * repeat / s for k, s in secs.items()}
    per_cpu = {k: table.num_rows * repeat / s for k, s in cpu.items()}
    ratio = per_cpu["adapters"] / per_cpu["backbone"]
    return {
        "rows": table.num_rows,
        "domains": ref.domains,
        "repeat": repeat,
        "threads": 1,
        "rows_per_s": rate,
        "rows_per_cpu_s": per_cpu,
        "seconds": secs,
        "ratio_adapters_vs_backbone": ratio,
        "target": f">= {GOAL}",
        "met": ratio >= GOAL,
        "adapters_loaded": len(scorers["adapters"].versions),
        "adapters_change_scores": bool((probs["adapters"] != probs["backbone"]).any()),
        "profile": prof["summary"],
        "bottleneck": bottleneck(prof["summary"]),
    }


def _copies(data: Path, out: Path, m: int) -> Path:
    """``out`` holding ``m`` hard-linked copies of ``data``'s Parquet files (``copy-KK/``)."""
    if not out.exists():
        for k in range(m):
            (out / f"copy-{k:02d}").mkdir(parents=True)
            for f in sorted(data.glob("*.parquet")):
                os.link(f, out / f"copy-{k:02d}" / f.name)
    return out


def run_scale(work: Path, rows: list[int], workers: list[int], timeout: float = 3000) -> dict:
    """``mdlora score`` on each row count (multiples of the smallest) with each worker count."""
    ref = Reference(domains=16)
    if not (work / "registry").exists():
        publish_fixture(work, ref, min(rows))
    base = sum(pq.ParquetFile(f).metadata.num_rows for f in (work / "data" / "train").glob("*.parquet"))
    config = work / "score.yaml"
    config.write_text(f"output: {{root: {work / 'registry'}, model: score}}\n")
    runs = []
    for n in rows:
        if n % base:
            raise ValueError(f"--rows: {n} is not a multiple of the fixture's {base} rows")
        data = _copies(work / "data" / "train", work / f"data-{n}", n // base)
        for w in workers:
            out = work / f"preds-{n}-{w}"
            run = launch([sys.executable, "-m", "mdlora.jobs.cli", "score", "--config", str(config), "--json",
                          "--set", f"score.workers={w}", "--data", str(data), "--out", str(out)], ROOT, timeout,
                         watch="ray::")
            if run["rc"]:
                runs.append({"rows": n, "workers": w} | failure(run, f"score {n} rows, {w} workers"))
                continue
            text = "".join(t for _, t in run["lines"])
            summary = json.loads(text[text.index("{\n"):text.rindex("}") + 1])
            runs.append({"rows": n, "workers": w, "wall_s": round(run["wall"], 1),
                         "rows_per_s": round(n / run["wall"]), "us_per_row": round(run["wall"] / n * 1e6, 2),
                         "driver_peak_mb": round(run["rss_root"]),
                         "worker_peak_mb": round(max(run["rss"].values(), default=0)),
                         "all_processes_peak_mb": round(run["rss_tree_peak"]),
                         "parts": summary["workers"], "auc": summary["auc"], "logloss": summary["logloss"]})
            print(json.dumps(runs[-1]), flush=True)
    return {"machine": machine(), "reference": ref.to_dict(), "runs": runs} | cost_ratios(runs)


def cost_ratios(runs: list[dict]) -> dict:
    """Cost per row (wall) of the largest input over the smallest, per worker count."""
    ok = {(r["rows"], r["workers"]): r for r in runs if "error" not in r}
    ratio = {}
    for w in sorted({w for _, w in ok}):
        sizes = sorted(n for n, v in ok if v == w)
        if len(sizes) > 1:
            ratio[w] = ok[sizes[-1], w]["us_per_row"] / ok[sizes[0], w]["us_per_row"]
    return {"cost_ratio_largest_vs_smallest": ratio, "target": f"<= {SCALE_GOAL}",
            "met": bool(ratio) and all(v <= SCALE_GOAL for v in ratio.values())}


def scale_markdown(r: dict) -> str:
    """A table of the scale runs: one row per (rows, workers)."""
    m = r["machine"]
    lines = [f"# Scoring at scale ({m['time_utc']}, {m['cores']} cores, load {m['loadavg'][0]:.1f})", "",
             "`mdlora score --set score.workers=W`, reference schema (10 features, 16 domains, one random "
             "MLoRA bundle each); wall time includes Ray start, loading and the exact metrics.", "",
             "| rows | workers | wall s | rows/s | µs/row | slowest part s | scoring rows/s | driver peak MB | "
             "largest worker MB | all processes MB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["runs"]:
        if "error" in x:
            lines.append(f"| {x['rows']:,} | {x['workers']} | {x['error']} | | | | | | | |")
            continue
        part = max(p["seconds"] for p in x["parts"])  # a part: load + read + score + write, no process start
        lines.append(f"| {x['rows']:,} | {x['workers']} | {x['wall_s']} | {x['rows_per_s']:,} | {x['us_per_row']} | "
                     f"{part:.1f} | {x['rows'] / part:,.0f} | {x['driver_peak_mb']:,} | {x['worker_peak_mb'] or '–'} | "
                     f"{x['all_processes_peak_mb']:,} |")
    ratios = ", ".join(f"{w} worker(s) {v:.2f}" for w, v in r["cost_ratio_largest_vs_smallest"].items())
    lines += ["", f"Cost per row (wall), largest vs smallest input: {ratios} (target {r['target']}, met: {r['met']}).",
              "Scoring rows/s = rows / the slowest part's seconds (its Scorer load, reads, scoring and "
              "writes; not the process and Ray start-up).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.scoring --scale ...``: the scale mode (the throughput mode runs in the suite)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", action="store_true", help="mdlora score on growing inputs, 1 and 2 workers")
    p.add_argument("--rows", default="1000000,10000000", help="comma-separated row counts (multiples of the first)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--work", default="/tmp/mdlora-score-scale", help="data and registry (reused)")
    p.add_argument("--out", default="", help="JSON result path (+ .md beside it)")
    a = p.parse_args(argv)
    if not a.scale:
        p.error("only --scale runs from here; the throughput figures come from benchmarks.suite")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    results = run_scale(work, [int(x) for x in a.rows.split(",")], [int(x) for x in a.workers.split(",")])
    text = scale_markdown(results)
    print(text)
    if a.out:
        write_results(Path(a.out), results, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
