"""CTR task: backbone + binary cross-entropy on the click label.

This is the module torchrec's ``DistributedModelParallel`` wraps: DMP (and the DDP it puts
around the dense part) passes the :class:`~mdlora.embeddings.batch.Batch` through unchanged, so the
caller moves it to the device first (``batch.to(device)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mdlora.embeddings.batch import Batch
from mdlora.trainer.backbone import Backbone


class CTRTask(nn.Module):
    """Mean BCE-with-logits loss of a :class:`~mdlora.trainer.backbone.Backbone` on a batch.

    Args:
        backbone: the model; ``backbone(sparse, dense)`` gives logits [B].

    Example::

        task = CTRTask(build_backbone(schema, ModelConfig(), ebc))
        loss, (loss_d, logits, labels) = task(batch)
        loss.backward()
    """

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(
        self, batch: Batch
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Loss and detached outputs.

        Args:
            batch: B rows; uses ``sparse``, ``dense`` and ``labels`` [B] in {0, 1}.

        Returns:
            ``(loss, (loss.detach(), logits.detach(), labels))``: scalar mean loss, logits [B],
            labels [B].
        """
        logits = self.backbone(batch.sparse, batch.dense)  # [B]
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        """Click probabilities ``sigmoid(logits)`` [B], without autograd."""
        return torch.sigmoid(self.backbone(batch.sparse, batch.dense))
