"""Pretrain throughput of mdlora beside its peers and the dense compute bound, in ONE run.

Per workload (:mod:`benchmarks.workloads`), every system in its own subprocess (group), torch
threads = cores / processes, all at the niceness of mdlora's Ray workers (``RAY_WORKER_NICE``):

1. ``plain``: plain PyTorch, one process, pre-converted batches (:mod:`benchmarks.peers`);
   the fastest table-update variant is the "plain" figure.
2. ``torchrec``: raw TorchRec DMP under torchrun (1 and 2 gloo processes), pre-converted KJTs.
3. ``ab``: raw TorchRec and mdlora's own step in one torchrun group, alternating blocks (their
   ratio is immune to the machine's load: both see the same minutes).
4. ``mdlora``: ``mdlora.infra.pretrain.pretrain(cfg)`` through Ray Train, streaming Parquet (1 and 2
   workers). ONE child process starts Ray once and runs every (workload, world size) one after
   the other. Steady samples/s comes from rank 0's progress lines (``step N/M ... R samples/s``,
   each the rate of its own ``log_every`` steps on the worker's clock), intervals after the
   warm-up: samples / sum of durations. Time to first batch = Ray start (once per child, added
   to every run as a cold start pays it) + from ``pretrain()`` being called to the first
   progress line, minus the ``log_every - 1`` later steps at the steady rate. Peak RSS: VmHWM of
   the run's Ray Train workers, polled every 0.2 s. In full mode rank 0 of every run is sampled
   by py-spy (:mod:`benchmarks.profiling`) for a few seconds mid-run.
5. ``bound``: GEMM FLOP/s of the tower's training GEMMs at batch B on 1 thread, x cores, /
   FLOPs per sample (:func:`benchmarks.common.compute_bound`), measured before and after.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from benchmarks.common import compute_bound, failure, launch
from benchmarks.profiling import bottleneck, summarise
from mdlora.infra.ray_backend import WORKER_NICENESS

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "benchmarks" / "peers.py"
PROGRESS = re.compile(r"step (\d+)/(\d+) epoch \d+ loss \S+ (\d+) samples/s")
CORES = os.cpu_count() or 1
WORLDS = (1, 2)
RAY_WORKER_NICE = WORKER_NICENESS
"""mdlora's embedded Ray runs its workers at this niceness (``mdlora.infra.ray_backend``); peers run at the
same niceness so that other load on a shared machine slows every trainer alike."""


def run_peer(
    system: str,
    nproc: int,
    workload: dict,
    out: Path,
    *,
    steps: int,
    warmup: int,
    max_seconds: float,
    variant: str = "sparse_adagrad",
    timeout: float = 300,
    retries: int = 1,
) -> dict:
    """One peer run (``plain`` alone; ``torchrec`` / ``ab`` under torchrun with ``nproc``).

    Args:
        workload: ``{"schema", "data", "batch", "hidden"}`` (paths as strings).

    A failed run is retried ``retries`` times; the failure stays in the result as
    ``failed_attempts``. (The SIGABRT at exit that 2-process runs used to hit, in 3 of 20 here and
    twice in a row in one CI run, is gone: ``peers.py`` now leaves with ``os._exit``.)
    """
    launcher = [sys.executable]
    if system != "plain":
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    args = [
        system,
        "--schema",
        workload["schema"],
        "--data",
        workload["data"],
        "--batch",
        str(workload["batch"]),
        "--hidden",
        ",".join(map(str, workload["hidden"])),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--max-seconds",
        str(max_seconds),
        "--variant",
        variant,
    ]
    failed = []
    for _ in range(retries + 1):
        out.unlink(missing_ok=True)
        run = launch(
            [*launcher, str(PEERS), *args, "--out", str(out)], ROOT, timeout, nice=RAY_WORKER_NICE
        )
        if run["rc"] == 0 and out.exists():
            break
        failed.append(failure(run, f"{system} ({nproc} processes)"))
    else:
        return {**failed[-1], "failed_attempts": failed}
    r = json.loads(out.read_text())
    r["time_to_first_batch_s"] = r.pop("first_step_unix") - run["t_launch"]
    r["wall_s"], r["nice"], r["load"] = run["wall"], RAY_WORKER_NICE, run["load"]
    return {**r, "failed_attempts": failed} if failed else r


def mdlora_child() -> None:
    """Subprocess entry: start Ray, then ``pretrain`` every run of the JSON list in argv[1]."""
    from mdlora.config import from_dict
    from mdlora.infra import ray_backend
    from mdlora.infra.pretrain import pretrain
    from mdlora.trainer.config import RunConfig

    t0 = time.time()
    ray_backend.init_ray("", num_cpus=CORES)
    print(f"MDLORA_RAY_INIT {time.time() - t0:.3f}", flush=True)
    for run in json.loads(sys.argv[1]):
        print(f"MDLORA_START {run['key']} {time.time():.3f}", flush=True)
        summary = pretrain(from_dict(RunConfig, run["cfg"]), run_name=run["key"])
        plan = Path(summary["path"]) / "plan.json"
        summary["plan"] = json.loads(plan.read_text()) if plan.exists() else None
        print(
            f"MDLORA_RESULT {run['key']} {time.time():.3f} " + json.dumps(summary, default=str),
            flush=True,
        )


def _config(wl: dict, world: int, steps: int, log_every: int, root: Path) -> dict:
    return {
        "data": {"schema": wl["schema"], "train": wl["data"], "batch_size": wl["batch"]},
        "model": {"tower": "mlp", "hidden": wl["hidden"]},
        "optim": {"sparse_optimizer": "rowwise_adagrad"},
        "loop": {"epochs": 1, "max_steps": steps, "log_every": log_every},
        "dist": {"world_size": world, "cpus_per_worker": max(1, CORES // world), "max_failures": 0},
        "output": {"root": str(root), "model": wl["name"]},
    }


def steady(
    progress: list[tuple[float, int, int]], after: int, log_every: int, batch: int
) -> float | None:
    """samples/s over the progress intervals ``(time, step, rate)`` starting at/after ``after``."""
    rates = [rate for _, step, rate in progress if step - log_every >= after and rate > 0]
    secs = sum(log_every * batch / r for r in rates)
    return len(rates) * log_every * batch / secs if secs else None


def measure_mdlora(
    workloads: list[dict],
    steps: int,
    warmup: int,
    work: Path,
    *,
    log_every: int,
    profile_s: float = 0.0,
    timeout: float = 1200,
) -> dict:
    """mdlora pretrain through Ray for every workload x world size -> ``{name: {world: result}}``.

    Each run gets ``max_steps = steps + warmup + i`` (``i`` its index) so that its progress
    lines are unique (the py-spy trigger looks for one of them).
    """
    runs, profiles = [], []
    for wl in workloads:
        for w in wl.get("worlds", WORLDS):
            total = steps + warmup + len(runs)
            key = f"{wl['name']}-w{w}"
            runs.append(
                {
                    "key": key,
                    "wl": wl,
                    "world": w,
                    "total": total,
                    "cfg": _config(wl, w, total, log_every, work / "registry"),
                }
            )
            if profile_s:
                at = warmup + (steps // 3) // log_every * log_every
                profiles.append((rf"step {at}/{total} ", profile_s, work / f"{key}.raw"))
    code = "from benchmarks.pretrain import mdlora_child; mdlora_child()"
    arg = json.dumps([{"key": r["key"], "cfg": r["cfg"]} for r in runs])
    res = launch(
        [sys.executable, "-c", code, arg], ROOT, timeout, watch="RayTrainWorker", profiles=profiles
    )
    ray_init = next(
        (float(t.split()[1]) for _, t in res["lines"] if t.startswith("MDLORA_RAY_INIT ")), 0.0
    )
    starts = {
        t.split()[1]: float(t.split()[2]) for _, t in res["lines"] if t.startswith("MDLORA_START ")
    }
    ends = {
        t.split()[1]: (float(t.split()[2]), json.loads(t.split(maxsplit=3)[3]))
        for _, t in res["lines"]
        if t.startswith("MDLORA_RESULT ")
    }
    out: dict = {wl["name"]: {} for wl in workloads}
    for r in runs:
        key, wl = r["key"], r["wl"]
        if key not in ends:
            out[wl["name"]][str(r["world"])] = failure(res, f"mdlora pretrain {key}")
            continue
        t0, (t1, summary) = starts[key], ends[key]
        progress = sorted(
            {
                int(m[1]): (ts, int(m[1]), int(m[3]))
                for ts, t in res["lines"]
                if (m := PROGRESS.search(t)) and int(m[2]) == r["total"]
            }.values(),
            key=lambda x: x[1],
        )
        rate = steady(progress, warmup, log_every, wl["batch"])
        pids = [p for p, (a, _) in res["seen"].items() if t0 <= a <= t1]
        cpu = [c for c in res["cpu"] if t0 <= c[0] <= t1]
        plan = summary.get("plan") or {}
        first = progress[0] if progress else None
        prof = summarise(work / f"{key}.raw") if profile_s else None
        out[wl["name"]][str(r["world"])] = {
            "world_size": r["world"],
            "threads": r["cfg"]["dist"]["cpus_per_worker"],
            "samples_per_s": rate,
            "steps": summary.get("step"),
            "log_every": log_every,
            "method": f"rank 0's progress lines, steps {warmup}..{r['total']}",
            "time_to_first_batch_s": ray_init + first[0] - t0 - (log_every - 1) * wl["batch"] / rate
            if first and rate
            else None,
            "ray_init_s": ray_init,
            "load": res["load"],  # at the start and end of the child running every mdlora run
            "pretrain_call_s": t1 - t0,
            "peak_rss_mb": sorted(res["rss"][p] for p in pids),
            "nice": sorted({res["nice"][p] for p in pids} - {None}),
            "cpu_s": {
                "ray_train_workers": cpu[-1][1] - cpu[0][1],
                "ray_and_driver": cpu[-1][2] - cpu[0][2],
            }
            if len(cpu) > 1
            else None,
            "embedding_bytes_per_rank": plan.get("rank_bytes"),
            "sharding_types": sorted({t["sharding_type"] for t in plan.get("tables", {}).values()}),
            "profile": prof,
            "bottleneck": bottleneck(prof) if profile_s else None,
        }
    return out


def measure_workload(
    wl: dict,
    work: Path,
    *,
    steps: int,
    warmup: int,
    variants: list[str],
    ab_worlds: tuple[int, ...],
    max_seconds: float,
) -> dict:
    """Plain PyTorch (each variant), raw TorchRec (1, 2 procs) and the A/B runs of one workload."""
    kw = {"steps": steps, "warmup": warmup, "max_seconds": max_seconds}
    name = wl["name"]
    out: dict = {"workload": wl, "plain": {}, "torchrec": {}, "ab": {}}
    for v in variants:
        out["plain"][v] = run_peer("plain", 1, wl, work / f"{name}_plain_{v}.json", variant=v, **kw)
    for w in wl.get("worlds", WORLDS):
        out["torchrec"][str(w)] = run_peer("torchrec", w, wl, work / f"{name}_tr{w}.json", **kw)
    for w in ab_worlds:
        out["ab"][str(w)] = run_peer("ab", w, wl, work / f"{name}_ab{w}.json", **kw)
    return out


def bound_for(wl: dict, seconds: float) -> dict:
    """The dense compute bound of a workload's tower (E from its schema)."""
    from mdlora.embeddings.schema import Schema

    schema = Schema.load(wl["schema"])
    return compute_bound(
        schema.pooled_dim() + len(schema.dense), wl["hidden"], wl["batch"], seconds
    )


def rate(r: dict | None) -> float | None:
    """samples/s of a result, None when it failed."""
    return r.get("samples_per_s") if r and "error" not in r else None


def summarise_workload(peers: dict, mdlora: dict, bound: dict) -> dict:
    """Ratios to targets: mdlora / raw TorchRec (same world), / best plain, share of the bound."""
    plain = {v: rate(r) for v, r in peers["plain"].items() if rate(r)}
    best = max(plain, key=plain.get) if plain else None
    s: dict = {
        "plain_best_variant": best,
        "plain_samples_per_s": plain.get(best),
        "bound_samples_per_s": bound["samples_per_s"],
    }
    for w in mdlora:  # the world sizes run ("1", "2")
        m, t = rate(mdlora.get(w)), rate(peers["torchrec"].get(w))
        s[f"mdlora_vs_torchrec_w{w}"] = m / t if m and t else None
        s[f"mdlora_w{w}_vs_plain"] = m / plain[best] if m and best else None
        s[f"mdlora_w{w}_share_of_bound"] = m / bound["samples_per_s"] if m else None
        s[f"torchrec_w{w}_share_of_bound"] = t / bound["samples_per_s"] if t else None
        ab = peers["ab"].get(w)
        s[f"step_ab_mdlora_vs_torchrec_w{w}"] = (
            ab.get("ratio") if ab and "error" not in ab else None
        )
    s["plain_share_of_bound"] = plain[best] / bound["samples_per_s"] if best else None
    return s
