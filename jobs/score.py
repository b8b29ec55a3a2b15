"""``mdlora score --config C --data P --out Q [--bundles d=vNNNN,...]``: routed mixed-domain scoring.

``score.workers`` (config) spreads the input over Ray tasks; ``out`` is then a directory of parts.
"""

from __future__ import annotations

import argparse
import json

from mdlora.jobs.cli import add_config_options


def configure(p: argparse.ArgumentParser) -> None:
    """Options of ``mdlora score``."""
    add_config_options(p, "adapter run (AdaptConfig: output.root/model/backbone)")
    p.add_argument("--data", required=True, help="Parquet dataset to score (file or dir, local or s3://)")
    p.add_argument("--out", required=True, help="predictions to write, local or s3:// (score.workers > 1: a directory of parts)")
    p.add_argument("--bundles", default="", help="domain=version,... (default: every domain's production bundle)")


def run(args: argparse.Namespace) -> int:
    """Load the backbone and bundles, score, print rows, fallback rows and per-domain AUC."""
    from mdlora.infra.log import setup_logging
    from mdlora.infra.runs import resolve_paths
    from mdlora.infra.score import parse_bundles, score
    from mdlora.trainer.config import load_adapt_config

    setup_logging()
    cfg = resolve_paths(load_adapt_config(args.config, args.overrides))
    summary = score(cfg, args.data, args.out, parse_bundles(args.bundles))
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    print(f"scored {summary['rows']} rows with backbone {summary['backbone']} -> {args.out}")
    print(f"  fallback rows (no adapter for their domain): {summary['fallback_rows']}")
    for name, d in summary["domains"].items():
        print(f"  {name:<16} rows {d['rows']:>8}  adapter {d['adapter_version'] or '-'}")
    if "table" in summary:
        print(summary["table"])
    return 0
