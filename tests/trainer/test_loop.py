"""The training loop on a tiny in-process model: resume equivalence, early stopping, cadence."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mdlora.embeddings.batch import Batch
from mdlora.trainer.config import LoopConfig
from mdlora.trainer.env import DistEnv
from mdlora.trainer.loop import DataExhaustedError, Hooks, TrainState, evaluate, lr_factor, train


class Toy(torch.nn.Module):
    """logit = w·dense + b, BCE; the same output contract as mdlora.trainer.task.CTRTask."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, batch: Batch):
        logits = self.lin(batch.dense).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)


def make_batch(seed: int, n: int = 32, flip: bool = False) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = ((x[:, 0] > 0) != flip).float()
    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long))
    return Batch(sparse=kjt, dense=x, labels=y, domains=torch.arange(n) % 2, aux=torch.zeros(n, 0, dtype=torch.long))


def run(cfg: LoopConfig, model, opt, state=None, crash_at=None, flip_val=False, steps=5):
    reports, checkpoints = [], {}

    def train_batches(epoch):
        for i in range(steps):
            if crash_at is not None and epoch * steps + i == crash_at:
                raise RuntimeError("worker killed")
            yield make_batch(1000 * epoch + i)

    def save(_dir, st):
        checkpoints[st.step] = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
                                TrainState.from_dict(st.to_dict()))

    hooks = Hooks(train_batches=train_batches,
                  val_batches=lambda: iter([make_batch(7, 256, flip_val)]),
                  report=lambda m, s: (reports.append(m), s and s(None)), steps_per_epoch=steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    try:
        state = train(model, opt, sched, list(model.parameters()), cfg, 0.0, DistEnv(), hooks, ["a", "b"], save, state)
    except RuntimeError:
        state = None
    return state, reports, checkpoints


def fresh():
    torch.manual_seed(0)
    model = Toy()
    return model, torch.optim.Adam(model.parameters(), lr=0.05)


def test_resume_after_crash_matches_undisturbed_run():
    cfg = LoopConfig(epochs=3, checkpoint_every=3, log_every=0)
    model, opt = fresh()
    full_state, _, _ = run(cfg, model, opt)
    assert full_state.step == 15 and full_state.epoch == 3

    model2, opt2 = fresh()
    state, _, ckpts = run(cfg, model2, opt2, crash_at=8)  # dies in epoch 1, after the step-6 checkpoint
    assert state is None and max(ckpts) == 6
    weights, opt_state, saved = ckpts[max(ckpts)]
    assert (saved.epoch, saved.step_in_epoch) == (1, 1)
    model3, opt3 = fresh()
    model3.load_state_dict(weights)
    opt3.load_state_dict(opt_state)
    resumed, _, _ = run(cfg, model3, opt3, state=saved)
    assert resumed.step == 15
    for a, b in zip(model.parameters(), model3.parameters(), strict=True):
        assert torch.equal(a, b)  # steps lost = steps since the checkpoint; result identical


def test_early_stopping_on_wauc():
    # validation labels are the opposite of what training teaches, so WAUC falls after the 1st eval
    model, opt = fresh()
    state, reports, _ = run(LoopConfig(epochs=50, eval_every=2, patience=2, log_every=0), model, opt, flip_val=True)
    evals = [r for r in reports if "wauc" in r]
    assert state.step < 250, "should have stopped early"
    assert state.evals_since_best == 2 and state.best_step == evals[0]["step"]
    assert all(r["wauc"] < evals[0]["wauc"] for r in evals[1:])
    assert 0.0 <= evals[-1]["wauc"] <= 1.0


def test_max_steps_and_final_report():
    model, opt = fresh()
    before = evaluate(model, [make_batch(7, 256)], DistEnv(), ["a", "b"])["wauc"]
    state, reports, ckpts = run(LoopConfig(epochs=5, max_steps=7, log_every=2), model, opt)
    assert state.step == 7 and reports[-1]["step"] == 7 and 7 in ckpts
    assert reports[-1]["wauc"] > max(0.8, before + 0.05)  # the toy task is learnable
    last = reports[-1]  # NE and calibration beside AUC, overall and in the per-domain history
    assert last["ne"] == last["val"]["ne"] < 1.0 and last["calibration"] == last["val"]["calibration"] > 0
    assert all(last["val"]["domains"][d]["ne"] < 1.0 for d in ("a", "b"))


def test_empty_epoch_is_an_error():
    model, opt = fresh()
    with pytest.raises(DataExhaustedError):
        run(LoopConfig(epochs=1), model, opt, steps=0)


def test_lr_factor_is_a_pure_function_of_step():
    assert lr_factor(0, warmup=10, total=100, schedule="constant") == pytest.approx(0.1)
    assert lr_factor(50, warmup=10, total=100, schedule="constant") == 1.0
    assert lr_factor(10, warmup=10, total=110, schedule="cosine") == pytest.approx(1.0)
    assert lr_factor(110, warmup=10, total=110, schedule="cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(60, warmup=10, total=110, schedule="cosine") == pytest.approx(0.5)
    assert not math.isnan(lr_factor(5, warmup=0, total=0, schedule="cosine"))
