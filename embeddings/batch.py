"""One training/eval batch as TorchRec consumes it.

Letters: B batch rows, F sparse features, N dense features, A auxiliary divisions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class Batch:
    """Tensors of one batch.

    Attributes:
        sparse: KJT with keys = ``schema.feature_names`` (in that order), int64 values/lengths.
        dense: float32 [B, N] normalised dense features (N may be 0).
        labels: float32 [B] in {0, 1}.
        domains: int64 [B] natural domain ids (index into ``schema.domain.values``).
        aux: int64 [B, A] auxiliary division ids (A may be 0).
    """

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    labels: torch.Tensor
    domains: torch.Tensor
    aux: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Copy every tensor to ``device``."""
        return Batch(
            sparse=self.sparse.to(device=torch.device(device), non_blocking=non_blocking),
            dense=self.dense.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            domains=self.domains.to(device, non_blocking=non_blocking),
            aux=self.aux.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        """Pinned-memory copy (for asynchronous host-to-GPU transfer)."""
        return Batch(
            sparse=self.sparse.pin_memory(),
            dense=self.dense.pin_memory(),
            labels=self.labels.pin_memory(),
            domains=self.domains.pin_memory(),
            aux=self.aux.pin_memory(),
        )
