"""``mdlora pretrain --config C [--set k=v ...]``: train and publish the shared backbone."""

from __future__ import annotations

import argparse
import json


def configure(p: argparse.ArgumentParser) -> None:
    """Options of ``mdlora pretrain``."""
    p.add_argument("--config", required=True, help="run config YAML (see trainer/config.py for every key)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set dist.world_size=2 (repeatable)")
    p.add_argument("--run-name", default=None, help="Ray Train run name; reuse one to resume that run")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    """Load config, run :func:`infra.pretrain.pretrain`, print where the backbone went."""
    from infra.log import setup_logging
    from infra.pretrain import pretrain
    from trainer.config import load_run_config

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
            print(f"  validation WAUC {m['wauc']:.4f}  AUC {m['auc']:.4f}  LogLoss {m['logloss']:.4f}")
    return 0
