"""Sharded DCP checkpoints: exact resume under a new plan, world 2 -> world 1 -> unsharded."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    table_wise,
)
from torchrec.distributed.types import ShardingPlan

import mdlora.embeddings.checkpoint as ckpt
from mdlora.embeddings import sharding
from mdlora.embeddings.schema import Schema
from tests.embeddings.dist_utils import TINY_SCHEMA, TinyModel, run_gloo, tiny_batch
from tests.embeddings.snapshot import gather_state, state_hash

LR = 0.1
EVAL_SEED = 4242


def _manual_plan(model: TinyModel, placement: dict[str, int], cw_ranks: list[int]) -> ShardingPlan:
    """t0/t1/t3 table-wise on the given ranks, t2 column-wise over ``cw_ranks`` (fused kernels)."""
    per_param = {t: table_wise(rank=r, compute_kernel="fused") for t, r in placement.items()}
    per_param["t2"] = column_wise(ranks=cw_ranks, compute_kernel="fused")
    mp = construct_module_sharding_plan(
        model.ebc, per_param, world_size=2, local_size=2, device_type="cpu"
    )
    return ShardingPlan({"ebc": mp})


def _build(plan_fn) -> tuple:
    schema = Schema.from_dict(TINY_SCHEMA)
    torch.manual_seed(0)
    model = TinyModel(schema)
    dmp = sharding.shard_model(
        model,
        plan=plan_fn(model),
        device=torch.device("cpu"),
        sparse_optimizer="rowwise_adagrad",
        sparse_lr=LR,
    )
    return dmp, torch.optim.Adam(sharding.dense_params(dmp), lr=1e-2)


def _step(dmp, opt, step: int, rank: int) -> None:
    batch, labels = tiny_batch(seed=1000 * step + rank)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(dmp(batch), labels)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _train_save_resume(rank: int, world: int, root: str) -> dict:
    dmp, opt = _build(lambda m: _manual_plan(m, {"t0": 0, "t1": 1, "t3": 0}, [0, 1]))
    out: dict = {}
    for step in range(1, 7):
        _step(dmp, opt, step, rank)
    ckpt.write_shards(f"{root}/step-6", dmp, opt)
    with torch.no_grad():
        out["pred6"] = dmp(tiny_batch(EVAL_SEED)[0])
    _step(dmp, opt, 7, rank)
    out["continued"] = gather_state(dmp)

    # resume step 6 under another placement (same column split) and redo step 7
    dmp2, opt2 = _build(lambda m: _manual_plan(m, {"t0": 1, "t1": 0, "t3": 1}, [1, 0]))
    ckpt.read_shards(f"{root}/step-6", dmp2, opt2)
    _step(dmp2, opt2, 7, rank)
    out["resumed"] = gather_state(dmp2)
    return out


def _load_world1(rank: int, world: int, root: str) -> dict:
    dmp, opt = _build(lambda m: sharding.plan_for(m, 1, "cpu", pg=dist.group.WORLD))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt.read_shards(f"{root}/step-6", dmp, opt)
    momentum = {
        k.split(".")[-2]: st.local_shards()[0].tensor.clone()
        for k, v in sharding.fused_optimizer(dmp).state_dict()["state"].items()
        for st in v.values()
    }
    with torch.no_grad():
        pred = dmp(tiny_batch(EVAL_SEED)[0])
    return {
        "pred": pred,
        "momentum": momentum,
        "warnings": [str(w.message) for w in caught],
    }


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    """Checkpoints written by 2 gloo ranks (one spawn shared by the tests below)."""
    root = tmp_path_factory.mktemp("ckpt") / "run"
    r0, r1 = run_gloo(_train_save_resume, 2, str(root))
    return root, r0, r1


@pytest.mark.integration
def test_exact_resume_with_new_plan(world2):
    _, r0, _ = world2
    # resume under another placement gives bitwise the same step 7 (weights, momentum, Adam)
    assert state_hash(r0["resumed"]) == state_hash(r0["continued"])


@pytest.mark.integration
def test_world2_checkpoint_loads_at_world1_and_unsharded(world2):
    root, r0, _ = world2
    (w1,) = run_gloo(_load_world1, 1, str(root))
    path = root / "step-6"

    # single-rank DMP: same predictions, table-wise momentum restored, t2's split changed
    assert (w1["pred"] - r0["pred6"]).abs().max().item() < 1e-6
    saved = {t: torch.zeros(30 + int(t[1])) for t in ("t0", "t1", "t3")}
    dcp.load(
        {
            "sparse_optim": {
                f"ebc.embedding_bags.{t}.weight": {f"{t}.momentum1": v} for t, v in saved.items()
            }
        },
        checkpoint_id=path,
        no_dist=True,
    )
    for t, v in saved.items():
        assert v.abs().sum() > 0 and torch.equal(w1["momentum"][t], v), t
    assert any("t2" in w and "not restored" in w for w in w1["warnings"])

    # plain unsharded module in this process (no process group): weights only
    plain = TinyModel(Schema.from_dict(TINY_SCHEMA), device="cpu")
    ckpt.read_shards(path, plain)
    with torch.no_grad():
        assert (plain(tiny_batch(EVAL_SEED)[0]) - r0["pred6"]).abs().max().item() < 1e-6


def test_key_normalisation():
    assert ckpt.normalise_key("module._dmp_wrapped_module.module.head.weight") == "head.weight"
    assert ckpt.normalise_key("ebc.module.x") == "ebc.module.x"
