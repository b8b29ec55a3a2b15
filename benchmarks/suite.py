"""``make bench``: mdlora beside its peers and the hardware limit, every figure from ONE run.

Sections (each reports its targets, the measured ratio, met or not, and where missed the
bottleneck named from a py-spy profile, :mod:`benchmarks.profiling`):

- ``peers``: per workload (reference; ML-1M-shaped), plain PyTorch (1 proc), raw TorchRec under
  torchrun (1, 2 procs), mdlora pretrain through Ray Train from Parquet (1, 2 workers):
  samples/s, peak RSS, time to first batch; plus the in-process A/B of mdlora's step against raw
  TorchRec's (:mod:`benchmarks.pretrain`, :mod:`benchmarks.peers`).
- ``limit``: measured GEMM FLOP/s x FLOPs per sample -> dense compute bound; every system's share.
- ``scaling``: rows 1e5 -> 1e7, domains 10 -> 1000, table size 1e5 -> 1e7 (:mod:`benchmarks.scaling`).
- ``adaptation``: adaptation vs pretrain epoch, add-domain vs retrain, bundle vs backbone
  (:mod:`benchmarks.adapt`).
- ``reader``: Parquet -> KJT rows/s per core, local and through a moto S3 endpoint on 127.0.0.1
  (:mod:`benchmarks.reader`).
- ``scoring``: mixed-domain rows/s with per-row adapters vs the backbone alone
  (:mod:`benchmarks.scoring`).

The machine may be shared: every target is a ratio of figures taken in the same run, and the
load average is recorded per system. ``--quick`` shrinks every size (< 3 min, CI).

Usage::

    python -m benchmarks.suite [--quick] [--out benchmarks/results/<date>]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import adapt, reader, scaling, scoring
from benchmarks.common import Reference, machine, write_results
from benchmarks.pretrain import (
    WORLDS,
    bound_for,
    measure_mdlora,
    measure_workload,
    rate,
    summarise_workload,
)
from benchmarks.profiling import bottleneck, profile_self
from benchmarks.report import markdown, plot, targets
from benchmarks.workloads import movielens, reference
from mdlora.atomic import write_json

QUICK = {
    "steps": 12,
    "warmup": 3,
    "table_rows": 10_000,
    "variants": ["sparse_adagrad"],
    "worlds": {"reference": (1, 2)},  # no ML-1M: its import and runs were a third of the CI suite's time
    "ab_worlds": {"reference": (1,)},
    "max_seconds": 5.0,
    "log_every": 1,
    "profile_s": 0.0,
    "bound_s": 0.3,
    "reader_rows": 100_000,
    "adapt_rows": 20_000,
}
FULL = {
    "steps": 300,
    "warmup": 20,
    "table_rows": 100_000,
    "variants": ["sparse_adagrad", "sparse_adam"],
    "worlds": {"reference": (1, 2), "ml1m": (1, 2)},
    "ab_worlds": {"reference": (1, 2), "ml1m": (1, 2)},
    "max_seconds": 20.0,
    "log_every": 10,
    "profile_s": 6.0,
    "bound_s": 1.0,
    "reader_rows": 1_000_000,
    "adapt_rows": 300_000,
}


def peers_section(work: Path, p: dict) -> tuple[dict, dict]:
    """The peers of both workloads and the bound of each -> (peers, limit)."""
    ref = Reference(rows=p["table_rows"])
    n = (p["steps"] + p["warmup"] + 2 * len(WORLDS) + 2) * ref.batch  # max_steps + run index
    wls = [reference(work, ref, n)] + ([movielens(work)] if "ml1m" in p["worlds"] else [])
    for wl in wls:
        wl["worlds"] = list(p["worlds"][wl["name"]])
    before = {wl["name"]: bound_for(wl, p["bound_s"]) for wl in wls}
    peers = {
        wl["name"]: measure_workload(
            wl,
            work,
            steps=p["steps"],
            warmup=p["warmup"],
            variants=p["variants"],
            ab_worlds=p["ab_worlds"][wl["name"]],
            max_seconds=p["max_seconds"],
        )
        for wl in wls
    }
    mdlora = measure_mdlora(
        wls, p["steps"], p["warmup"], work, log_every=p["log_every"], profile_s=p["profile_s"]
    )
    limit = {}
    for wl in wls:
        name = wl["name"]
        both = [before[name], bound_for(wl, p["bound_s"])]
        bound = max(both, key=lambda b: b["samples_per_s"])  # the less disturbed measurement
        peers[name]["mdlora"] = mdlora[name]
        peers[name]["summary"] = summarise_workload(peers[name], mdlora[name], bound)
        shares = {f"plain ({v})": rate(r) for v, r in peers[name]["plain"].items()}
        shares |= {f"torchrec w{w}": rate(r) for w, r in peers[name]["torchrec"].items()}
        shares |= {f"mdlora w{w}": rate(r) for w, r in mdlora[name].items()}
        limit[name] = {
            "bound": bound,
            "measurements": both,
            "share_of_bound": {k: v / bound["samples_per_s"] for k, v in shares.items() if v},
        }
    return peers, limit


def reader_section(work: Path, rows: int) -> dict:
    """Reader figures (one core), each end-to-end read profiled."""
    return reader.run(rows, 8192, s3=True, profile_dir=work)


def adaptation_section(work: Path, quick: bool, rows: int) -> dict:
    """The adapter benchmark (one thread) with a profile of the whole run."""
    with profile_self(work / "adapt.raw") as prof:
        r = adapt.run(quick, 128.0, rows=rows)
    r["profile"], r["bottleneck"] = prof["summary"], bottleneck(prof["summary"])
    return r


SECTIONS = ("peers", "scaling", "adaptation", "reader", "scoring")


def run(*, quick: bool, out: Path, work: Path | None = None, sections: list[str] | None = None) -> dict:
    """Every section (or only ``sections``, replacing those in an existing ``out/suite.json``);
    writes ``out/suite.json``, ``suite.md`` and ``suite.png``; returns results.

    After each section the results so far are in ``out/suite.partial.json`` (removed at the end).
    A section rerun on its own records when and at what load in ``res["reruns"]``.
    """
    import torch

    p = QUICK if quick else FULL
    res: dict = {
        "quick": quick,
        "machine": machine(),
        "params": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()},
        "seconds": {},
    }
    stamp = res["machine"]
    if sections and (out / "suite.json").exists():
        old, rerun = json.loads((out / "suite.json").read_text()), res["machine"]
        if old.get("quick") != quick:
            raise ValueError(f"{out / 'suite.json'}: quick={old.get('quick')}, cannot merge a quick={quick} rerun")
        res = {**old, "reruns": {**old.get("reruns", {}), **{s: rerun for s in sections}}}
        stamp = rerun
    threads = torch.get_num_threads()
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "suite.partial.json"
    with tempfile.TemporaryDirectory(prefix="mdlora-suite-") as tmp:
        work = work or Path(tmp)
        steps = [
            ("peers", lambda: peers_section(work, p)),
            ("scaling", lambda: scaling.run(work / "scaling", quick)),
            ("adaptation", lambda: adaptation_section(work, quick, p["adapt_rows"])),
            ("reader", lambda: reader_section(work, p["reader_rows"])),
            ("scoring", lambda: scoring.run(work / "scoring", quick)),
        ]
        for name, fn in steps:
            if sections and name not in sections:
                continue
            t0 = time.perf_counter()
            (work / name).mkdir(parents=True, exist_ok=True)
            got = fn()
            torch.set_num_threads(threads)  # sections pin 1 thread for per-core figures
            if name == "peers":
                res["peers"], res["limit"] = got
            else:
                res[name] = got
            res["seconds"][name] = time.perf_counter() - t0
            print(f"[suite] {name}: {res['seconds'][name]:.0f} s", file=sys.stderr, flush=True)
            write_json(partial, res)  # a long run that is stopped keeps its finished sections
    stamp["loadavg_end"] = list(os.getloadavg())
    res["targets"] = targets(res)
    res["plot"] = plot(res, out / "suite.png")
    write_results(out / "suite.json", res, markdown(res))
    partial.unlink()
    return res


def main(argv: list[str] | None = None) -> int:
    """CLI: run the suite, print the Markdown summary."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (< 3 min; the CI test)")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output dir (default benchmarks/results/<date>, quick: <date>/quick)",
    )
    ap.add_argument("--sections", type=lambda v: v.split(","), default=None,
                    help=f"only these sections ({','.join(SECTIONS)}), merged into an existing suite.json")
    a = ap.parse_args(argv)
    if a.sections and (bad := sorted(set(a.sections) - set(SECTIONS))):
        ap.error(f"--sections: unknown {bad} (known: {', '.join(SECTIONS)})")
    out = a.out or Path("benchmarks/results") / time.strftime("%Y-%m-%d") / (
        "quick" if a.quick else ""
    )
    res = run(quick=a.quick, out=out, sections=a.sections)
    print(markdown(res), end="")
    print(f"wrote {out / 'suite.json'}, suite.md, suite.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
