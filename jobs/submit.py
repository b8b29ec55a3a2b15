"""``mdlora submit --address URL [--wait] [--working-dir D] -- <job args>``: run a job on a Ray cluster.

Token auth: run with ``RAY_AUTH_MODE=token`` and the cluster's token in ``RAY_AUTH_TOKEN`` or
``~/.ray/auth_token`` (``infra/scripts/ray-head-start.sh`` sets one up for a local head).
"""

from __future__ import annotations

import argparse


def configure(p: argparse.ArgumentParser) -> None:
    """Options of ``mdlora submit``."""
    p.add_argument("--address", required=True, help="Ray dashboard / job API address, e.g. http://127.0.0.1:8265")
    p.add_argument("--wait", action="store_true", help="stream the job's logs; exit 0 only if it SUCCEEDED")
    p.add_argument("--working-dir", default=".", help="dir uploaded as the job's working dir (default: .)")
    p.add_argument("--env", dest="env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable of the job (repeatable; credential values are never printed)")
    p.add_argument("job", nargs=argparse.REMAINDER, help="after --: the mdlora command line, e.g. pretrain --config C")


def run(args: argparse.Namespace) -> int:
    """Submit ``mdlora <job>``; with ``--wait`` return 0 iff the job SUCCEEDED."""
    from infra.submit import submit

    job = args.job[1:] if args.job[:1] == ["--"] else args.job
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--env {item.split('=')[0]!r}: expected KEY=VALUE")
        env[key] = value
    _, status = submit(args.address, job, working_dir=args.working_dir, wait=args.wait, env_vars=env)
    return 0 if status == "SUCCEEDED" or not args.wait else 1
