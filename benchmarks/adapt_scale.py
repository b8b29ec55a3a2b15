"""Adaptation at scale: memory and cost per row of ``mdlora adapt`` as rows grow (issue #15).

For each row count: gen-logs writes the logs (same users, items, domains: one schema), a small
backbone is pretrained once on the smallest set, and ``mdlora adapt`` (the CLI, one epoch)
runs in its own process with an embedded Ray. Polled every 0.2 s (/proc):

* driver peak RSS (the ``mdlora adapt`` process; it must not grow with rows),
* per-task peak RSS (the largest Ray worker: materialisation ranks and adapter tasks),
* all processes together (driver + Ray's own processes + workers, the largest sum at one poll),
* wall time and seconds per million rows.

``--repo`` points at another checkout to measure its code on the same logs and backbone (the
in-memory path before the feature cache, for example).

    python -m benchmarks.adapt_scale --rows 300000,3000000 --domains 5 \\
        --out benchmarks/results/2026-12-07/adapt_scale.json
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


def measure(repo: Path, work: Path, rows: list[int], domains: int, seed: int) -> dict:
    """Logs per size, one backbone, one ``mdlora adapt`` run per size; figures per size."""
    logs = {n: _logs(work, n, domains, seed) for n in rows}
    small = logs[min(rows)]
    reg = work / f"registry-{domains}"
    data = [f"data.schema={small}/schema.yaml", f"output.root={reg}", "output.model=scale"]
    if not (reg / "backbones" / "scale").exists():
        run = _cli(ROOT, work, "pretrain", [*data, f"data.train={small}/train", f"data.val={small}/val",
                                            "loop.epochs=1", "loop.log_every=0", "dist.max_failures=0"])
        if run["rc"]:
            return failure(run, "pretrain")
    out = {}
    for n in rows:
        t0 = time.time()
        run = _cli(repo, work, "adapt", [*data, f"data.train={logs[n]}/train", f"data.val={logs[n]}/val",
                                          "loop.epochs=1", "loop.patience=1", "dist.max_failures=0",
                                          f"output.run_dir={work}/runs-{n}-{domains}"])
        if run["rc"]:
            out[n] = failure(run, f"adapt at {n} rows")
            continue
        text = "".join(t for _, t in run["lines"])
        summary = json.loads(text[text.index("{\n"):text.rindex("}") + 1])
        out[n] = {"rows": n, "wall_s": round(time.time() - t0, 1), "seconds": summary["seconds"],
                  "s_per_million_rows": round(summary["seconds"]["total"] / n * 1e6, 1),
                  "driver_peak_mb": round(run["rss_root"]), "task_peak_mb": round(max(run["rss"].values(), default=0)),
                  "all_processes_peak_mb": round(run["rss_tree_peak"]), "bundles": len(summary["bundles"])}
        print(json.dumps(out[n]), flush=True)
    return out


def markdown(results: dict) -> str:
    """A table per domain count: one row per size, ratios against the smallest."""
    lines = [f"# Adaptation at scale ({results['machine']['time_utc']}, {results['machine']['cores']} cores)", "",
             f"Code: `{results['repo']}`. `mdlora adapt`, one epoch, world size 1, embedded Ray.", ""]
    for domains, sizes in results["runs"].items():
        if "error" in sizes:  # the backbone could not be pretrained
            lines += [f"{domains} domains: {sizes['error']}", "", "```", sizes["output_tail"][-3000:], "```", ""]
            continue
        ok = {int(n): r for n, r in sizes.items() if "error" not in r}
        if not ok:
            lines += [f"{domains} domains: failed: {next(iter(sizes.values()))}", ""]
            continue
        base = ok[min(ok)]
        lines += [f"## {domains} domains", "", "| rows | driver peak MB | largest task MB | all processes MB | "
                  "s / M rows | × smallest (driver, task, cost/row) |", "|---:|---:|---:|---:|---:|---|"]
        for n, r in sorted(ok.items()):
            ratio = (f"{r['driver_peak_mb'] / base['driver_peak_mb']:.2f}, {r['task_peak_mb'] / base['task_peak_mb']:.2f}, "
                     f"{r['s_per_million_rows'] / base['s_per_million_rows']:.2f}")
            lines.append(f"| {n:,} | {r['driver_peak_mb']:,} | {r['task_peak_mb']:,} | {r['all_processes_peak_mb']:,} | "
                         f"{r['s_per_million_rows']} | {ratio} |")
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
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = [int(x) for x in a.rows.split(",")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=a.repo, capture_output=True, text=True).stdout
    results = {"machine": machine(), "repo": f"{commit.strip() or a.repo}", "runs": {}}
    for k in (int(x) for x in a.domains.split(",")):
        results["runs"][k] = measure(Path(a.repo), work, rows, k, a.seed)
    text = markdown(results)
    print(text)
    if a.out:
        write_results(Path(a.out), results, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
