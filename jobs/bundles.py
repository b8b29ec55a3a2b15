"""``mdlora bundles list|show|verify|promote|rollback``: inspect and move registry aliases.

Examples::

    mdlora bundles list --root s3://models/registry
    mdlora bundles show books v0003
    mdlora bundles verify books            # every version; exit 2 on any checksum problem
    mdlora bundles promote books v0003     # production -> v0003
    mdlora bundles rollback books          # production -> the production before it
"""

from __future__ import annotations

import argparse
import json

from mdlora.infra.artifacts.registry import KINDS, Registry, RegistryError
from mdlora.infra.storage import open_fs


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``bundles`` options."""
    parser.add_argument("action", choices=["list", "show", "verify", "promote", "rollback"])
    parser.add_argument("name", nargs="?", help="domain (adapters) or backbone name")
    parser.add_argument("version", nargs="?", help="vNNNN or alias (default: latest / all)")
    parser.add_argument("--root", default="registry", help="registry root: a path or s3:// URI")
    parser.add_argument("--kind", choices=KINDS, default="adapters")


def run(args: argparse.Namespace) -> int:
    """Run one registry action; returns 2 when ``verify`` finds problems."""
    reg, kind, name = Registry(*open_fs(args.root)), args.kind, args.name
    if args.action != "list" and not name:
        raise ValueError(f"bundles {args.action}: a name is required")
    if args.action == "list":
        for n in [name] if name else reg.names(kind):
            print(
                f"{n}\tversions: {','.join(reg.versions(kind, n))}\taliases: {reg.aliases(kind, n)}"
            )
    elif args.action == "show":
        print(
            json.dumps(reg.manifest(kind, name, args.version or "latest"), indent=2, sort_keys=True)
        )
    elif args.action == "verify":
        failed = False
        versions = [args.version] if args.version else reg.versions(kind, name)
        if not versions:  # a misspelt name must not pass as "nothing wrong"
            raise RegistryError(f"{kind}/{name}: no published versions under {args.root}")
        for version in versions:
            problems = reg.verify(kind, name, version)
            failed |= bool(problems)
            print(
                f"{name} {version}: " + "\n  ".join(["FAILED", *problems] if problems else ["ok"])
            )
        return 2 if failed else 0
    elif args.action == "promote":
        if not args.version:
            raise ValueError("bundles promote: a version is required")
        previous = reg.promote(kind, name, args.version)
        print(f"{kind}/{name} production: {previous} -> {reg.aliases(kind, name)['production']}")
    else:
        print(f"{kind}/{name} production -> {reg.rollback(kind, name)}")
    return 0
