"""``mdlora submit --address URL [--wait] [--working-dir D] [--runtime-env F] -- <job args>``: run on Ray.

Token auth: run with ``RAY_AUTH_MODE=token`` and the cluster's token in ``RAY_AUTH_TOKEN`` or
``~/.ray/auth_token`` (``infra/scripts/ray-head-start.sh`` sets one up for a local head).
"""

from __future__ import annotations

import argparse


def configure(p: argparse.ArgumentParser) -> None:
    """Options of ``mdlora submit``."""
    p.add_argument("--address", required=True, help="Ray dashboard / job API address, e.g. http://127.0.0.1:8265")
    p.add_argument("--wait", action="store_true", help="stream the job's logs; exit 0 only if it SUCCEEDED")
    p.add_argument("--working-dir", default=None,
                   help="dir uploaded as the job's working dir (default: the runtime env's, else .)")
    p.add_argument("--runtime-env", default=None, metavar="FILE",
                   help="runtime_env YAML, as for `ray job submit --runtime-env` (e.g. infra/runtime_env.yaml)")
    p.add_argument("--env", dest="env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable of the job (repeatable; credential-like names are refused: Ray stores "
                        "the env with the job)")
    p.add_argument("job", nargs=argparse.REMAINDER, help="after --: the mdlora command line, e.g. pretrain --config C")


def run(args: argparse.Namespace) -> int:
    """Submit ``mdlora <job>``; with ``--wait`` return 0 iff the job SUCCEEDED."""
    from mdlora.infra.submit import load_runtime_env, submit

    job = args.job[1:] if args.job[:1] == ["--"] else args.job
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--env {item.split('=')[0]!r}: expected KEY=VALUE")
        env[key] = value
    base = load_runtime_env(args.runtime_env) if args.runtime_env else None
    _, status = submit(args.address, job, working_dir=args.working_dir, wait=args.wait, env_vars=env,
                       runtime_env=base)
    return 0 if status == "SUCCEEDED" or not args.wait else 1
