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


def _write(directory) -> tuple[dict[str, list[Features]], list[Features], Head]:
    """Two ranks' files: domains a, b in train/validation/test; c (added) as one dataset, divided 9:1."""
    ranks = {s: [_rank(10 * r + i, 40 + 7 * r, [0, 1]) for r in range(2)]
             for i, s in enumerate(("train", "validation", "test"))}
    added = [_rank(99 + r, 30, [2]) for r in range(2)]
    head = Head(torch.nn.Linear(E, 3), torch.nn.Linear(3, 1))
    for r in range(2):
        index: dict[str, int] = {}
        for split, parts in ranks.items():
            features.write_rank(directory, 0, split, parts[r], VOCAB, r, index)
        features.write_rank(directory, 1, features.ALL, added[r], VOCAB, r, index)
        features.write_index(directory, r, index, head if r == 0 else None)
    return ranks, added, head


def test_each_domain_loads_the_rows_the_in_memory_path_had(tmp_path):
    ranks, added, head = _write(tmp_path)
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


def _by_x(f: Features) -> Features:
    return f.select(torch.argsort(f.x[:, 0]))


def test_a_streamed_task_reads_the_rows_load_gives_in_bounded_blocks(tmp_path):
    _write(tmp_path)
    cache = features.read_index(str(tmp_path), E, A)
    held = cache.load(VOCAB, seed=3)
    streamed = cache.stream(VOCAB, VOCAB, seed=3, block_rows=9, local=tmp_path / "unused")
    assert list(streamed) == list(held)
    for split, parts in streamed.items():
        assert sorted(p.domain for p in parts) == sorted({int(d) for d in held[split].domains})
        for p in parts:
            assert max(p.sizes) <= 9 and len(p) == cache.rows[VOCAB[p.domain]][split]
            rows = Features.cat([p.read(i) for i in range(len(p.sizes))], E, A)
            assert torch.equal(rows.domains, torch.full((len(p),), p.domain))
            own = held[split].of_domain(p.domain)
            if VOCAB[p.domain] == "c":  # divided 9:1 with load's draw, read in file order
                assert _same(_by_x(rows), _by_x(own)), split
            else:  # file order is load's order
                assert _same(rows, own), (split, p.domain)
    assert not (tmp_path / "unused").exists()  # a local cache is read in place


def test_a_task_streams_only_above_its_buffer(tmp_path, monkeypatch):
    from mdlora.adapters.config import LoraConfig
    from mdlora.infra import adapt
    from mdlora.trainer.config import AdaptConfig, AdaptTrainConfig

    _write(tmp_path)
    cache = features.read_index(str(tmp_path), E, A)
    seen = []
    monkeypatch.setattr(adapt, "train_mlora", lambda *a: seen.append(a[4]) or [])
    for buffer, streams in ((cache.held_rows(["a", "b"]), False), (cache.held_rows(["a", "b"]) - 1, True)):
        cfg = AdaptConfig(lora=LoraConfig(alpha=4), train=AdaptTrainConfig(batch_size=4, buffer_rows=buffer))
        adapt._train_task({"cache": cache, "cfg": cfg, "vocab": VOCAB, "head": Head(torch.nn.Linear(E, 3),
                           torch.nn.Linear(3, 1)), "aux": None, "domains": ["a", "b"], "shared": None, "wide": None})
        assert isinstance(seen[-1]["train"], Features) is not streams, buffer


def test_a_cache_on_s3_streams_from_a_local_copy_of_the_task_files(tmp_path, s3_env):
    from mdlora.infra.storage import open_fs

    _write(tmp_path / "run")
    fs, bucket = open_fs(s3_env)
    fs.put(str(tmp_path / "run"), f"{bucket}/run", recursive=True)
    local, remote = features.read_index(str(tmp_path / "run"), E, A), features.read_index(f"{s3_env}/run", E, A)
    want = local.stream(["b"], VOCAB, 3, 9, tmp_path / "x")
    got = remote.stream(["b"], VOCAB, 3, 9, tmp_path / "copy")
    assert sorted(p.name for p in (tmp_path / "copy" / "features").iterdir()) == sorted(features.SPLITS)
    assert not any("/a/" in str(p) for p in (tmp_path / "copy").rglob("*"))  # only the task's domains
    for split in want:
        for p, q in zip(want[split], got[split], strict=True):
            assert p.sizes == q.sizes and all(_same(p.read(i), q.read(i)) for i in range(len(p.sizes)))
