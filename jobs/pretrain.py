"""``mdlora pretrain --config C [--set k=v ...]``: train and publish the shared backbone."""

from __future__ import annotations

import argparse
import json

from mdlora.jobs.cli import add_config_options


def configure(p: argparse.ArgumentParser) -> None:
    """Options of ``mdlora pretrain``."""
    add_config_options(p, "pretrain run (RunConfig)")
    p.add_argument("--run-name", default=None, help="Ray Train run name; reuse one to resume that run")


def run(args: argparse.Namespace) -> int:
    """Load config, run :func:`mdlora.infra.pretrain.pretrain`, print where the backbone went."""
    from mdlora.infra.log import setup_logging
    from mdlora.infra.pretrain import pretrain
    from mdlora.trainer.config import load_run_config

    setup_logging()
    cfg = load_run_config(args.config, args.overrides)
    summary = pretrain(cfg, run_name=args.run_name)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        m = summary["metrics"]
        print(f"backbone {summary['name']} {summary['version']} at {summary['path']}")
        print(f"  content hash {summary['content_hash']}  steps {summary['step']}  {summary['seconds']} s")
        if m.get("wauc") is not None:
            ne = f"  NE {m['ne']:.4f}  calibration {m['calibration']:.4f}" if m.get("ne") is not None else ""
            print(f"  validation WAUC {m['wauc']:.4f}  AUC {m['auc']:.4f}  LogLoss {m['logloss']:.4f}{ne}")
    return 0
