"""Run a function in N real gloo processes on 127.0.0.1 (TorchRec's multi-process test pattern).

``run_gloo(fn, 2, *args)`` spawns 2 processes, each calls ``init_process_group("gloo")`` on a free
port, runs ``fn(rank, world_size, *args)`` with one torch thread, and returns the per-rank return
values (anything ``torch.save`` can write). A failure in any rank re-raises here with that rank's
traceback; a hang (e.g. unequal collectives) is killed after ``timeout`` seconds.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port


def _worker(rank: int, fn: Callable, world_size: int, port: int, out: str, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out) / f"rank{rank}.pt")
    sys.stdout.flush()
    sys.stderr.flush()
    # no interpreter finalisation: a gloo worker thread still freeing a collective's tensors
    # while Python shuts down aborts the process (see benchmarks/peers.py)
    os._exit(0)


def run_gloo(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; return per-rank results.

    Args:
        fn: a module-level (picklable) function.
        world_size: number of processes.
        *args: picklable extra arguments.
        timeout: seconds before the processes are killed and ``TimeoutError`` is raised.

    Returns:
        ``[result of rank 0, result of rank 1, ...]``.
    """
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(
            _worker,
            args=(fn, world_size, free_port(), out, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(
                    f"{fn.__name__}: {world_size} gloo processes still running after {timeout}s"
                )
        return [
            torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world_size)
        ]


# ---- a tiny sharded model shared by the sharding/checkpoint tests -----------------------------
TINY_SCHEMA = {
    "name": "tiny4",
    "label": "click",
    "domain": {"column": "domain", "values": ["a", "b"]},
    "tables": [{"name": f"t{i}", "num_embeddings": 30 + i, "dim": 8} for i in range(4)],
    "sparse": [{"name": f"f{i}", "table": f"t{i}"} for i in range(4)]
    + [{"name": "g", "table": "t0"}],
}


class TinyModel(torch.nn.Module):
    """EBC (4 tables, 5 features) -> Linear head: logit [B]. Pooled features are taken by key
    because a sharded EBC returns its KeyedTensor keys grouped by shard, not in schema order."""

    def __init__(self, schema, device: str = "meta"):
        super().__init__()
        from mdlora.embeddings.tables import build_ebc

        self.keys = schema.feature_names
        self.ebc = build_ebc(schema, device)
        self.head = torch.nn.Linear(schema.pooled_dim(), 1, device="cpu")

    def forward(self, kjt):
        pooled = self.ebc(kjt).to_dict()
        return self.head(torch.cat([pooled[k] for k in self.keys], dim=1)).squeeze(-1)


def tiny_batch(seed: int, batch_size: int = 16):
    """A fixed random KJT (keys f0..f3, g; 0-3 ids per row) and 0/1 labels."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(seed)
    keys = [f"f{i}" for i in range(4)] + ["g"]
    lengths = torch.randint(0, 4, (len(keys) * batch_size,), generator=g)
    values = torch.randint(0, 30, (int(lengths.sum()),), generator=g)
    labels = torch.randint(0, 2, (batch_size,), generator=g).float()
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths), labels
