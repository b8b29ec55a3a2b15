"""``mdlora adapt --config C [--domains a,b] [--set k=v ...]``: train and publish per-domain adapters."""

from __future__ import annotations

import argparse
import json

from mdlora.jobs.cli import add_config_options


def configure(p: argparse.ArgumentParser) -> None:
    """Options of ``mdlora adapt``."""
    add_config_options(p, "adapter run (AdaptConfig)")
    p.add_argument("--domains", default="", help="comma-separated domains (default: data.domains, else all)")


def run(args: argparse.Namespace) -> int:
    """Load config, run :func:`mdlora.infra.adapt.adapt`, print one line per published bundle."""
    from mdlora.infra.adapt import adapt
    from mdlora.infra.log import setup_logging
    from mdlora.trainer.config import load_adapt_config

    setup_logging()
    cfg = load_adapt_config(args.config, args.overrides)
    domains = [d.strip() for d in args.domains.split(",") if d.strip()] or None
    summary = adapt(cfg, domains)
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    """One line per bundle: version, production or not, validation AUC backbone -> adapter."""
    b = summary["backbone"]
    lines = [f"backbone {b['name']} {b['version']} ({b['content_hash'][:12]}), method {summary['method']}"]
    for domain, r in summary["bundles"].items():
        v = r["metrics"].get("validation", {})
        auc = f"val AUC {v['auc_backbone']:.4f} -> {v['auc_adapter']:.4f}" if "auc_adapter" in v else "no val AUC"
        lines.append(f"  {domain:<16} {r['version']}{' production' if r['promoted'] else ' (not promoted: production exists)'}"
                     f"  {auc}  params {r['param_count']} ({r['param_share']:.2%} of dense)")
    if summary["skipped_no_rows"]:
        lines.append(f"  skipped (no training rows): {', '.join(summary['skipped_no_rows'])}")
    lines.append(f"  seconds {summary['seconds']}")
    return "\n".join(lines)
