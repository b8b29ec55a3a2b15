"""Backbone math: one test class per tower (fixed seeds, CPU, unsharded torchrec EBC)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from mdlora.embeddings.batch import Batch
from mdlora.embeddings.schema import Schema
from mdlora.trainer.backbone import Backbone, build_backbone, pooled_feature_dims
from mdlora.trainer.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]


def make_batch(schema: Schema, rows: int, gen: torch.Generator) -> Batch:
    """Random batch for ``schema``: multi-valued features get 0..max_len ids per row."""
    values, lengths = [], []
    for f in schema.sparse:
        n = schema.table(f.table).num_embeddings
        ln = (
            torch.randint(0, (f.max_len or 3) + 1, (rows,), generator=gen)
            if f.multi
            else torch.ones(rows, dtype=torch.long)
        )
        lengths.append(ln)
        values.append(torch.randint(0, n, (int(ln.sum()),), generator=gen))
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=schema.feature_names, values=torch.cat(values), lengths=torch.cat(lengths)
    )
    return Batch(
        sparse=sparse,
        dense=torch.randn(rows, len(schema.dense), generator=gen),
        labels=torch.randint(0, 2, (rows,), generator=gen).float(),
        domains=torch.randint(0, len(schema.domain.values), (rows,), generator=gen),
        aux=torch.zeros(rows, len(schema.aux), dtype=torch.long),
    )


def build(schema: Schema, cfg: ModelConfig, seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    ebc = EmbeddingBagCollection(tables=schema.embedding_bag_configs(), device=torch.device("cpu"))
    return build_backbone(schema, cfg, ebc)


@pytest.fixture
def schema(tiny_schema_dict) -> Schema:
    return Schema.from_dict(tiny_schema_dict)


class _TowerChecks:
    """Checks every tower must pass; subclasses set ``cfg`` and ``linears``."""

    cfg: ModelConfig
    linears: list[str]

    def test_shape_and_seed_determinism(self, schema):
        batch = make_batch(schema, 16, torch.Generator().manual_seed(1))
        a = build(schema, self.cfg)(batch.sparse, batch.dense)
        b = build(schema, self.cfg)(batch.sparse, batch.dense)
        c = build(schema, self.cfg, seed=1)(batch.sparse, batch.dense)
        assert a.shape == (16,) and a.dtype == torch.float32
        assert torch.equal(a, b)
        assert not torch.equal(a, c)

    def test_forward_is_head_of_embed(self, schema):
        model = build(schema, self.cfg).eval()
        batch = make_batch(schema, 16, torch.Generator().manual_seed(2))
        x = model.embed(batch.sparse, batch.dense)
        assert x.shape == (16, schema.pooled_dim() + len(schema.dense)) == (16, model.input_dim)
        assert torch.equal(x[:, -2:], batch.dense)
        assert torch.equal(model(batch.sparse, batch.dense), model.head(x))

    def test_gradients_reach_every_parameter(self, schema):
        model = build(schema, self.cfg)
        batch = make_batch(schema, 32, torch.Generator().manual_seed(3))
        torch.nn.functional.binary_cross_entropy_with_logits(
            model(batch.sparse, batch.dense), batch.labels
        ).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name

    def test_tower_linear_names(self, schema):
        model = build(schema, self.cfg)
        assert model.tower_linear_names() == self.linears
        for name in self.linears:
            assert isinstance(model.get_submodule(name), torch.nn.Linear)


class TestMLP(_TowerChecks):
    cfg = ModelConfig(tower="mlp", hidden=[8, 4])
    linears = ["tower.mlp.0", "tower.mlp.1"]

    def test_out_is_linear_on_last_hidden(self, schema):
        model = build(schema, self.cfg)
        assert isinstance(model.out, torch.nn.Linear) and model.out.in_features == 4

    def test_dropout_only_in_training(self, schema):
        model = build(schema, ModelConfig(tower="mlp", hidden=[8, 4], dropout=0.5))
        batch = make_batch(schema, 16, torch.Generator().manual_seed(4))
        model.eval()
        assert torch.equal(model(batch.sparse, batch.dense), model(batch.sparse, batch.dense))
        model.train()
        assert not torch.equal(model(batch.sparse, batch.dense), model(batch.sparse, batch.dense))


class TestDCNv2(_TowerChecks):
    cfg = ModelConfig(tower="dcnv2", hidden=[8], cross_layers=2)
    linears = ["tower.cross.0", "tower.cross.1", "tower.mlp.0"]

    def test_cross_layer_math(self, schema):
        model = build(schema, ModelConfig(tower="dcnv2", hidden=[8], cross_layers=1))
        x = torch.randn(5, model.input_dim, generator=torch.Generator().manual_seed(5))
        w = model.tower.cross[0]
        z = model.tower(x)
        assert z.shape == (5, model.input_dim + 8)
        torch.testing.assert_close(z[:, : model.input_dim], x * (x @ w.weight.T + w.bias) + x)


class TestDCNv2LowRank(_TowerChecks):
    cfg = ModelConfig(tower="dcnv2", hidden=[8], cross_layers=2, cross_rank=3)
    linears = [
        "tower.cross.0.down",
        "tower.cross.0.up",
        "tower.cross.1.down",
        "tower.cross.1.up",
        "tower.mlp.0",
    ]

    def test_low_rank_shapes(self, schema):
        model = build(schema, self.cfg)
        assert model.tower.cross[0].down.weight.shape == (3, model.input_dim)
        assert model.tower.cross[0].up.weight.shape == (model.input_dim, 3)


class TestDeepFM(_TowerChecks):
    cfg = ModelConfig(tower="deepfm", hidden=[8])
    linears = ["tower.mlp.0", "tower.first_order"]

    def test_fm_term_is_sum_of_pairwise_dot_products(self, schema):
        model = build(schema, self.cfg)
        x = torch.randn(5, model.input_dim, generator=torch.Generator().manual_seed(6))
        v = x[:, :16].reshape(5, 4, 4)  # F=4 features of D=4; 2 dense columns after
        pairs = sum((v[:, i] * v[:, j]).sum(1) for i in range(4) for j in range(i + 1, 4))
        z = model.tower(x)
        torch.testing.assert_close(z[:, -1], pairs)
        torch.testing.assert_close(z[:, -2], model.tower.first_order(x)[:, 0])
        logit = model.out.linear(z[:, :8])[:, 0] + z[:, -2] + z[:, -1]
        torch.testing.assert_close(model.head(x), logit)

    def test_unequal_dims_rejected(self, tiny_schema_dict):
        tiny_schema_dict["tables"][1]["dim"] = 8
        with pytest.raises(ValueError, match=r"deepfm.*\[4, 8, 8, 4\]"):
            build(Schema.from_dict(tiny_schema_dict), self.cfg)


class TestWideDeep(_TowerChecks):
    cfg = ModelConfig(tower="widedeep", hidden=[8])
    linears = ["tower.mlp.0", "tower.wide"]

    def test_logit_is_wide_plus_deep(self, schema):
        model = build(schema, self.cfg)
        x = torch.randn(5, model.input_dim, generator=torch.Generator().manual_seed(7))
        deep = model.out.linear(model.tower.mlp(x))[:, 0]
        torch.testing.assert_close(model.head(x), deep + model.tower.wide(x)[:, 0])


def test_pooled_feature_dims_follow_ebc_key_order(tiny_schema_dict):
    # Features listed against table order: the EBC outputs table by table.
    tiny_schema_dict["tables"] = [
        {"name": "cat", "num_embeddings": 16, "dim": 3},
        {"name": "user", "num_embeddings": 100, "dim": 5},
        {"name": "item", "num_embeddings": 50, "dim": 2},
    ]
    schema = Schema.from_dict(tiny_schema_dict)
    keys, dims = pooled_feature_dims(schema)
    assert (keys, dims) == (["city", "user_id", "item_id", "hist"], [3, 5, 2, 2])
    ebc = EmbeddingBagCollection(tables=schema.embedding_bag_configs())
    kt = ebc(make_batch(schema, 4, torch.Generator().manual_seed(0)).sparse)
    assert (kt.keys(), kt.length_per_key()) == (keys, dims)
    model = build(schema, ModelConfig(tower="mlp", hidden=[4]))
    assert model.input_dim == 12 + 2


class _ShardOrder(torch.nn.Module):
    """The EBC's pooled embeddings with keys in another order, as a table-wise sharded EBC
    outputs them (grouped by rank; seen with DMP at world size 2)."""

    def __init__(self, ebc: EmbeddingBagCollection, order: list[str]) -> None:
        super().__init__()
        self.ebc, self.order = ebc, order

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        pooled = self.ebc(features).to_dict()
        return KeyedTensor.from_tensor_list(self.order, [pooled[k] for k in self.order])


def test_embed_layout_does_not_depend_on_output_key_order(schema):
    canonical = build(schema, ModelConfig(tower="mlp", hidden=[4]))
    keys, dims = pooled_feature_dims(schema)
    shuffled = Backbone(
        _ShardOrder(canonical.embeddings, ["city", "item_id", "user_id", "hist"]),
        feature_keys=keys,
        embedding_dims=dims,
        num_dense=2,
        config=ModelConfig(tower="mlp", hidden=[4]),
    )
    shuffled.tower.load_state_dict(canonical.tower.state_dict())
    shuffled.out.load_state_dict(canonical.out.state_dict())
    batch = make_batch(schema, 8, torch.Generator().manual_seed(0))
    x = shuffled.embed(batch.sparse, batch.dense)
    assert torch.equal(x, canonical.embed(batch.sparse, batch.dense))
    shuffled(batch.sparse, batch.dense).sum().backward()  # the permutation passes gradients
    assert all(p.grad.abs().sum() > 0 for p in canonical.embeddings.parameters())


def test_mismatched_dims_and_dense_width_are_rejected(schema):
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=schema.embedding_bag_configs())
    batch = make_batch(schema, 4, torch.Generator().manual_seed(0))
    keys = ["user_id", "item_id", "hist", "city"]
    wrong = Backbone(
        ebc, feature_keys=keys, embedding_dims=[4, 4, 8, 4], num_dense=2, config=ModelConfig()
    )
    with pytest.raises(
        ValueError,
        match=r"pooled dims \{'user_id': 4, 'item_id': 4, 'hist': 4, 'city': 4\} != expected",
    ):
        wrong(batch.sparse, batch.dense)
    with pytest.raises(ValueError, match="need one dim per key"):
        Backbone(ebc, feature_keys=keys, embedding_dims=[4, 4], num_dense=2, config=ModelConfig())
    with pytest.raises(ValueError, match=r"dense: expected \[B, 2\], got \[4, 3\]"):
        build(schema, ModelConfig())(batch.sparse, torch.zeros(4, 3))


@pytest.mark.parametrize("path", ["trainer/backbone.py", "trainer/task.py"])
def test_model_math_imports_no_distribution(path):
    tree = ast.parse((ROOT / path).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    names += [
        f"{n.module}.{a.name}"
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom)
        for a in n.names
    ]
    banned = [m for m in names if m.startswith(("torch.distributed", "ray")) or m == "ray"]
    assert names and not banned, banned
