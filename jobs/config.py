"""``mdlora config show <kind>``: the defaults of a run config as YAML, each field's docstring a comment.
``mdlora config examples``: the paths of the example configs installed with mdlora (``configs/``).

A config file is a short diff over these defaults (``trainer/config.py``); the printed text
loads back as it is (``retrain`` once ``gate.holdout`` is filled in).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from mdlora.config import defaults_yaml
from mdlora.trainer.config import AdaptConfig, RetrainConfig, RunConfig

KINDS: dict[str, tuple[type, str]] = {
    "pretrain": (RunConfig, "mdlora pretrain --config FILE (and mdlora plan)"),
    "adapt": (AdaptConfig, "mdlora adapt / add-domain / score --config FILE"),
    "retrain": (RetrainConfig, "mdlora retrain --config FILE --window START..END"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the actions of ``mdlora config``."""
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    show = actions.add_parser("show", help="print the defaults of a config kind as commented YAML")
    show.add_argument("kind", choices=list(KINDS), help="which config: " + ", ".join(KINDS))
    actions.add_parser("examples", help="list the example configs installed with mdlora (configs/ of the source)")


def examples() -> list[Path]:
    """The example config files (``mdlora.configs``: the wheel's copy, or ``configs/`` of a checkout)."""
    spec = importlib.util.find_spec("mdlora.configs")
    dirs = [Path(d) for d in (spec.submodule_search_locations or [])] if spec else []
    return sorted(p for d in dirs for p in d.rglob("*.yaml"))


def run(args: argparse.Namespace) -> int:
    """Print the defaults of ``args.kind``, or the example configs' paths."""
    if args.action == "examples":
        print("\n".join(map(str, examples())))
        return 0
    cls, used_by = KINDS[args.kind]
    header = (
        f"{args.kind} config defaults ({cls.__name__}, trainer/config.py), read by {used_by}.\n"
        "A config file sets only what differs; unknown keys are errors. Examples: mdlora config examples."
    )
    print(defaults_yaml(cls, header), end="")
    return 0
