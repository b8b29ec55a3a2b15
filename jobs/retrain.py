"""``mdlora retrain --config C --window START..END``: what the scheduled CronJob runs.

Exit codes: 0 done (or already done: the recorded report is printed), 2 bad config or input,
3 another retrain of the same model holds the lock (or this run lost it; nothing promoted).
"""

from __future__ import annotations

import argparse
import json
import sys

from mdlora.jobs.cli import add_config_options


def configure(p: argparse.ArgumentParser) -> None:
    """Options of ``mdlora retrain``."""
    add_config_options(p, "retrain (RetrainConfig)")
    p.add_argument("--window", required=True, help="new training data: START..END dates, e.g. 2026-01-01..2026-01-07")


def run(args: argparse.Namespace) -> int:
    """Load config, run :func:`mdlora.infra.retrain.retrain`, print the per-domain decisions."""
    from mdlora.infra.log import setup_logging
    from mdlora.infra.retrain import retrain
    from mdlora.infra.retrain_lock import RetrainLocked
    from mdlora.trainer.config import load_retrain_config

    setup_logging()
    cfg = load_retrain_config(args.config, args.overrides)
    try:
        report = retrain(cfg, args.window)
    except RetrainLocked as e:
        print(f"mdlora retrain: error: {e}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"retrain {report['model']} {report['window']}{' (already done)' if report['rerun'] else ''}: backbone "
          f"{report['champion']['version']} -> {report['backbone']['version']}, production {report['production_backbone']}")
    for d, r in report["domains"].items():
        print(f"  {d:<16} {r['decision']:<8} {r['reason']}")
    print(f"  report {report['record']}report.md")
    return 0
