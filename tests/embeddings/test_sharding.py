"""Two gloo processes shard a tiny EBC model with TorchRec DMP: plan, parity, training, gather."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from mdlora.embeddings import sharding
from mdlora.embeddings.schema import Schema
from tests.embeddings.dist_utils import TINY_SCHEMA, TinyModel, run_gloo, tiny_batch
from tests.embeddings.snapshot import gather_state, state_hash


def _shard_train_gather(rank: int, world: int) -> dict:
    schema = Schema.from_dict(TINY_SCHEMA)
    torch.manual_seed(0)
    ref = TinyModel(schema, device="cpu")  # the same unsharded weights on every rank
    model = TinyModel(schema)  # tables on meta: DMP allocates only this rank's shards
    plan = sharding.plan_for(
        model,
        world,
        "cpu",
        sharding_types=["table_wise"],
        table_sharding={"t3": ["column_wise"]},
        pg=dist.group.WORLD,
    )
    dmp = sharding.shard_model(
        model,
        plan=plan,
        device=torch.device("cpu"),
        sparse_optimizer="rowwise_adagrad",
        sparse_lr=0.1,
    )
    dmp.load_state_dict(ref.state_dict())
    kjt, _ = tiny_batch(seed=99)
    with torch.no_grad():
        parity = (dmp(kjt) - ref(kjt)).abs().max().item()
    loaded_hash = state_hash(gather_state(dmp) or {})

    dense_opt = torch.optim.Adam(sharding.dense_params(dmp), lr=1e-2)
    losses = []
    for step in range(4):
        batch, labels = tiny_batch(seed=1000 * step + rank)  # each rank its own rows
        loss = torch.nn.functional.binary_cross_entropy_with_logits(dmp(batch), labels)
        dense_opt.zero_grad()
        loss.backward()
        dense_opt.step()
        losses.append(loss.item())
    state = gather_state(dmp)
    with torch.no_grad():
        trained = dmp(kjt)
    return {
        "plan": sharding.plan_to_dict(plan, schema.tables, "rowwise_adagrad", world_size=world),
        "parity": parity,
        "loaded_hash": loaded_hash,
        "ref_hash": state_hash(ref.state_dict()),
        "losses": losses,
        "state": state,
        "trained": trained,
        "n_dense": len(list(sharding.dense_params(dmp))),
    }


@pytest.mark.integration
def test_two_rank_dmp_plan_parity_training_and_gather():
    r0, r1 = run_gloo(_shard_train_gather, 2)
    schema = Schema.from_dict(TINY_SCHEMA)

    # the plan spreads the tables over both ranks, t3 column-wise over both
    tables = r0["plan"]["tables"]
    assert r0["plan"] == r1["plan"]
    tw_ranks = {tables[t]["ranks"][0] for t in ("t0", "t1", "t2")}
    assert tw_ranks == {0, 1} and all(
        tables[t]["sharding_type"] == "table_wise" for t in ("t0", "t1", "t2")
    )
    assert tables["t3"]["sharding_type"] == "column_wise"
    assert sum(s["sizes"][1] for s in tables["t3"]["shards"]) == 8
    assert all(b > 0 for b in r0["plan"]["rank_bytes"])

    # same weights -> same predictions; gathered state is bitwise the reference state
    assert r0["parity"] < 1e-5 and r1["parity"] < 1e-5
    assert r0["loaded_hash"] == r0["ref_hash"]
    assert r1["state"] is None  # only rank 0 receives the gathered snapshot

    # training runs; only the head is dense (tables train in the fused kernels)
    assert all(math.isfinite(x) for x in r0["losses"] + r1["losses"])
    assert r0["n_dense"] == 2
    assert state_hash(r0["state"]) != r0["ref_hash"]

    # the gathered snapshot loads into an unsharded model that predicts like the DMP
    fresh = TinyModel(schema, device="cpu")
    fresh.load_state_dict(r0["state"])
    with torch.no_grad():
        pred = fresh(tiny_batch(seed=99)[0])
    assert (pred - r0["trained"]).abs().max().item() < 1e-5
    assert set(r0["state"]) == set(fresh.state_dict())
