"""Where this process sits in the job: filled by infra (Ray context) or torchrun variables."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    """Rank and device of one training process.

    Attributes:
        rank: global rank.
        world_size: number of ranks.
        local_rank: rank on this node (GPU index on cuda).
        device: torch device of this rank.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes shared files and prints progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a torch.distributed process group is initialised."""
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    @staticmethod
    def from_torchrun(device: str = "cpu") -> DistEnv:
        """Read RANK / WORLD_SIZE / LOCAL_RANK (torchrun); defaults make a single process."""
        rank = int(os.environ.get("RANK", 0))
        local = int(os.environ.get("LOCAL_RANK", 0))
        dev = torch.device(f"cuda:{local}") if device == "cuda" else torch.device("cpu")
        return DistEnv(rank=rank, world_size=int(os.environ.get("WORLD_SIZE", 1)), local_rank=local, device=dev)
