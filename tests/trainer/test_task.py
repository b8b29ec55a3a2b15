"""CTRTask: loss/outputs contract and a tiny fixed-seed training run that learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mdlora.embeddings.batch import Batch
from mdlora.embeddings.schema import Schema
from mdlora.trainer.backbone import build_backbone
from mdlora.trainer.config import ModelConfig
from mdlora.trainer.task import CTRTask
from tests.trainer.test_backbone import build, make_batch


@pytest.fixture
def schema(tiny_schema_dict) -> Schema:
    return Schema.from_dict(tiny_schema_dict)


def test_forward_returns_mean_bce_and_detached_outputs(schema):
    task = CTRTask(build(schema, ModelConfig(tower="dcnv2", hidden=[8])))
    batch = make_batch(schema, 16, torch.Generator().manual_seed(0))
    loss, (loss_d, logits, labels) = task(batch)
    expected = task.backbone(batch.sparse, batch.dense)
    assert loss.requires_grad and loss.shape == ()
    assert not loss_d.requires_grad and not logits.requires_grad
    assert torch.equal(logits, expected.detach()) and labels is batch.labels
    manual = -(labels * F.logsigmoid(logits) + (1 - labels) * F.logsigmoid(-logits)).mean()
    torch.testing.assert_close(loss, manual)
    assert loss_d.item() == loss.item()


def test_predict_is_sigmoid_without_autograd(schema):
    task = CTRTask(build(schema, ModelConfig(tower="deepfm", hidden=[8])))
    batch = make_batch(schema, 16, torch.Generator().manual_seed(1))
    probs = task.predict(batch)
    _, (_, logits, _) = task(batch)
    assert not probs.requires_grad
    assert torch.equal(probs, torch.sigmoid(logits))


def _separable(rows: int, gen: torch.Generator, item_label: torch.Tensor) -> Batch:
    """Clicks decided by the item id alone (a random label per item); user id, dense: noise."""
    users = torch.randint(0, 30, (rows,), generator=gen)
    items = torch.randint(0, item_label.numel(), (rows,), generator=gen)
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id", "item_id"],
        values=torch.cat([users, items]),
        lengths=torch.ones(2 * rows, dtype=torch.long),
    )
    return Batch(
        sparse=sparse,
        dense=torch.randn(rows, 1, generator=gen),
        labels=item_label[items].float(),
        domains=torch.zeros(rows, dtype=torch.long),
        aux=torch.zeros(rows, 0, dtype=torch.long),
    )


def test_mlp_learns_a_separable_task():
    schema = Schema.from_dict(
        {
            "name": "separable",
            "label": "click",
            "domain": {"column": "domain", "values": ["a"]},
            "tables": [
                {"name": "user", "num_embeddings": 30, "dim": 8},
                {"name": "item", "num_embeddings": 40, "dim": 8},
            ],
            "sparse": [{"name": "user_id", "table": "user"}, {"name": "item_id", "table": "item"}],
            "dense": [{"name": "x"}],
        }
    )
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=schema.embedding_bag_configs(), device=torch.device("cpu"))
    task = CTRTask(build_backbone(schema, ModelConfig(tower="mlp", hidden=[16, 8]), ebc))
    opt = torch.optim.Adam(task.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    item_label = torch.randint(0, 2, (40,), generator=gen)
    losses = []
    for _ in range(200):
        loss, (loss_d, _, _) = task(_separable(64, gen, item_label))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss_d.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert first > 0.6 and last < 0.1, (first, last)
    held_out = _separable(512, gen, item_label)
    accuracy = ((task.predict(held_out) > 0.5).float() == held_out.labels).float().mean()
    assert accuracy > 0.98
