"""``mdlora`` command line: one subcommand per job module, imported lazily (fast ``--help``).

Each job module defines ``configure(parser)`` (adds its options) and ``run(args) -> int``.
Errors that are the user's (bad config, bad input) print one clear line and exit 2; they never
leave partial output behind (writers commit atomically).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from mdlora import __version__
from mdlora.config import ConfigError

# name -> (module, one-line help). Order is the order of `mdlora --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "gen-logs": ("mdlora.jobs.gen_logs", "write a synthetic multi-domain CTR log (+ schema) to a path or s3://"),
    "import-movielens": ("mdlora.jobs.import_movielens", "convert MovieLens 1M/100K to the mdlora log format (HAMUR protocol)"),
    "validate-logs": ("mdlora.jobs.validate_logs", "check a log dataset against a schema; per-domain summary"),
    "plan": ("mdlora.jobs.plan", "print the embedding sharding plan and per-rank memory for a topology"),
    "pretrain": ("mdlora.jobs.pretrain", "train the shared backbone (Ray Train + TorchRec sharding) and publish it"),
    "adapt": ("mdlora.jobs.adapt", "train per-domain LoRA adapters on the frozen backbone and publish one bundle per domain"),
    "add-domain": ("mdlora.jobs.add_domain", "train one new domain's adapter against the production backbone; touches nothing else"),
    "score": ("mdlora.jobs.score", "score a mixed-domain dataset, each row routed to its domain's production adapter"),
    "retrain": ("mdlora.jobs.retrain", "scheduled retrain of a window: warm-started backbone, rebased adapters, per-domain promotion gate"),
    "bundles": ("mdlora.jobs.bundles", "list, show, verify, promote or roll back registry versions (adapters, backbones)"),
    "submit": ("mdlora.jobs.submit", "submit any mdlora job to a Ray cluster (Ray Jobs API, token auth); --wait streams its logs"),
    "config": ("mdlora.jobs.config", "show the defaults of a config kind (pretrain, adapt, retrain) with every field documented"),
}


def add_config_options(p: argparse.ArgumentParser, what: str) -> None:
    """The options every config-driven job shares: ``--config``, ``--set`` (repeatable), ``--json``."""
    p.add_argument("--config", required=True, help=f"{what} config YAML (trainer/config.py documents every key)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set loop.epochs=3 (repeatable)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


# OS errors about the user's output location (disk full, quota, file size limit, read-only or
# forbidden path, a file where a directory is expected): one line, like other user errors.
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                errno.ENOTDIR, errno.EISDIR}


class UserError(Exception):
    """An error caused by the user's input; printed as one line, exit code 2."""


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only the ``selected`` subcommand's module is imported for options."""
    parser = argparse.ArgumentParser(
        prog="mdlora",
        description="Multi-domain CTR training with per-domain LoRA adapters on TorchRec + Ray.",
    )
    parser.add_argument("--version", action="version", version=f"mdlora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == selected:
            importlib.import_module(module).configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mdlora`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (UserError, ConfigError, FileNotFoundError, FileExistsError, PermissionError) as e:
        print(f"mdlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # validation errors from schema/readers name the bad value
        print(f"mdlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _USER_ERRNOS:
            raise
        print(f"mdlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not _unreachable_storage(e):
            raise
        # the object store is down or unreachable (after the client's retries): a clear line
        # naming the endpoint, exit 1 (not the user's input; running again later may succeed)
        print(f"mdlora {args.command}: error: storage unreachable: {e}", file=sys.stderr)
        return 1


def _unreachable_storage(e: Exception) -> bool:
    """True for botocore's connection errors (endpoint down, timeouts), raised through s3fs."""
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:  # no S3 support installed: nothing of it can have failed
        return False
    return isinstance(e, BotoConnectionError | HTTPClientError)


if __name__ == "__main__":
    sys.exit(main())
