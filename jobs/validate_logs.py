"""``mdlora validate-logs``: check a log dataset against a schema; per-domain summary.

Exit 0 when clean; 2 with one error line per problem (file, column, example values) otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys

from mdlora.embeddings.schema import Schema
from mdlora.infra.logs import validate_dataset


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the options of this command."""
    parser.add_argument("--schema", required=True, help="schema YAML")
    parser.add_argument("--data", required=True, help="Parquet file or directory (local or s3://)")
    parser.add_argument("--window", default="", help="date window START..END (inclusive)")
    parser.add_argument("--domains", default="", help="comma-separated domain subset")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    """Validate, print the summary, return 0 (clean) or 2 (problems found)."""
    schema = Schema.load(args.schema)
    domains = [d for d in args.domains.split(",") if d] or None
    report = validate_dataset(args.data, schema, window=args.window, domains=domains)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(f"{'domain':<20} {'rows':>12} {'positive_rate':>14}")
        for name, d in report["domains"].items():
            print(f"{name:<20} {d['rows']:>12} {d['positive_rate']:>14.4f}")
        print(f"{'total':<20} {report['rows']:>12}")
        for key in ("nulls", "out_of_range", "unseen_domains"):
            nonzero = {k: v for k, v in report[key].items() if v}
            if nonzero:
                print(f"{key}: {nonzero}")
    for line in report["errors"]:
        print(f"mdlora validate-logs: error: {line}", file=sys.stderr)
    return 2 if report["errors"] else 0
