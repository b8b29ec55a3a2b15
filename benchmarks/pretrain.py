"""Pretrain throughput of mdlora against its peers, measured in ONE run (ratios within a run).

Systems (reference workload of :mod:`benchmarks.common`; every process its own subprocess so
peak RSS and start-up are its own; torch threads = cores / processes):

1. ``plain``: plain PyTorch, one process, pre-materialised tensors (:mod:`benchmarks.peers`);
   every table-update variant in full mode, the fastest is the "plain" figure.
2. ``torchrec``: raw TorchRec DMP under torchrun (1 and 2 gloo processes), pre-materialised KJTs.
3. ``mdlora``: ``infra.pretrain.pretrain(cfg)`` through Ray Train from Parquet (1 and 2 workers).
   Steady-state samples/s comes from the run's own progress lines (``step N/M ... R samples/s``,
   rank 0, every ``log_every`` steps, R measured on the worker's clock over its interval),
   which Ray forwards to the driver's output: the intervals after the warm-up give samples /
   sum of their durations. Cross-check (full mode): a short run of ``warmup`` steps beside the
   long one; ``(steps - warmup) x B / (wall_long - wall_short)`` cancels Ray start-up,
   planning, checkpointing and publishing.
4. ``bound``: GEMM FLOP/s of one training step's MLP GEMMs at batch B measured on 1 thread (and
   on all threads), / dense FLOPs per sample (3 x forward MACs x 2) -> a samples/s ceiling of
   ``cores x`` the 1-thread rate; measured before and after the systems, the higher is kept.

Time to first batch: from launching the process(es) until the first training step finished
(peers: the step's own clock; mdlora: arrival of the ``step 1`` line of a ``log_every=1`` run
at the driver, so it includes Ray's log forwarding delay, well under a second). Peak RSS: each peer process's own VmHWM; mdlora: the Ray Train worker processes' VmHWM,
polled every 0.2 s by this process.

Usage::

    python -m benchmarks.pretrain [--quick] [--steps N] [--out benchmarks/results/<date>/pretrain.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    Reference,
    compute_bound,
    failure,
    launch,
    machine,
    write_reference_parquet,
    write_results,
)
from benchmarks.peers import VARIANTS, measure_peers

ROOT = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"step (\d+)/\d+ epoch \d+ loss \S+ (\d+) samples/s")
CORES = os.cpu_count() or 1

# ---- mdlora through Ray Train ---------------------------------------------------------------


def mdlora_child() -> None:
    """Subprocess entry: ``pretrain(RunConfig from argv[1], run_name=argv[2])``; prints the
    summary (with the plan JSON of the published backbone) as one ``MDLORA_RESULT`` line."""
    from infra.pretrain import pretrain
    from mdlora.config import from_dict
    from trainer.config import RunConfig

    cfg = from_dict(RunConfig, json.loads(sys.argv[1]))
    summary = pretrain(cfg, run_name=sys.argv[2])
    plan = Path(summary["path"]) / "plan.json"
    summary["plan"] = json.loads(plan.read_text()) if plan.exists() else None
    print("MDLORA_RESULT " + json.dumps(summary, default=str), flush=True)


def _mdlora_run(
    ref: Reference,
    data: tuple[Path, Path],
    world: int,
    steps: int,
    log_every: int,
    work: Path,
    timeout: float,
) -> dict:
    train, schema = data
    name = f"bench-w{world}-s{steps}"
    cfg = {
        "data": {"schema": str(schema), "train": str(train), "batch_size": ref.batch},
        "model": {"tower": "mlp", "hidden": ref.hidden},
        "optim": {
            "dense_lr": ref.dense_lr,
            "sparse_lr": ref.sparse_lr,
            "sparse_optimizer": "rowwise_adagrad",
        },
        "loop": {"epochs": 1, "max_steps": steps, "log_every": log_every},
        "dist": {"world_size": world, "cpus_per_worker": max(1, CORES // world), "max_failures": 0},
        "output": {"root": str(work / name), "model": "bench"},
    }
    code = "from benchmarks.pretrain import mdlora_child; mdlora_child()"
    run = launch(
        [sys.executable, "-c", code, json.dumps(cfg), name], ROOT, timeout, watch="RayTrainWorker"
    )
    result = next(
        (json.loads(t.split(" ", 1)[1]) for _, t in run["lines"] if t.startswith("MDLORA_RESULT ")),
        None,
    )
    if run["rc"] != 0 or result is None:
        return failure(run, f"mdlora pretrain (world {world}, {steps} steps)")
    progress = sorted(
        {
            int(m[1]): (ts, int(m[1]), int(m[2]))
            for ts, t in run["lines"]
            if (m := PROGRESS.search(t))
        }.values(),
        key=lambda x: x[1],
    )
    return {
        "wall_s": run["wall"],
        "t_launch": run["t_launch"],
        "progress": progress,
        "peak_rss_mb": sorted(run["rss"].values()),
        "plan": result.get("plan"),
        "nice": sorted(set(run["nice"].values()) - {None}),
        "cpu_s": run["cpu_s"],
        "load": run["load"],
        "steps": result.get("step"),
        "threads": cfg["dist"]["cpus_per_worker"],
        "log_every": log_every,
    }


def _steady(
    progress: list[tuple[float, int, int]], after: int, log_every: int, batch: int
) -> float | None:
    """samples/s over the progress intervals that start at or after step ``after``.

    Each line reports the rate of its own interval (``log_every`` steps, the worker's clock), so
    the steady rate is their samples over the sum of their durations.
    """
    rates = [rate for _, step, rate in progress if step - log_every >= after and rate > 0]
    secs = sum(log_every * batch / r for r in rates)
    return len(rates) * log_every * batch / secs if secs else None


def measure_mdlora(
    ref: Reference,
    steps: int,
    warmup: int,
    work: Path,
    *,
    log_every: int = 10,
    world_sizes=(1, 2),
    cross_check: bool = True,
    timeout: float = 400,
) -> dict:
    """mdlora pretrain per world size: steady samples/s from the progress lines after
    ``warmup`` steps; with ``cross_check`` also a short run of ``warmup`` steps (``log_every=1``,
    giving the time to first batch) and the wall-time difference of the two runs."""
    data = write_reference_parquet(work / "data", ref, n=(steps + 2) * ref.batch)
    out = {}
    for w in world_sizes:
        long = _mdlora_run(ref, data, w, steps, log_every, work, timeout)
        if "error" in long:
            out[str(w)] = long
            continue
        progress, t_launch = long.pop("progress"), long.pop("t_launch")
        plan = long.pop("plan") or {}
        r = {
            **long,
            "world_size": w,
            "samples_per_s": _steady(progress, warmup, log_every, ref.batch),
            "method": f"rank 0's progress lines (rate of each {log_every}-step interval), steps {warmup}..{steps}",
            "embedding_bytes_per_rank": plan.get("rank_bytes"),
            "sharding_types": sorted({t["sharding_type"] for t in plan.get("tables", {}).values()}),
        }
        if log_every == 1 and progress:
            r["time_to_first_batch_s"] = progress[0][0] - t_launch
        if cross_check:
            s = _mdlora_run(ref, data, w, warmup, 1, work, timeout)
            if "error" in s:
                r["cross_check"] = s
                out[str(w)] = r
                continue
            r["time_to_first_batch_s"] = (
                s["progress"][0][0] - s["t_launch"] if s["progress"] else None
            )
            dt = long["wall_s"] - s["wall_s"]
            r["cross_check"] = {
                "method": f"(steps {steps} - {warmup}) x B / (wall({steps} steps) - wall({warmup} steps))",
                "short_wall_s": s["wall_s"],
                "samples_per_s": (steps - warmup) * ref.batch / dt if dt > 0 else None,
            }
        out[str(w)] = r
    return out


# ---- report ---------------------------------------------------------------------------------


def _rate(r: dict | None) -> float | None:
    return r.get("samples_per_s") if r and "error" not in r else None


def summarise(res: dict) -> dict:
    """Ratios against the targets and shares of the compute bound."""
    plain = {v: _rate(r) for v, r in res["peers"]["plain"].items() if _rate(r)}
    best = max(plain, key=plain.get) if plain else None
    s = {"plain_best_variant": best, "plain_samples_per_s": plain.get(best)}
    for w, r in res["mdlora"].items():
        m, t = _rate(r), _rate(res["peers"]["torchrec"].get(w))
        s[f"mdlora_vs_torchrec_w{w}"] = m / t if m and t else None
        s[f"mdlora_w{w}_vs_plain"] = (
            m / s["plain_samples_per_s"] if m and s["plain_samples_per_s"] else None
        )
        s[f"target_met_w{w}"] = bool(
            m
            and t
            and s["plain_samples_per_s"]
            and m >= 0.95 * t
            and m >= 2 * s["plain_samples_per_s"]
        )
    return s


def _rows(res: dict) -> list[tuple]:
    rows = [(f"plain PyTorch ({v})", 1, r) for v, r in res["peers"]["plain"].items()]
    rows += [("raw TorchRec (torchrun)", int(w), r) for w, r in res["peers"]["torchrec"].items()]
    rows += [("mdlora pretrain (Ray, Parquet)", int(w), r) for w, r in res["mdlora"].items()]
    return rows


def markdown(res: dict) -> str:
    """The results as a Markdown table plus the targets."""
    bound = res["bound"]["samples_per_s"]
    out = [
        f"# Pretrain throughput ({res['machine']['time_utc']}, {res['machine']['cores']} cores, "
        f"load {res['machine']['loadavg'][0]:.1f} at start, {'quick' if res['quick'] else 'full'})",
        "",
        "| system | procs | threads/proc | samples/s | share of bound | peak RSS/proc MiB | first batch s | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, w, r in _rows(res):
        if "error" in r:
            out.append(f"| {name} | {w} | | FAILED: {r['error']} | | | | |")
            continue
        rate = r.get("samples_per_s") or 0
        rss = "/".join(f"{x:.0f}" for x in r.get("peak_rss_mb") or [])
        ttfb = r.get("time_to_first_batch_s")
        load = "-".join(f"{x:.1f}" for x in r.get("load") or [])
        out.append(
            f"| {name} | {w} | {r.get('threads')} | {rate:,.0f} | {rate / bound:.1%} | {rss} | "
            f"{'' if ttfb is None else f'{ttfb:.1f}'} | {load} |"
        )
    b = res["bound"]
    out += [
        "",
        f"Dense bound: {b['flops_per_sample']:,.0f} FLOP/sample (3 x forward MACs x 2); GEMM "
        f"{b['gemm_flops_1_thread'] / 1e9:.1f} GFLOP/s on 1 thread -> {b['samples_per_s_1_thread']:,.0f} "
        f"samples/s; bound = {CORES} cores x that = {bound:,.0f} samples/s (measured on {CORES} threads: "
        f"{b['gemm_flops_all_threads'] / 1e9:.1f} GFLOP/s -> {b['samples_per_s_all_threads']:,.0f}).",
        "",
    ]
    for w, r in res["mdlora"].items():
        if "error" not in r:
            cc = r.get("cross_check") or {}
            check = (
                f"; cross-check {cc['method']}: {cc['samples_per_s'] or 0:,.0f} samples/s"
                if "method" in cc
                else ""
            )
            out.append(
                f"mdlora w{w}: embedding bytes/rank {r.get('embedding_bytes_per_rank')}, "
                f"sharding {r.get('sharding_types')}{check}"
            )
    out += [
        "",
        "Targets: mdlora >= 0.95x raw TorchRec (same procs), >= 2x plain PyTorch (best variant).",
        "",
    ]
    out += [
        f"- {k}: {v:.2f}" if isinstance(v, float) else f"- {k}: {v}"
        for k, v in res["summary"].items()
    ]
    out += [f"- note: {n}" for n in res.get("notes", [])]
    return "\n".join(out) + "\n"


FINDINGS = [
    # py-spy --idle, 10 s at 100 Hz on rank 0, world 2, 100k-row tables, 2026-11-23 ~05:08 UTC,
    # shared 2-core machine (1-min load 2-5), next to the raw TorchRec peer profiled the same way.
    "profile (py-spy, rank 0, world 2): mdlora's training thread is in the loop ~100% of the time "
    "with the same split as raw TorchRec (forward 48% / backward 44% / Adam 2% vs 48% / 47% / 3%); "
    "next-batch wait 3%; the Parquet->KJT prefetch thread spends 98% blocked on a full queue, so "
    "data loading is not the bottleneck; Ray's own processes (driver, controller, raylet, GCS, "
    "agents) use ~8% of one core in steady state",
    "measured back to back at load 2-5: raw TorchRec world 2 115k samples/s, mdlora world 2 "
    "100-140k (progress lines): parity within noise; gaps in a single run track the machine load "
    "column (other users' nice-0 processes starve the nice-15 trainers), not mdlora's step",
    "world size 1 runs 2 OpenMP threads per process and collapses under load (GEMM on 2 threads "
    "fell to 5 GFLOP/s vs 60-80 on 1 thread); the >= 2x plain PyTorch target needs an idle machine",
]
"""Profiling findings about the gap to raw TorchRec, copied into every result's notes."""


def notes(res: dict) -> list[str]:
    """Load warnings, targets missed and where the time goes (``FINDINGS``)."""
    out = []
    runs = [r for _, _, r in _rows(res)]
    load = max(
        [res["machine"]["loadavg"][0], res["machine"]["loadavg_end"][0]]
        + [x for r in runs for x in r.get("load") or []]
    )
    if load > 0.5 * CORES:
        out.append(
            f"machine loaded (1-min load up to {load:.1f} on {CORES} cores; per-system load in the "
            "table): multi-threaded processes suffer most (OpenMP threads wait on descheduled "
            "peers), so the systems, measured one after the other, saw different machines"
        )
    for w, r in res["mdlora"].items():
        if "error" in r:
            continue
        cpu = r.get("cpu_s") or {}
        if cpu.get("watched"):
            out.append(
                f"mdlora w{w}: Ray Train workers used {cpu['watched']:.0f} CPU-s, the driver and Ray's "
                f"other processes {cpu['other']:.0f} CPU-s over the {r['wall_s']:.0f} s run"
            )
        cc, rate = (r.get("cross_check") or {}).get("samples_per_s"), r.get("samples_per_s")
        if cc and rate and abs(cc / rate - 1) > 0.3:
            out.append(
                f"mdlora w{w}: the wall-time cross-check ({cc:,.0f}/s) is off the progress-line "
                f"figure by {cc / rate - 1:+.0%}: Ray start-up varied by more than the steps took"
            )
        if not res["summary"].get(f"target_met_w{w}"):
            sm = res["summary"]
            out.append(
                f"target missed at world size {w}: mdlora/torchrec {sm[f'mdlora_vs_torchrec_w{w}']}"
                f" (>= 0.95), mdlora/plain {sm[f'mdlora_w{w}_vs_plain']} (>= 2); see the profile notes"
            )
    return out + (FINDINGS if any("target missed" in n for n in out) else [])


def run(*, quick: bool, steps: int | None, out: Path, work: Path | None = None) -> dict:
    """Measure every system and the bound; write JSON + Markdown to ``out``; return the results."""
    ref = Reference(rows=10_000) if quick else Reference()
    steps = steps or (20 if quick else 500)
    warmup = 3 if quick else 20
    with tempfile.TemporaryDirectory(prefix="mdlora-bench-") as tmp:
        work = work or Path(tmp)
        res = {
            "quick": quick,
            "reference": ref.to_dict(),
            "machine": machine(),
            "threads": {
                "plain": CORES,
                "torchrec_or_mdlora_per_proc": {w: CORES // w for w in (1, 2)},
            },
            "steps": steps,
            "warmup": warmup,
        }
        first = compute_bound(ref, 0.3 if quick else 1.0)
        res["peers"] = measure_peers(
            ref,
            steps,
            warmup,
            work,
            variants=VARIANTS[:1] if quick else VARIANTS,
            max_seconds=10 if quick else 30,
        )
        res["mdlora"] = measure_mdlora(
            ref, steps + warmup, warmup, work, log_every=1 if quick else 10, cross_check=not quick
        )
        # the bound is measured before and after the systems; the faster one is the less disturbed
        res["bound_measurements"] = [first, compute_bound(ref, 0.3 if quick else 1.0)]
        res["bound"] = max(res["bound_measurements"], key=lambda b: b["samples_per_s"])
    res["summary"] = summarise(res)
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    res["notes"] = notes(res)
    write_results(out, res, markdown(res))
    return res


def main(argv: list[str] | None = None) -> int:
    """CLI entry: print the Markdown table, write JSON + .md."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny tables and few steps (< 2 min)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per system")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results") / time.strftime("%Y-%m-%d") / "pretrain.json",
    )
    a = p.parse_args(argv)
    res = run(quick=a.quick, steps=a.steps, out=a.out)
    print(markdown(res), end="")
    print(f"wrote {a.out} and {a.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
