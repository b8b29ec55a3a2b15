"""Sharded checkpoints of a DMP-wrapped model with ``torch.distributed.checkpoint`` (DCP).

Layout under ``root`` (a local directory; ``infra/storage.py`` moves it to S3)::

    root/step-<N>/        one committed checkpoint
        .metadata, __<rank>_<i>.distcp   DCP: model weights (every table shard) + fused
                                         sparse-optimiser state (e.g. rowwise-adagrad momentum)
        dense_optim.pt    dense optimiser state (replicated, written by rank 0)
        meta.json         {"step", "extra", "world_size", "plan"}; written last
    root/latest           name of the newest committed step dir (one line)

Commit protocol (:func:`save_checkpoint`; ``root`` must be one directory every rank sees: one
host or a shared file system): every rank writes its shards into ``root/.step-<N>.tmp/``
(:func:`write_shards`); when DCP's save returns, its metadata is complete, and rank 0 writes
``meta.json``, renames the dir to ``step-<N>`` and rewrites ``latest`` atomically. A crash
before the rename leaves only a hidden ``.tmp`` dir (removed by the next save) and ``latest``
on the previous step. Where something else commits (Ray Train's ``report`` uploads per-rank
dirs), use :func:`write_shards` / :func:`read_shards` directly.

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
import json
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import metadata as dcp_metadata

from mdlora.embeddings.sharding import module_tables, plan_to_dict
from mdlora.atomic import write_bytes, write_json

_STEP = re.compile(r"^step-(\d+)$")
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


def _steps(root: Path) -> list[int]:
    return sorted(
        int(m.group(1)) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()
    )


def _publish(tmp: Path, final: Path, root: Path) -> None:
    """Commit ``tmp`` as ``final`` and point ``latest`` at it (rank 0)."""
    tmp.rename(final)
    write_bytes(root / "latest", f"{final.name}\n".encode())


def write_shards(
    directory: str | Path, model: nn.Module, dense_optimizer: torch.optim.Optimizer | None
) -> None:
    """Write this rank's DCP shards (+ ``dense_optim.pt`` on rank 0) into ``directory``; collective.

    The building block of :func:`save_checkpoint`, also usable when something else commits the
    directory (e.g. Ray Train's ``report``: ranks may even write to different local dirs, the
    file names never collide).

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


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    dense_optimizer: torch.optim.Optimizer | None,
    extra: dict,
    *,
    rank: int,
    keep: int = 3,
) -> Path:
    """Write checkpoint ``root/step-<step>`` collectively; every rank must call it.

    Args:
        root: local checkpoint directory of the run.
        step: global step; names the directory.
        model: the ``DistributedModelParallel`` (or a plain module in a single process).
        dense_optimizer: optimiser over ``sharding.dense_params(model)`` (replicated); or None.
        extra: JSON-able run state to restore (epoch, data position, metrics...).
        rank: this process's rank (rank 0 commits).
        keep: committed checkpoints to keep (older ``step-*`` dirs are deleted after commit).

    Returns:
        Path of the committed checkpoint directory.

    Raises:
        FileExistsError: ``step-<step>`` already exists.
        RuntimeError: on ranks other than 0 when rank 0 failed to commit.
    """
    root = Path(root)
    final, tmp = root / f"step-{step}", root / f".step-{step}.tmp"
    if final.exists():  # checked on every rank (shared dir), so no rank waits for a failed one
        raise FileExistsError(f"{final}: checkpoint already exists")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step-*.tmp"):  # left by a crashed save
            shutil.rmtree(stale)
    if _distributed():
        dist.barrier()
    write_shards(tmp, model, dense_optimizer)
    error = None
    if rank == 0:
        try:
            world = dist.get_world_size() if _distributed() else 1
            plan = (
                plan_to_dict(model.plan, module_tables(model), world_size=world)
                if hasattr(model, "plan")
                else None
            )
            write_json(
                tmp / "meta.json", {"step": step, "extra": extra, "world_size": world, "plan": plan}
            )
            _publish(tmp, final, root)
            for old in _steps(root)[:-keep] if keep > 0 else []:
                shutil.rmtree(root / f"step-{old}")
        except Exception as e:  # tell the other ranks, then re-raise here
            error = e
    if _distributed():
        flag = [repr(error) if error else None]
        dist.broadcast_object_list(flag, src=0)
        if flag[0] is not None and rank != 0:
            raise RuntimeError(f"checkpoint {final} not committed: rank 0 failed with {flag[0]}")
    if error is not None:
        raise error
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The committed checkpoint ``root/latest`` points at, or None when there is none."""
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if (path / "meta.json").is_file() else None


def read_meta(path: str | Path) -> dict:
    """``meta.json`` of a committed checkpoint (step, extra, world_size, plan)."""
    return json.loads((Path(path) / "meta.json").read_text())


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


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    dense_optimizer: torch.optim.Optimizer | None = None,
) -> dict:
    """Load a committed checkpoint (see :func:`read_shards` for what is restored and when).

    Args:
        path: a committed checkpoint dir (``latest_checkpoint(root)``).
        model: module to fill in place (DMP at any world size, or a plain module).
        dense_optimizer: optimiser over ``sharding.dense_params(model)``; None skips it.

    Returns:
        The ``extra`` dict given to :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: ``path`` is not a committed checkpoint.
    """
    extra = read_meta(path)["extra"]
    read_shards(path, model, dense_optimizer)
    return extra
