"""``mdlora import-movielens``: MovieLens 1M/100K -> mdlora log + schema (infra/movielens.py)."""

from __future__ import annotations

import argparse
import json


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the import-movielens options."""
    parser.add_argument(
        "--src", required=True, help="directory with ML-1M (.dat or ratings.csv) or ML-100K files"
    )
    parser.add_argument(
        "--out", required=True, help="output directory or s3:// prefix (absent or empty)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the 8:1:1 train/val/test split"
    )


def run(args: argparse.Namespace) -> int:
    """Convert; print rows and positive rate per domain."""
    from mdlora.infra.movielens import import_movielens

    stats = import_movielens(args.src, args.out, seed=args.seed)
    brief = {
        k: {"rows": v["rows"], "positive_rate": v["positive_rate"]}
        for k, v in stats["domains"].items()
    }
    print(
        json.dumps(
            {
                "layout": stats["layout"],
                "rows": stats["rows"],
                "splits": stats["splits"],
                "domains": brief,
                "seconds": round(stats["seconds"], 2),
            },
            indent=2,
        )
    )
    return 0
