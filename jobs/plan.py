"""``mdlora plan``: the embedding sharding plan and per-rank memory for a topology you need not have.

mdlora plan [--config run.yaml] --world-size 8 --device cuda --hbm-gb 80 [--json]

Tables too big for HBM plan as UVM-cached (host memory behind an HBM cache) with
``--set dist.uvm=true`` (and ``dist.host_gb``, ``dist.uvm_cache_ratio``); the output gives each
table's kernel and cache ratio and each rank's HBM and host bytes.

Without ``--config`` (or ``--set data.schema=FILE``) it plans ``configs/schema.yaml``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mdlora.embeddings import sharding
from mdlora.embeddings.schema import Schema
from mdlora.embeddings.tables import build_ebc
from mdlora.trainer.config import load_run_config
from mdlora.trainer.recipes import plan_tables

DEFAULT_SCHEMA = Path(__file__).resolve().parents[1] / "configs" / "schema.yaml"
"""The schema planned without ``data.schema``: README's example schema, in a checkout's configs/."""


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``mdlora plan``."""
    parser.add_argument(
        "--config",
        help="run config YAML (data.schema names the schema; default configs/schema.yaml)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    parser.add_argument(
        "--world-size", type=int, help="ranks to plan for (default: dist.world_size)"
    )
    parser.add_argument(
        "--device", choices=list(sharding.DEVICE_TYPES), help="default: dist.device"
    )
    parser.add_argument("--hbm-gb", type=float, help="memory per rank in GB (default: dist.hbm_gb)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def find_schema(schema: str, config: str | None) -> Path:
    """The schema file to plan: ``data.schema``, else the repository's :data:`DEFAULT_SCHEMA`.

    A relative ``data.schema`` is read from the working directory, as ``mdlora pretrain`` reads
    it, or else from the config file's directory.

    Raises:
        ValueError: no ``data.schema`` and no ``configs/schema.yaml`` (an installed package).
    """
    if not schema:
        if not DEFAULT_SCHEMA.is_file():
            raise ValueError(
                "data.schema: no schema to plan; pass --config FILE (its data.schema) "
                "or --set data.schema=FILE"
            )
        print(
            f"mdlora plan: data.schema not given, planning {DEFAULT_SCHEMA} (README's example)",
            file=sys.stderr,
        )
        return DEFAULT_SCHEMA
    path = Path(schema)
    if config and not path.is_absolute() and not path.exists():
        path = Path(config).parent / path
    return path


def run(args: argparse.Namespace) -> int:
    """Plan the schema's tables for the topology and print the plan; ValueError when they do not fit."""
    cfg = load_run_config(args.config, args.set)
    schema = Schema.load(find_schema(cfg.data.schema, args.config))
    world = args.world_size or cfg.dist.world_size
    device = args.device or cfg.dist.device
    if world < 1:
        raise ValueError(f"--world-size: must be >= 1, got {world}")
    ebc = build_ebc(schema)  # meta: nothing is allocated
    sharding.apply_sparse_optimizer(ebc, cfg.optim.sparse_optimizer, cfg.optim.sparse_lr, device)
    plan = plan_tables(ebc, cfg.dist, cfg.data.batch_size, world_size=world, device=device, hbm_gb=args.hbm_gb)
    d = sharding.plan_to_dict(
        plan, schema.tables, cfg.optim.sparse_optimizer, world_size=world, device_type=device
    )
    print(json.dumps(d, indent=2) if args.json else sharding.format_plan(d))
    return 0
