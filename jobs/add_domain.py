"""``mdlora add-domain --config C --domain NAME --data P``: one new domain's adapter, nothing else.

``P`` holds the new domain's logs: ``train/`` (+ optional ``val/``, ``test/``) subdirectories, or
one dataset whose rows are split 9:1 into train/validation by ``loop.seed``.
"""

from __future__ import annotations

import argparse
import json

from mdlora.jobs.cli import add_config_options


def configure(p: argparse.ArgumentParser) -> None:
    """Options of ``mdlora add-domain``."""
    add_config_options(p, "adapter run (AdaptConfig)")
    p.add_argument("--domain", required=True, help="name of the new domain (added to the domain vocabulary)")
    p.add_argument("--data", required=True, help="its logs: a dir with train/ [val/ test/] or one dataset (9:1 split)")


def run(args: argparse.Namespace) -> int:
    """Load config, run :func:`mdlora.infra.adapt.add_domain`, print the bundle written."""
    from mdlora.infra.adapt import add_domain
    from mdlora.infra.log import setup_logging
    from mdlora.jobs.adapt import format_summary
    from mdlora.trainer.config import load_adapt_config

    setup_logging()
    cfg = load_adapt_config(args.config, args.overrides)
    summary = add_domain(cfg, args.domain, args.data)
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return 0
