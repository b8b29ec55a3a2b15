"""``mdlora gen-logs``: write a synthetic multi-domain CTR log and its schema (infra/synth.py)."""

from __future__ import annotations

import argparse
import json


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the gen-logs options."""
    parser.add_argument(
        "--out", required=True, help="output directory or s3:// prefix (absent or empty)"
    )
    parser.add_argument("--rows", type=int, required=True, help="total rows over all domains")
    parser.add_argument(
        "--domains", type=int, required=True, help="number of domains K (d00, d01, ...)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed; same arguments give identical files"
    )
    parser.add_argument(
        "--holdout-domains",
        type=int,
        default=0,
        help="write the last H domains under heldout/ only (not in the schema)",
    )
    parser.add_argument("--days", type=int, default=7, help="log days (hive partitions date=...)")
    parser.add_argument("--users", type=int, default=100_000, help="user ids [0, users)")
    parser.add_argument("--items", type=int, default=100_000, help="item ids [0, items)")
    parser.add_argument(
        "--shifts",
        default="a",
        help="per-domain shift families, comma-separated (or none): a low-rank user x item, "
        "b category/item preferences, c price sensitivity, d city matters in some domains only, "
        "e own hot items (infra/synth_world.py); default a",
    )


def run(args: argparse.Namespace) -> int:
    """Generate; print the summary as JSON."""
    from mdlora.infra.synth import generate

    summary = generate(
        args.out,
        rows=args.rows,
        domains=args.domains,
        seed=args.seed,
        holdout_domains=args.holdout_domains,
        days=args.days,
        users=args.users,
        items=args.items,
        shifts=args.shifts,
    )
    print(json.dumps(summary, indent=2))
    return 0
