"""Test support: an unsharded, hashed CPU snapshot of a (possibly sharded) model (parity checks).

:func:`gather_state` assembles every table from its shards (``ShardedTensor.gather``) and keeps
dense weights as they are, under normalised keys (no ``module.`` / ``_dmp_wrapped_module.``),
so the result loads with ``load_state_dict`` into the same model built unsharded on cpu — the
single-process scoring path. :func:`state_hash` fingerprints it.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from mdlora.embeddings.checkpoint import normalise_key


def gather_state(model: nn.Module, dst: int = 0) -> dict[str, torch.Tensor] | None:
    """Whole-model CPU state dict on rank ``dst``; collective, every rank must call it.

    Args:
        model: a ``DistributedModelParallel`` (any plan), or a plain module (single process).
        dst: rank that receives the result.

    Returns:
        On ``dst`` (or without a process group): ``{normalised key: detached cpu tensor}`` with
        every embedding table whole ([rows, D]); on other ranks ``None``.
    """
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else dst
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype) if rank == dst else None
            value.gather(dst=dst, out=full)
            value = full
        if rank == dst:
            out[normalise_key(key)] = value.detach().cpu().clone()
    return out if rank == dst else None


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted keys, each with its dtype, shape and raw tensor bytes.

    Args:
        state: a state dict (e.g. from :func:`gather_state`).

    Returns:
        Hex digest; equal for bitwise-equal states regardless of dict order or device.
    """
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
