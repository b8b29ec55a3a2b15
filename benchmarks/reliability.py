"""Reliability figures: every fault injected several times, with the count that survived.

1. ``pretrain_worker_kill``: ``mdlora pretrain`` on 2 Ray Train workers (gloo), rank 1 SIGKILLed
   just before step k (``MDLORA_FAULT_KILL``) for ``--kills`` random k, each in a different
   checkpoint interval (:func:`kill_points`). Survived: the run
   completes all its steps, it resumed from the last checkpoint committed before the kill
   (steps lost = k - 1 - resumed step <= ``checkpoint_every``), and every domain's final
   validation AUC is within 0.005 of an undisturbed run with the same seed.
2. ``pretrain_checkpoint_write_kill``: rank 0 SIGKILLed inside its n-th checkpoint write for
   n = 2 .. 1 + ``--write-kills`` (``MDLORA_FAULT_WRITE``, after the shards, before
   ``train_state.json``); same criteria, resumed from checkpoint n - 1.
3. The reliability tests, each test case one fault instance, rerun in fresh pytest processes
   (``--reps`` times, see :data:`TEST_FILES`; survived = passed): a process killed while writing a checkpoint, a
   backbone, a bundle or the registry index (``test_crash_writes``), the S3 endpoint stopped
   mid-publish (``test_s3_outage``), disk full / permission denied (``test_disk``), 4
   ``mdlora add-domain`` jobs at once (``test_ray_faults``), a second retrain of the same model
   refused by the lock (``test_retrain_lock``), real retrains killed at two points, failed before the gate
   and started twice at once (``tests/integration/test_retrain.py``), the bad-input table
   (``test_bad_input``) and the credential checks (``test_security``).

Usage::

    python -m benchmarks.reliability [--reps 3] [--kills 3] [--out benchmarks/results/<date>/reliability.json]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from benchmarks.common import machine, write_results

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_EVERY = 10
AUC_TOLERANCE = 0.005
TEST_FILES = {  # fault family -> (test file, repetitions (None: --reps), pytest -k selection)
    "crash_while_writing": ("tests/reliability/test_crash_writes.py", None, ""),
    "s3_endpoint_outage": ("tests/reliability/test_s3_outage.py", None, ""),
    "disk_full_or_permission": ("tests/reliability/test_disk.py", None, ""),
    "concurrent_add_domain": ("tests/reliability/test_ray_faults.py", 2, ""),  # ~3 min each on 2 cores
    "concurrent_retrain_lock": ("tests/reliability/test_retrain_lock.py", None, ""),
    # real retrains: killed after publishing its backbone, killed while publishing its adapters, a
    # failure before the gate, and a second retrain started while one runs (~5 min on 2 cores)
    "retrain_killed_or_concurrent": ("tests/integration/test_retrain.py", 1, "killed or failed or at_once"),
    "bad_input": ("tests/reliability/test_bad_input.py", 1, ""),  # deterministic refusals
    "security": ("tests/reliability/test_security.py", 1, ""),
}


def _pretrain_config(logs: Path, root: Path):
    from mdlora.trainer.config import load_run_config

    return load_run_config(None, [
        f"data.schema={logs}/schema.yaml", f"data.train={logs}/train", f"data.val={logs}/val",
        "data.batch_size=512", "model.hidden=[64,32]", "optim.dense_lr=0.003", "optim.sparse_lr=0.05",
        "loop.epochs=1", "loop.log_every=0", f"loop.checkpoint_every={CHECKPOINT_EVERY}", "loop.seed=0",
        "dist.world_size=2", "dist.sharding_types=[table_wise]", "dist.max_failures=2",
        f"output.root={root}", "output.model=ctr"])


def _one_pretrain(logs: Path, work: Path, name: str, env: dict[str, str]) -> dict:
    """One pretrain run with ``env`` set around it; its state, per-domain AUCs and seconds."""
    import json

    from mdlora.infra.pretrain import pretrain

    os.environ.update(env)
    t0 = time.time()
    try:
        summary = pretrain(_pretrain_config(logs, work / name), run_name=name)
        error = None
    except Exception as e:  # noqa: BLE001 - a fault that was not survived is a figure, not a crash
        summary, error = None, f"{type(e).__name__}: {e}"[:500]
    finally:
        for k in env:
            os.environ.pop(k, None)
    out = {"name": name, "seconds": round(time.time() - t0, 1), "completed": summary is not None, "error": error}
    if summary:
        state = json.loads((Path(summary["path"]) / "train_state.json").read_text())
        out.update(steps=state["step"], resumed_from=state["resumed_from"],
                   auc={d: v["auc"] for d, v in summary["metrics"]["val"]["domains"].items()})
    return out


def kill_points(steps: int, kills: int, seed: int) -> list[int]:
    """``kills`` random steps in [2, steps), each in a different checkpoint interval, none on a
    checkpoint: the resumes start from different checkpoints (or from scratch in the first)."""
    spans = [list(range(max(2, i * CHECKPOINT_EVERY + 1), min((i + 1) * CHECKPOINT_EVERY, steps)))
             for i in range(-(-steps // CHECKPOINT_EVERY))]
    spans = [span for span in spans if span]
    if kills > len(spans):
        raise ValueError(f"--kills {kills}: a run of {steps} steps has only {len(spans)} checkpoint intervals")
    rng = np.random.default_rng(seed)
    return sorted(int(rng.choice(spans[i])) for i in rng.choice(len(spans), size=kills, replace=False))


def pretrain_faults(work: Path, kills: int, seed: int, write_kills: int = 2) -> dict:
    """Undisturbed run, ``kills`` step kills at distinct random steps, ``write_kills`` kills
    inside the 2nd, 3rd, ... checkpoint write."""
    import ray

    from mdlora.embeddings.schema import Schema
    from mdlora.infra.logs import LogDataset
    from mdlora.infra.synth import generate

    logs = work / "logs"
    generate(str(logs), rows=30_000, domains=3, seed=3, users=3000, items=3000)
    steps = LogDataset(str(logs / "train"), Schema.load(logs / "schema.yaml")).num_batches(256, 2)
    points = kill_points(steps, kills, seed)
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.1"  # see tests/integration/test_pretrain.py
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        base = _one_pretrain(logs, work, "undisturbed", {})
        runs = []
        for k in points:
            marker = work / f"killed-step-{k}"
            run = _one_pretrain(logs, work, f"kill-rank1-step{k}", {"MDLORA_FAULT_KILL": f"1:{k}:{marker}"})
            run.update(fault="worker_kill", kill_step=k, fired=marker.exists(), done_before_kill=k - 1,
                       expected_resume=(k - 1) // CHECKPOINT_EVERY * CHECKPOINT_EVERY)
            runs.append(run)
        for n in range(2, 2 + write_kills):  # rank 0 dies inside its n-th checkpoint write
            marker = work / f"killed-in-checkpoint-write-{n}"
            run = _one_pretrain(logs, work, f"kill-rank0-in-checkpoint-write-{n}",
                                {"MDLORA_FAULT_WRITE": f"train_state.json:{n}:{marker}"})
            run.update(fault="checkpoint_write_kill", kill_step=n * CHECKPOINT_EVERY, fired=marker.exists(),
                       done_before_kill=n * CHECKPOINT_EVERY, expected_resume=(n - 1) * CHECKPOINT_EVERY)
            runs.append(run)
    finally:
        ray.shutdown()
    for run in runs:
        _judge(run, base)
    return {"steps_per_run": steps, "kill_points": points, "undisturbed": base, "runs": runs}


def _judge(run: dict, base: dict) -> None:
    """Fill ``steps_lost``, ``max_auc_diff`` and ``survived`` of one disturbed run."""
    if not (run["completed"] and base["completed"] and run["fired"]):
        run["survived"] = False
        return
    resumed = run["resumed_from"][0] if run["resumed_from"] else 0
    run["steps_lost"] = run["done_before_kill"] - resumed  # steps done before the kill, redone after
    run["max_auc_diff"] = max(abs(run["auc"][d] - base["auc"][d]) for d in base["auc"])
    run["survived"] = bool(resumed == run["expected_resume"] and run["steps_lost"] <= CHECKPOINT_EVERY
                           and run["steps"] == base["steps"] and run["max_auc_diff"] <= AUC_TOLERANCE)


def run_test_files(files: dict[str, tuple[str, int | None]], reps: int, work: Path) -> dict:
    """Each test file its repetitions (default ``reps``) in fresh pytest processes; per-case counts."""
    out = {}
    for family, (path, times, select) in files.items():
        cases: dict[str, dict] = {}
        t0 = time.time()
        for rep in range(times or reps):
            xml = work / f"{family}-{rep}.xml"
            try:
                proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path,
                                       f"--junitxml={xml}", *(["-k", select] if select else [])],
                                      cwd=ROOT, capture_output=True, text=True, timeout=1800)
                crash = None if xml.exists() else f"pytest exited {proc.returncode} without a report: {proc.stdout[-300:]}"
            except subprocess.TimeoutExpired:
                crash = "timed out after 1800 s"
            if crash:  # the whole file failed (a crash or a hang): a figure, not a benchmark crash
                c = cases.setdefault("(whole file)", {"survived": 0, "total": 0, "skipped": 0, "failures": []})
                c["total"] += 1
                c["failures"].append(crash)
                continue
            for case in ET.parse(xml).getroot().iter("testcase"):
                c = cases.setdefault(case.get("name"), {"survived": 0, "total": 0, "skipped": 0, "failures": []})
                if case.find("skipped") is not None:
                    c["skipped"] += 1
                    continue
                c["total"] += 1
                bad = case.find("failure") if case.find("failure") is not None else case.find("error")
                if bad is None:
                    c["survived"] += 1
                else:
                    c["failures"].append((bad.get("message") or "")[:300])
        out[family] = {"file": path, "seconds": round(time.time() - t0, 1), "cases": cases,
                       "survived": sum(c["survived"] for c in cases.values()),
                       "total": sum(c["total"] for c in cases.values())}
    return out


def markdown(res: dict) -> str:
    """The figures as Markdown tables."""
    p = res["pretrain"]
    lines = [f"# Reliability ({res['date']})", "", f"Command: `{res['command']}`  ", f"Total {res['seconds']} s; "
             f"machine: {res['machine'].get('cores', '?')} cores, load average {res['machine'].get('loadavg', '?')}.", "",
             "## Pretrain faults (2 Ray Train workers, gloo)", "",
             f"{p['steps_per_run']} steps per run, checkpoint every {CHECKPOINT_EVERY} steps; undisturbed run "
             f"{p['undisturbed']['seconds']} s, AUC per domain {p['undisturbed'].get('auc')}.", "",
             "| fault | kill step | resumed from | steps lost | max abs AUC diff | seconds | survived |",
             "|---|---|---|---|---|---|---|"]
    for r in p["runs"]:
        diff = f"{r['max_auc_diff']:.2e}" if "max_auc_diff" in r else "-"
        lines.append(f"| {r['fault']} | {r['kill_step']} | {r.get('resumed_from', '-')} | {r.get('steps_lost', '-')} "
                     f"| {diff} | {r['seconds']} | {'yes' if r['survived'] else 'NO: ' + str(r.get('error'))} |")
    lines += ["", "## Test-driven faults (each test case one fault, fresh pytest process per repetition)", "",
              "| family | case | survived / total |", "|---|---|---|"]
    for family, f in res["tests"].items():
        for name, c in f["cases"].items():
            skipped = f" ({c['skipped']} skipped)" if c["skipped"] else ""
            lines.append(f"| {family} | {name} | {c['survived']}/{c['total']}{skipped} |")
    lines += ["", "## Summary", "", "| family | survived / total | seconds |", "|---|---|---|"]
    for family, (s, t, sec) in res["summary"].items():
        lines.append(f"| {family} | {s}/{t} | {sec} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run every fault, write JSON + Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each repeated test file")
    parser.add_argument("--kills", type=int, default=3, help="distinct random kill steps (>= 3)")
    parser.add_argument("--write-kills", type=int, default=2,
                        help="runs killed inside a checkpoint write (the 2nd, 3rd, ... write)")
    parser.add_argument("--seed", type=int, default=2026, help="seed of the kill steps")
    parser.add_argument("--out", default=f"benchmarks/results/{time.strftime('%Y-%m-%d')}/reliability.json")
    args = parser.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="mdlora-reliability-") as tmp:
        work = Path(tmp)
        pretrain = pretrain_faults(work, args.kills, args.seed, args.write_kills)
        write_results(Path(tmp) / "partial.json", {"pretrain": pretrain}, "")  # kept in the log below
        print({"pretrain": pretrain}, flush=True)
        tests = run_test_files(TEST_FILES, args.reps, work)
    runs = pretrain["runs"]
    summary = {
        f"pretrain_{kind}": (sum(r["survived"] for r in runs if r["fault"] == kind),
                             sum(r["fault"] == kind for r in runs),
                             round(sum(r["seconds"] for r in runs if r["fault"] == kind), 1))
        for kind in ("worker_kill", "checkpoint_write_kill")}
    summary |= {family: (f["survived"], f["total"], f["seconds"]) for family, f in tests.items()}
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": round(time.time() - t0, 1),
           "command": "python -m benchmarks.reliability " + " ".join(sys.argv[1:]), "machine": machine(),
           "auc_tolerance": AUC_TOLERANCE, "checkpoint_every": CHECKPOINT_EVERY,
           "pretrain": pretrain, "tests": tests, "summary": summary}
    write_results(ROOT / args.out, res, markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
