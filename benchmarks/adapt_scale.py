"""Adaptation at scale: memory and cost per row of ``mdlora adapt`` as rows grow (issue #15).

For each row count: gen-logs writes the logs (same users, items, domains: one schema), a small
backbone is pretrained once on the smallest set, and ``mdlora adapt`` (the CLI, one epoch)
runs in its own process with an embedded Ray. Polled every 0.2 s (/proc):

* driver peak RSS (the ``mdlora adapt`` process; it must not grow with rows),
* per-task peak RSS (the largest Ray worker: materialisation ranks and adapter tasks), and
  apart: the largest adapter task (a worker that ran ``_train_task``) and the largest
  materialisation rank,
* all processes together (driver + Ray's own processes + workers, the largest sum at one poll),
* wall time and seconds per million rows.

``--repo`` points at another checkout to measure its code on the same logs and backbone (the
in-memory path before the feature cache, for example); ``--set K=V`` overrides the adapt config
(``train.buffer_rows=50000``: streamed adapter tasks at both sizes).

``--parity SEEDS`` compares instead the held and the streamed path on the smallest row count:
per seed (``loop.seed``) one run with the default buffer (tasks hold their rows) and one with
``train.buffer_rows=--stream-rows`` (tasks stream), both with ``--set``, each domain's test AUC
side by side.

    python -m benchmarks.adapt_scale --rows 300000,3000000 --domains 5 \\
        --out benchmarks/results/2026-12-07/adapt_scale.json
    python -m benchmarks.adapt_scale --rows 300000,3000000 --domains 5 --set train.buffer_rows=50000 \\
        --out benchmarks/results/2026-12-07/adapt_scale_stream.json
    python -m benchmarks.adapt_scale --rows 300000 --domains 5 --parity 0,1,2 --stream-rows 20000 \\
        --set train.confidence=0 --out benchmarks/results/2026-12-07/adapt_stream_parity.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import failure, launch, machine, write_results

ROOT = Path(__file__).resolve().parents[1]


def _cli(repo: Path, work: Path, command: str, overrides: list[str], timeout: float = 3600) -> dict:
    """``mdlora <command> --config <empty> --set K=V ...`` in ``repo``, polled by :func:`launch`."""
    config = work / "defaults.yaml"
    config.write_text("{}\n")
    args = [a for o in overrides for a in ("--set", o)]
    extra = ["--json"] if command == "adapt" else []
    return launch([sys.executable, "-m", "mdlora.jobs.cli", command, "--config", str(config), *extra, *args], repo,
                  timeout, watch="ray::")


def _logs(work: Path, rows: int, domains: int, seed: int) -> Path:
    out = work / f"logs-{rows}-{domains}"
    if not (out / "schema.yaml").exists():
        subprocess.run([sys.executable, "-m", "mdlora.jobs.cli", "gen-logs", "--out", str(out), "--rows", str(rows),
                        "--domains", str(domains), "--seed", str(seed)], cwd=ROOT, check=True)
    return out


def _backbone(work: Path, logs: Path, domains: int) -> tuple[list[str], dict | None]:
    """The adapt overrides naming the registry, pretraining its backbone once; a failure or None."""
    reg = work / f"registry-{domains}"
    data = [f"data.schema={logs}/schema.yaml", f"output.root={reg}", "output.model=scale"]
    if not (reg / "backbones" / "scale").exists():
        run = _cli(ROOT, work, "pretrain", [*data, f"data.train={logs}/train", f"data.val={logs}/val",
                                            "loop.epochs=1", "loop.log_every=0", "dist.max_failures=0"])
        if run["rc"]:
            return data, failure(run, "pretrain")
    return data, None


def _adapt(repo: Path, work: Path, overrides: list[str]) -> tuple[dict, dict]:
    """One ``mdlora adapt`` run: ``(launch result, its JSON summary)`` (summary {} on failure)."""
    for _ in range(3):  # an embedded Ray can time out starting on a loaded machine: start again
        run = _cli(repo, work, "adapt", ["loop.epochs=1", "loop.patience=1", "dist.max_failures=0", *overrides])
        if not run["rc"] or not any("timed out during startup" in t for _, t in run["lines"]):
            break
    if run["rc"]:
        return run, {}
    text = "".join(t for _, t in run["lines"])
    return run, json.loads(text[text.index("{\n"):text.rindex("}") + 1])


def measure(repo: Path, work: Path, rows: list[int], domains: int, seed: int, extra: list[str]) -> dict:
    """Logs per size, one backbone, one ``mdlora adapt`` run per size; figures per size."""
    logs = {n: _logs(work, n, domains, seed) for n in rows}
    data, failed = _backbone(work, logs[min(rows)], domains)
    if failed:
        return failed
    out = {}
    for n in rows:
        t0 = time.time()
        run, summary = _adapt(repo, work, [*data, f"data.train={logs[n]}/train", f"data.val={logs[n]}/val",
                                           f"output.run_dir={work}/runs-{n}-{domains}", *extra])
        if not summary:
            out[n] = failure(run, f"adapt at {n} rows")
            continue
        tasks = [p for p, t in run["titles"].items() if any(x.endswith("_train_task") for x in t)]
        out[n] = {"rows": n, "wall_s": round(time.time() - t0, 1), "seconds": summary["seconds"],
                  "s_per_million_rows": round(summary["seconds"]["total"] / n * 1e6, 1),
                  "driver_peak_mb": round(run["rss_root"]), "task_peak_mb": round(max(run["rss"].values(), default=0)),
                  "adapter_task_peak_mb": round(max((run["rss"][p] for p in tasks), default=0)),
                  "materialise_peak_mb": round(max((m for p, m in run["rss"].items() if p not in tasks), default=0)),
                  "all_processes_peak_mb": round(run["rss_tree_peak"]), "bundles": len(summary["bundles"]),
                  "load": run["load"]}
        print(json.dumps(out[n]), flush=True)
    return out


def parity(repo: Path, work: Path, rows: int, domains: int, seed: int, seeds: list[int], extra: list[str],
           stream_rows: int) -> dict:
    """Per ``loop.seed``: each domain's test AUC held (default buffer) and streamed (``stream_rows``)."""
    logs = _logs(work, rows, domains, seed)
    data, failed = _backbone(work, logs, domains)
    if failed:
        return failed
    out: dict = {}
    for s in seeds:
        for path, over in (("held", extra), ("streamed", [*extra, f"train.buffer_rows={stream_rows}"])):
            run, summary = _adapt(repo, work, [*data, f"data.train={logs}/train", f"data.val={logs}/val",
                                               f"data.test={logs}/test", f"loop.seed={s}",
                                               f"output.run_dir={work}/parity-{rows}-{domains}", *over])
            if not summary:
                return failure(run, f"adapt ({path}, seed {s})")
            out.setdefault(s, {})[path] = {d: b["metrics"]["test"]["auc_adapter"]
                                           for d, b in sorted(summary["bundles"].items())}
            out[s]["backbone"] = {d: b["metrics"]["test"]["auc_backbone"] for d, b in sorted(summary["bundles"].items())}
            out[s][f"{path}_best_epoch"] = {d: b["metrics"]["train"]["best_epoch"]  # 0: the backbone was kept
                                            for d, b in sorted(summary["bundles"].items())}
        diff = {d: out[s]["streamed"][d] - out[s]["held"][d] for d in out[s]["held"]}
        out[s]["difference"] = diff
        print(json.dumps({s: diff}), flush=True)
    every = [abs(v) for r in out.values() for v in r["difference"].values()]
    return {"seeds": out, "max_abs_difference": max(every), "mean_abs_difference": sum(every) / len(every)}


def parity_markdown(results: dict) -> str:
    """Held vs streamed test AUC per seed and domain."""
    lines = [f"# Streamed vs held adapter tasks ({results['machine']['time_utc']}, {results['machine']['cores']} cores)",
             "", f"Code: `{results['repo']}`. `mdlora adapt`, one epoch, {results['rows']:,} rows, both with "
             f"`{' '.join(results['set']) or 'defaults'}`, streamed with `train.buffer_rows={results['stream_rows']}`.", ""]
    for domains, r in results["parity"].items():
        if "error" in r:
            lines += [f"{domains} domains: {r['error']}", ""]
            continue
        lines += [f"## {domains} domains", "", "| seed | domain | test AUC backbone | held | streamed | "
                  "streamed − held | kept epoch held, streamed (0: backbone) |", "|---:|---|---:|---:|---:|---:|---|"]
        for s, by in r["seeds"].items():
            lines += [f"| {s} | {d} | {by['backbone'][d]:.4f} | {by['held'][d]:.4f} | {by['streamed'][d]:.4f} | "
                      f"{by['difference'][d]:+.4f} | {by.get('held_best_epoch', {}).get(d, '')}, "
                      f"{by.get('streamed_best_epoch', {}).get(d, '')} |" for d in by["held"]]
        lines += ["", f"Largest difference {r['max_abs_difference']:.4f}, mean {r['mean_abs_difference']:.4f}.", ""]
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """A table per domain count: one row per size, ratios against the smallest."""
    lines = [f"# Adaptation at scale ({results['machine']['time_utc']}, {results['machine']['cores']} cores)", "",
             f"Code: `{results['repo']}`. `mdlora adapt`, one epoch, world size 1, embedded Ray"
             + (f", `{' '.join(results['set'])}`" if results.get("set") else "") + ".", ""]
    for domains, sizes in results["runs"].items():
        if "error" in sizes:  # the backbone could not be pretrained
            lines += [f"{domains} domains: {sizes['error']}", "", "```", sizes["output_tail"][-3000:], "```", ""]
            continue
        ok = {int(n): r for n, r in sizes.items() if "error" not in r}
        if not ok:
            lines += [f"{domains} domains: failed: {next(iter(sizes.values()))}", ""]
            continue
        base = ok[min(ok)]
        lines += [f"## {domains} domains", "", "| rows | driver peak MB | largest task MB | adapter task MB | "
                  "materialise rank MB | all processes MB | s / M rows | × smallest (driver, adapter task, cost/row) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for n, r in sorted(ok.items()):
            adapter = r.get("adapter_task_peak_mb", 0)
            ratio = (f"{r['driver_peak_mb'] / base['driver_peak_mb']:.2f}, "
                     f"{adapter / base['adapter_task_peak_mb'] if adapter else float('nan'):.2f}, "
                     f"{r['s_per_million_rows'] / base['s_per_million_rows']:.2f}")
            lines.append(f"| {n:,} | {r['driver_peak_mb']:,} | {r['task_peak_mb']:,} | {adapter:,} | "
                         f"{r.get('materialise_peak_mb', 0):,} | {r['all_processes_peak_mb']:,} | "
                         f"{r['s_per_million_rows']} | {ratio} |")
        loads = [f"{n:,} rows {r['load'][0]:.1f} → {r['load'][1]:.1f}" for n, r in sorted(ok.items()) if "load" in r]
        lines += ["", f"1-minute load average at the start and end of each run (2 cores): {'; '.join(loads)}."] if loads else []
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="300000,3000000", help="comma-separated row counts")
    p.add_argument("--domains", default="5", help="comma-separated domain counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/mdlora-adapt-scale", help="logs, registry and runs (reused)")
    p.add_argument("--repo", default=str(ROOT), help="checkout whose mdlora adapt is measured")
    p.add_argument("--out", default="", help="JSON result path (+ .md beside it)")
    p.add_argument("--set", action="append", default=[], metavar="K=V", help="adapt config override (repeatable)")
    p.add_argument("--parity", default="", help="comma-separated loop.seed values: held vs streamed test AUC")
    p.add_argument("--stream-rows", type=int, default=20000, help="--parity: train.buffer_rows of the streamed runs")
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = [int(x) for x in a.rows.split(",")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=a.repo, capture_output=True, text=True).stdout
    results = {"machine": machine(), "repo": f"{commit.strip() or a.repo}", "set": a.set}
    if a.parity:
        results |= {"rows": min(rows), "stream_rows": a.stream_rows, "parity": {}}
        for k in (int(x) for x in a.domains.split(",")):
            results["parity"][k] = parity(Path(a.repo), work, min(rows), k, a.seed,
                                          [int(s) for s in a.parity.split(",")], a.set, a.stream_rows)
        text = parity_markdown(results)
    else:
        results["runs"] = {}
        for k in (int(x) for x in a.domains.split(",")):
            results["runs"][k] = measure(Path(a.repo), work, rows, k, a.seed, a.set)
        text = markdown(results)
    print(text)
    if a.out:
        write_results(Path(a.out), results, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
