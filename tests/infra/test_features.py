"""The adapter run's feature cache: per-domain files per rank, an index of row counts, and loads
that give each domain exactly the rows (in the order) the in-memory path gave it."""

from __future__ import annotations

import torch

from mdlora.infra import features
from mdlora.trainer.features import Features, Head

VOCAB = ["a", "b", "c"]
E, A = 5, 1


def _rank(seed: int, n: int, domains: list[int]) -> Features:
    g = torch.Generator().manual_seed(seed)
    dom = torch.tensor(domains)[torch.randint(len(domains), (n,), generator=g)]
    return Features(torch.randn(n, E, generator=g), torch.randint(2, (n,), generator=g).float(), dom,
                    torch.randint(2, (n, A), generator=g))


def _same(x: Features, y: Features) -> bool:
    return all(torch.equal(s, t) for s, t in zip(x.tensors(), y.tensors(), strict=True))


def test_each_domain_loads_the_rows_the_in_memory_path_had(tmp_path):
    ranks = {s: [_rank(10 * r + i, 40 + 7 * r, [0, 1]) for r in range(2)]
             for i, s in enumerate(("train", "validation", "test"))}
    added = [_rank(99 + r, 30, [2]) for r in range(2)]  # an added domain: one dataset, divided 9:1
    head = Head(torch.nn.Linear(E, 3), torch.nn.Linear(3, 1))
    for r in range(2):
        index: dict[str, int] = {}
        for split, parts in ranks.items():
            features.write_rank(tmp_path, 0, split, parts[r], VOCAB, r, index)
        features.write_rank(tmp_path, 1, features.ALL, added[r], VOCAB, r, index)
        features.write_index(tmp_path, r, index, head if r == 0 else None)

    cache = features.read_index(str(tmp_path), E, A)
    whole = {s: Features.cat(parts, E, A) for s, parts in ranks.items()}
    for d, name in enumerate(VOCAB[:2]):
        got = cache.load([name], seed=3)
        for split in ranks:
            assert _same(got[split], whole[split].of_domain(d)), (name, split)
            assert cache.rows[name][split] == len(whole[split].of_domain(d))
    both = cache.load(["b", "a"], seed=3)  # a task with two domains gets both, domain by domain
    assert len(both["train"]) == len(whole["train"]) and set(both["train"].domains.tolist()) == {0, 1}

    mine = cache.load(["c"], seed=3)
    expected = Features.cat(added, E, A).split(3)
    assert _same(mine["train"], expected["train"]) and _same(mine["validation"], expected["validation"])
    assert len(mine["test"]) == 0  # a split only other domains have is there, empty
    assert cache.rows["c"] == {"train": len(expected["train"]), "validation": len(expected["validation"])}
    assert cache.count("train") == len(whole["train"]) + len(expected["train"])

    fresh = Head(torch.nn.Linear(E, 3), torch.nn.Linear(3, 1))
    assert all(torch.equal(p, q) for p, q in zip(cache.head(fresh).parameters(), head.parameters(), strict=True))
