"""Sharded checkpoints of a DMP-wrapped model with ``torch.distributed.checkpoint`` (DCP).

A checkpoint directory, written by every rank with :func:`write_shards` and committed by
whoever owns the run (Ray Train's ``report`` commits the ranks' files as one checkpoint;
:mod:`mdlora.trainer.recipes` adds the train state and plan)::

    .metadata, __<rank>_<i>.distcp   DCP: model weights (every table shard) + fused
                                     sparse-optimiser state (e.g. rowwise-adagrad momentum)
    dense_optim.pt                   dense optimiser state (replicated, written by rank 0)

Loading never runs arbitrary pickles: DCP keeps its ``.metadata`` as a pickle, which
:class:`SafeReader` reads with an unpickler that builds only DCP's metadata classes, torch sizes,
dtypes and layouts (anything else is refused, naming the file and the global), and tensors and
the dense optimiser state load with ``weights_only=True``. A backbone fetched from a shared
registry may have been written by someone else.

Resharding: DCP stores each tensor by global offsets, so a checkpoint saved with one world size
or plan loads into another (or into a plain unsharded module in one process). State-dict keys
are normalised on both sides (``module.`` / ``_dmp_wrapped_module.`` prefixes of DDP/DMP wrappers
are dropped) so that wrapped and unwrapped models agree.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import metadata as dcp_metadata

_WRAPPERS = ("module.", "_dmp_wrapped_module.")
_DENSE = "dense_optim.pt"


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only what a DCP ``.metadata`` pickle holds; any other global is refused."""

    _EXACT = {("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
              ("torch", "Size"), ("torch.serialization", "_get_layout"),
              ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._EXACT:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == dcp_metadata.__name__ and isinstance(getattr(dcp_metadata, name, None), type):
            return getattr(dcp_metadata, name)
        raise pickle.UnpicklingError(f"{self.source}: refusing to load {module}.{name}: a DCP checkpoint's "
                                     "metadata holds only DCP metadata classes, torch sizes, dtypes and layouts")


class SafeReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` is read by :class:`_MetadataUnpickler` (tensors
    already load with ``weights_only=True``)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f, str(path)).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def normalise_key(key: str) -> str:
    """``key`` without leading DDP/DMP wrapper prefixes (``module.``, ``_dmp_wrapped_module.``)."""
    while key.startswith(_WRAPPERS):
        key = key.split(".", 1)[1]
    return key


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _state(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, str]]:
    """(model state by normalised key, fused optimiser state dict or None, normalised->original)."""
    sd = model.state_dict()
    names = {normalise_key(k): k for k in sd}
    fused = getattr(model, "fused_optimizer", None)
    return (
        {n: sd[k] for n, k in names.items()},
        (fused.state_dict() if fused is not None else None),
        names,
    )


def _sparse(fused_sd: dict[str, Any]) -> dict[str, Any]:
    """The fused optimiser's per-parameter state with normalised parameter keys (a view)."""
    return {normalise_key(k): v for k, v in fused_sd["state"].items()}


def write_shards(
    directory: str | Path, model: nn.Module, dense_optimizer: torch.optim.Optimizer | None
) -> None:
    """Write this rank's DCP shards (+ ``dense_optim.pt`` on rank 0) into ``directory``; collective.

    Something else commits the directory (Ray Train's ``report``: ranks may even write to
    different local dirs, the file names never collide).

    Args:
        directory: where to write (created).
        model: the DMP, or a plain module in a single process.
        dense_optimizer: optimiser over ``sharding.dense_params(model)``; None skips it.
    """
    state, fused_sd, _ = _state(model)
    payload = {"model": state} | ({"sparse_optim": _sparse(fused_sd)} if fused_sd else {})
    dcp.save(payload, checkpoint_id=directory, no_dist=not _distributed())
    if dense_optimizer is not None and (not _distributed() or dist.get_rank() == 0):
        torch.save(dense_optimizer.state_dict(), Path(directory) / _DENSE)


def read_shards(
    directory: str | Path, model: nn.Module, dense_optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Fill ``model`` (and optimisers) from a directory written by :func:`write_shards`.

    Works at any world size or plan, and for a plain unsharded module in a process without a
    process group (every rank of a DMP calls it; each reads only the slices of its own shards).
    The fused sparse-optimiser state is restored into a DMP for every table whose saved state has
    the target's global shape. That holds across world sizes and table/row-wise placements, but
    rowwise-adagrad keeps one state per row *per column shard* (shape [rows * shards]), so a
    table whose column split changed, or one saved as ``data_parallel`` (its optimiser lives
    outside the fused kernels), restarts its sparse state; a warning names those tables.

    Args:
        directory: the checkpoint directory.
        model: module to fill in place.
        dense_optimizer: optimiser over ``sharding.dense_params(model)`` built in the same
            parameter order as at save time; None skips it.
    """
    path = Path(directory)
    saved = SafeReader(path).read_metadata().state_dict_metadata
    state, fused_sd, names = _state(model)
    payload: dict[str, Any] = {"model": state}
    if fused_sd:
        sparse = _sparse(fused_sd)
        payload["sparse_optim"] = {
            k: v
            for k, v in sparse.items()
            if all(
                getattr(saved.get(f"sparse_optim.{k}.{n}"), "size", None) == t.size()
                for n, t in v.items()
            )
        }
        if len(payload["sparse_optim"]) < len(sparse):
            warnings.warn(
                f"{path}: sparse optimizer state of {sorted(set(sparse) - set(payload['sparse_optim']))} "
                "not restored (not saved, or saved with another column split); it starts fresh",
                stacklevel=2,
            )
    dcp.load(payload, storage_reader=SafeReader(path), no_dist=not _distributed())
    model.load_state_dict({names[k]: v for k, v in state.items()})
    if fused_sd:
        model.fused_optimizer.load_state_dict(fused_sd)
    if dense_optimizer is not None:
        dense_optimizer.load_state_dict(torch.load(path / _DENSE, weights_only=True))
