"""The methods of the quality harness, trained in-process on CPU with the jobs' model code.

Full models (Mix, Single, Fine-tune, Shared-Bottom, MMoE, STAR) train with
:func:`mdlora.trainer.loop.train` (the pretrain loop, at world size 1 without a process group) on an
unsharded :func:`mdlora.embeddings.tables.build_ebc`, one Adam over every trainable parameter; the
state with the best validation WAUC is kept (``Hooks.report`` snapshots it). Adapters (MLoRA,
MultiLoRA and its add/avg ablations) train with :mod:`mdlora.trainer.adapt` on features materialised
once per seed from the trained Mix backbone, which is frozen.

Per seed, :class:`SeedRun` trains Mix once and shares it with Fine-tune and the adapters, and
materialises the frozen features once for every adapter method.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from benchmarks.quality_data import Data, Split
from mdlora.adapters.config import LoraConfig
from mdlora.adapters.inject import inject
from mdlora.embeddings.tables import build_ebc
from mdlora.trainer import adapt
from mdlora.trainer.backbone import build_backbone
from mdlora.trainer.baselines import STAR, DomainCTRTask, MMoE, SharedBottom
from mdlora.trainer.config import AdaptTrainConfig, LoopConfig, ModelConfig
from mdlora.trainer.env import DistEnv
from mdlora.trainer.loop import Hooks, train
from mdlora.trainer.metrics import DomainMetrics
from mdlora.trainer.task import CTRTask

FULL = ("single", "mix", "finetune", "shared_bottom", "mmoe", "star")
ADAPTERS = ("mlora", "multilora", "multilora_add", "multilora_avg")
METHODS = FULL + ADAPTERS


@dataclass(frozen=True)
class Hyper:
    """Optimisation settings of one method."""

    lr: float
    batch: int
    epochs: int
    patience: int
    eval_every: int = 0
    """Adapters: also validate every N steps (``AdaptTrainConfig.eval_every``); patience then
    counts these checks."""
    confidence: float = AdaptTrainConfig.confidence
    """MLoRA's gate (``AdaptTrainConfig.confidence``)."""


@dataclass
class Outcome:
    """One method on one seed."""

    probs: Tensor
    """Test click probabilities [N_test], in test-split order."""
    val_wauc: float
    """Validation WAUC of the kept state(s)."""
    trainable: int
    """Parameters this method trains (all domains)."""
    total: int
    """Parameters needed to serve all domains (frozen backbone included)."""
    epochs: list[int] = field(default_factory=list)
    """Best epoch of each trained model (per domain where models are per domain)."""
    seconds: float = 0.0


def count(params) -> int:
    """Number of scalars in an iterable of tensors."""
    return sum(p.numel() for p in params)


def metrics(probs: Tensor, split: Split, domains: list[str]) -> dict:
    """Exact per-domain AUC / LogLoss, total AUC, WAUC (:class:`mdlora.trainer.metrics.DomainMetrics`)."""
    m = DomainMetrics(domains)
    m.update(probs, split.labels(), split.domains)
    return m.compute(gather=False)


@torch.no_grad()
def predict(task: nn.Module, split: Split) -> Tensor:
    """Probabilities [N] of a ``CTRTask``-like module over a split (eval mode, large batches)."""
    task.eval()
    out = [torch.sigmoid(task(b)[1][1]) for b in split.eval_batches()]
    return torch.cat(out) if out else torch.zeros(0)


def fit(task: nn.Module, params: list[nn.Parameter], train_split: Split, val: Split,
        domains: list[str], hp: Hyper, seed: int) -> tuple[float, int]:
    """Train with the pretrain loop and early stopping on validation WAUC; keep the best state.

    Returns:
        ``(best validation WAUC, its epoch)``; ``task`` holds the best state on return.
    """
    opt = torch.optim.Adam(params, lr=hp.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    best = {"wauc": -math.inf, "epoch": 0, "state": copy.deepcopy(task.state_dict())}

    def report(m: dict, _save) -> None:
        if m.get("wauc") is not None and m["wauc"] > best["wauc"]:
            best.update(wauc=m["wauc"], epoch=m["epoch"],
                        state=copy.deepcopy(task.state_dict()))

    steps = train_split.steps(hp.batch)
    hooks = Hooks(train_batches=lambda e: train_split.train_batches(hp.batch, seed, e),
                  val_batches=val.eval_batches, report=report, steps_per_epoch=steps)
    loop = LoopConfig(epochs=hp.epochs, patience=hp.patience, log_every=0, seed=seed)
    train(task, opt, sched, params, loop, 0.0, DistEnv(), hooks, domains, lambda d, s: None)
    task.load_state_dict(best["state"])
    return best["wauc"], best["epoch"]


class SeedRun:
    """All methods on one seed; Mix and the materialised features are built once and shared.

    Args:
        data: the dataset.
        seed: model seed (init and batch order).
        hp: per-method :class:`Hyper` (keys of :data:`METHODS`).
        model: backbone config (embedding dim is the schema's).
        lora_ranks: LoRA rank of each tower Linear (``[8, 8]`` for an MLP [256, 128]).
        log: progress printer.
    """

    def __init__(self, data: Data, seed: int, hp: dict[str, Hyper], model: ModelConfig,
                 lora_ranks: list[int], log=print) -> None:
        self.data, self.seed, self.hp, self.model = data, seed, dict(hp), model
        self.ranks, self.log = lora_ranks, log
        self._mix: tuple[CTRTask, Outcome] | None = None
        self._features: dict[str, adapt.Features] | None = None
        self.cached: dict[str, Outcome] = {}
        """Outcomes already computed (hyper-parameter selection), returned by :meth:`run`."""

    # ---- full models ----------------------------------------------------------------------
    def _backbone(self, salt: int = 0):
        torch.manual_seed(self.seed * 1000 + salt)
        return build_backbone(self.data.schema, self.model, build_ebc(self.data.schema, "cpu"))

    def _fit(self, task, params, train_split, val, hp) -> tuple[float, int]:
        return fit(task, params, train_split, val, self.data.domains, hp, self.seed)

    def mix(self) -> tuple[CTRTask, Outcome]:
        """The Mix backbone: one shared model on every domain (trained once, then cached)."""
        if self._mix is None:
            t0, sp = time.perf_counter(), self.data.splits
            task = CTRTask(self._backbone())
            wauc, ep = self._fit(task, list(task.parameters()), sp["train"], sp["validation"], self.hp["mix"])
            n = count(task.parameters())
            self._mix = task.eval(), Outcome(predict(task, sp["test"]), wauc, n, n, [ep],
                                             time.perf_counter() - t0)
        return self._mix

    def per_domain(self, method: str) -> Outcome:
        """Single (a fresh backbone per domain) or Fine-tune (Mix fully fine-tuned per domain)."""
        sp, hp = self.data.splits, self.hp[method]
        probs, test_dom = torch.zeros(len(sp["test"])), sp["test"].domains
        val_probs, val_dom = torch.zeros(len(sp["validation"])), sp["validation"].domains
        epochs, trainable = [], 0
        for k, name in enumerate(self.data.domains):
            task = copy.deepcopy(self.mix()[0]) if method == "finetune" else CTRTask(self._backbone(k + 1))
            _, ep = self._fit(task, list(task.parameters()), sp["train"].of_domain(k),
                              sp["validation"].of_domain(k), hp)
            probs = torch.where(test_dom == k, predict(task, sp["test"]), probs)
            val_probs = torch.where(val_dom == k, predict(task, sp["validation"]), val_probs)
            epochs.append(ep)
            trainable += count(task.parameters())
            self.log(f"  {method} {name}: best epoch {ep}")
        val_wauc = metrics(val_probs, sp["validation"], self.data.domains)["wauc"]
        return Outcome(probs, val_wauc, trainable, trainable, epochs)

    def multi_domain(self, method: str) -> Outcome:
        """Shared-Bottom, MMoE or STAR on the backbone's embedding layer, trained jointly."""
        backbone, k = self._backbone(), len(self.data.domains)
        e, hidden = backbone.input_dim, list(self.model.hidden)
        head = {"shared_bottom": lambda: SharedBottom(e, hidden, k),
                "mmoe": lambda: MMoE(e, hidden, k, num_experts=4),
                "star": lambda: STAR(e, hidden, k, aux_hidden=[64])}[method]()
        task = DomainCTRTask(backbone, head)
        params, sp = task.trainable_parameters(), self.data.splits
        wauc, ep = self._fit(task, params, sp["train"], sp["validation"], self.hp[method])
        return Outcome(predict(task, sp["test"]), wauc, count(params), count(params), [ep])

    # ---- adapters -------------------------------------------------------------------------
    def features(self) -> dict[str, adapt.Features]:
        """Frozen Mix embedding-layer output of every split (materialised once per seed)."""
        if self._features is None:
            backbone = self.mix()[0].backbone
            self._features = {s: adapt.materialise(backbone, sp.eval_batches())
                              for s, sp in self.data.splits.items()}
        return self._features

    def lora_config(self, method: str) -> LoraConfig:
        """MLoRA, or MultiLoRA with attention / add / avg fusion over the schema's first aux."""
        if method == "mlora":
            return LoraConfig(method="mlora", ranks=list(self.ranks))
        fusion = {"multilora": "attention", "multilora_add": "add", "multilora_avg": "avg"}[method]
        return LoraConfig(method="multilora", ranks=list(self.ranks), aux=self.data.schema.aux[0].name,
                          fusion=fusion)

    def adapters(self, method: str) -> Outcome:
        """Train ``method``'s adapters on the frozen Mix head; predict the test split."""
        mix, feats, hp = self.mix()[0], self.features(), self.hp[method]
        head, lora, vocab = adapt.Head.of(mix.backbone), self.lora_config(method), self.data.domains
        cfg = AdaptTrainConfig(lr=hp.lr, batch_size=hp.batch, eval_every=hp.eval_every, confidence=hp.confidence)
        loop = LoopConfig(epochs=hp.epochs, patience=hp.patience, seed=self.seed)
        splits = {"train": feats["train"], "validation": feats["validation"]}
        aux_values, aux_col, shared = None, None, None
        if lora.method == "mlora":
            results = adapt.train_mlora(head, lora, vocab, vocab, splits, cfg, loop)
        else:
            aux_col, aux_values = 0, self.data.schema.aux[0].values
            results, shared = adapt.train_multilora(head, lora, vocab, vocab, aux_values, aux_col,
                                                    splits, cfg, loop)
        model = adapt.Head.of(mix.backbone)
        adapted = inject(model, lora, vocab, aux_values, root="tower")
        for r in results:
            adapted.load_state_for(r.domain, r.state)
        if shared:
            adapted.load_shared_state(shared)

        def run(split: str) -> Tensor:
            f = feats[split]
            return adapt.predict(model, adapted, f, f.domains, aux_col)

        val_wauc = metrics(run("validation"), self.data.splits["validation"], vocab)["wauc"]
        n = count(adapted.adapter_params().values())
        return Outcome(run("test"), val_wauc, n, count(mix.parameters()) + n,
                       [r.best_epoch for r in results])

    def run(self, method: str) -> Outcome:
        """Train and predict one method (Mix is cached: asking for it twice trains it once)."""
        t0 = time.perf_counter()
        if method in self.cached:
            return self.cached[method]
        if method == "mix":
            return self.mix()[1]
        if method in ("single", "finetune"):
            out = self.per_domain(method)
        elif method in ("shared_bottom", "mmoe", "star"):
            out = self.multi_domain(method)
        elif method in ADAPTERS:
            out = self.adapters(method)
        else:
            raise ValueError(f"--methods: unknown method {method!r} (known: {', '.join(METHODS)})")
        out.seconds = time.perf_counter() - t0
        return out
