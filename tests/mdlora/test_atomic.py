"""Atomic writers: a failure leaves the previous state, never a partial one."""

from __future__ import annotations

import json

import pytest

from mdlora.atomic import sha256_tree, staging_dir, write_json


def test_write_json_replaces_whole_file(tmp_path):
    p = tmp_path / "a.json"
    write_json(p, {"v": 1})
    write_json(p, {"v": 2})
    assert json.loads(p.read_text()) == {"v": 2}
    assert [x.name for x in tmp_path.iterdir()] == ["a.json"]  # no temp files left


def test_staging_dir_commits_or_leaves_nothing(tmp_path):
    dest = tmp_path / "v0001"
    with pytest.raises(RuntimeError):
        with staging_dir(dest) as d:
            (d / "weights.bin").write_bytes(b"x" * 10)
            raise RuntimeError("crash mid-write")
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    with staging_dir(dest) as d:
        (d / "weights.bin").write_bytes(b"ok")
    assert (dest / "weights.bin").read_bytes() == b"ok"
    with pytest.raises(FileExistsError, match="immutable"):
        with staging_dir(dest):
            pass
    with staging_dir(dest, overwrite=True) as d:
        (d / "weights.bin").write_bytes(b"new")
    assert (dest / "weights.bin").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v0001"]


def test_tree_hash_changes_with_content_and_names(tmp_path):
    (tmp_path / "a").write_bytes(b"1")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"2")
    h1, files = sha256_tree(tmp_path)
    assert set(files) == {"a", "sub/b"}
    (tmp_path / "sub" / "b").write_bytes(b"3")
    h2, _ = sha256_tree(tmp_path)
    (tmp_path / "sub" / "b").rename(tmp_path / "sub" / "c")
    h3, _ = sha256_tree(tmp_path)
    assert len({h1, h2, h3}) == 3
    assert sha256_tree(tmp_path, exclude=("a",))[1].keys() == {"sub/c"}
