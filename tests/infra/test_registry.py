"""Registry: versions, aliases, history, concurrency, name checks, S3 (moto), ``mdlora bundles``."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import fsspec
import pytest

from mdlora.infra.artifacts.registry import RESERVATION, Registry, RegistryError, _production_stack
from mdlora.infra.artifacts.sealed import MANIFEST, ArtifactError, seal
from mdlora.jobs.cli import main


def make_artifact(directory: Path, payload: bytes = b"weights", kind: str = "adapter") -> Path:
    """A sealed artefact directory: one data file in a sub-folder plus the manifest."""
    (directory / "sub").mkdir(parents=True)
    (directory / "sub" / "w.bin").write_bytes(payload)
    seal(directory, {"format_version": 1, "kind": kind})
    return directory


def local_registry(root: Path) -> Registry:
    return Registry(fsspec.filesystem("file"), str(root))


def test_publish_resolve_promote_rollback_history(tmp_path):
    reg = local_registry(tmp_path / "reg")
    src = make_artifact(tmp_path / "src")
    assert reg.versions("adapters", "books") == [] and reg.names("adapters") == []
    assert [reg.publish("adapters", "books", src) for _ in range(3)] == ["v0001", "v0002", "v0003"]
    assert reg.names("adapters") == ["books"] and reg.names("backbones") == []
    assert reg.aliases("adapters", "books") == {"latest": "v0003"}
    path = Path(reg.resolve("adapters", "books", "latest"))
    assert path == tmp_path / "reg" / "adapters" / "books" / "v0003"
    assert json.loads((path / MANIFEST).read_text())["version"] == "v0003"
    assert (path / "sub" / "w.bin").read_bytes() == b"weights"
    assert reg.fetch("adapters", "books", "v2", tmp_path / "cache") == path.parent / "v0002"
    with pytest.raises(RegistryError, match="no 'production' alias"):
        reg.resolve("adapters", "books")
    with pytest.raises(RegistryError, match="no complete version v0009"):
        reg.resolve("adapters", "books", "v0009")

    assert reg.promote("adapters", "books", "v0001") is None
    assert reg.promote("adapters", "books", "v0003") == "v0001"
    assert reg.promote("adapters", "books", "v0003") == "v0003"  # no-op, not recorded
    assert reg.promote("adapters", "books", "2") == "v0003"
    assert reg.resolve("adapters", "books").endswith("v0002")
    assert reg.rollback("adapters", "books") == "v0003"
    assert reg.rollback("adapters", "books") == "v0001"
    with pytest.raises(RegistryError, match=r"no earlier production version .*production: v0001"):
        reg.rollback("adapters", "books")
    events = [(e["event"], e["version"], e["previous"]) for e in reg.history("adapters", "books")]
    assert events == [
        ("publish", "v0001", None),
        ("publish", "v0002", "v0001"),
        ("publish", "v0003", "v0002"),
        ("promote", "v0001", None),
        ("promote", "v0003", "v0001"),
        ("promote", "v0002", "v0003"),
        ("rollback", "v0003", "v0002"),
        ("rollback", "v0001", "v0003"),
    ]
    assert reg.aliases("adapters", "books") == {"latest": "v0003", "production": "v0001"}


def test_incomplete_version_is_invisible_and_its_number_is_not_reused(tmp_path):
    reg = local_registry(tmp_path / "reg")
    src = make_artifact(tmp_path / "src")
    reg.publish("backbones", "ctr", src)
    # a publisher died after claiming v0002 and copying data, before writing the manifest
    crashed = tmp_path / "reg" / "backbones" / "ctr" / "v0002"
    (crashed / "sub").mkdir(parents=True)
    (crashed / RESERVATION).write_text("{}")
    (crashed / "sub" / "w.bin").write_bytes(b"wei")
    assert reg.versions("backbones", "ctr") == ["v0001"]
    with pytest.raises(RegistryError, match="v0002: incomplete, no manifest.json"):
        reg.resolve("backbones", "ctr", "v0002")
    assert reg.publish("backbones", "ctr", src) == "v0003"
    assert reg.versions("backbones", "ctr") == ["v0001", "v0003"]


def test_stale_listing_cannot_hand_out_a_taken_version(tmp_path, monkeypatch):
    """A publisher whose listing missed a rival's reservation still gets a fresh number."""
    reg = local_registry(tmp_path / "reg")
    src = make_artifact(tmp_path / "src")
    assert reg.publish("adapters", "books", src) == "v0001"
    monkeypatch.setattr(reg, "_ls_names", lambda directory: [])
    assert reg.publish("adapters", "books", src) == "v0002"
    assert reg.versions("adapters", "books") == ["v0001", "v0002"]


def test_corrupt_or_unsealed_source_is_refused(tmp_path):
    reg = local_registry(tmp_path / "reg")
    src = make_artifact(tmp_path / "src")
    (src / "sub" / "w.bin").write_bytes(b"changed")
    with pytest.raises(RegistryError, match=r"sub/w.bin: sha256 mismatch"):
        reg.publish("adapters", "books", src)
    (src / MANIFEST).unlink()
    with pytest.raises(ValueError, match="missing manifest"):
        reg.publish("adapters", "books", src)
    assert not (tmp_path / "reg" / "adapters" / "books").exists()


@pytest.mark.parametrize("name", ["../x", "a/b", "/", "a b", "", ".hidden", ".."])
def test_names_with_path_characters_are_refused(tmp_path, name):
    reg = local_registry(tmp_path / "reg")
    with pytest.raises(ValueError, match="only letters, digits"):
        reg.publish("adapters", name, make_artifact(tmp_path / "src"))
    with pytest.raises(ValueError, match="only letters, digits"):
        reg.versions("adapters", name)
    assert not (tmp_path / "reg").exists()


def test_unknown_kind_is_refused(tmp_path):
    with pytest.raises(RegistryError, match="kind 'models'"):
        local_registry(tmp_path).versions("models", "books")


def _publisher(root: str, name: str, src: str, count: int, barrier, results) -> None:
    reg = Registry(fsspec.filesystem("file"), root)
    barrier.wait(timeout=60)
    out = []
    for _ in range(count):
        version = reg.publish("adapters", name, src)
        reg.promote("adapters", name, version)
        out.append(version)
    results.put((name, out))


def test_concurrent_publishers_get_distinct_versions_and_consistent_aliases(tmp_path):
    ctx = mp.get_context("spawn")
    root = str(tmp_path / "reg")
    jobs = [(f"d{i}", i) for i in range(4)] + [("shared", 4), ("shared", 5)]
    barrier, results = ctx.Barrier(len(jobs)), ctx.Queue()
    procs = []
    for name, i in jobs:
        src = make_artifact(tmp_path / f"src{i}", payload=f"weights {i}".encode())
        procs.append(
            ctx.Process(target=_publisher, args=(root, name, str(src), 3, barrier, results))
        )
    for p in procs:
        p.start()
    got: dict[str, list[str]] = {}
    for _ in procs:
        name, versions = results.get(timeout=120)
        got.setdefault(name, []).extend(versions)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    reg = local_registry(tmp_path / "reg")
    assert reg.names("adapters") == ["d0", "d1", "d2", "d3", "shared"]
    for name, versions in got.items():
        expected = [f"v{n:04d}" for n in range(1, len(versions) + 1)]
        # every version present, none handed out twice
        assert sorted(versions) == expected == reg.versions("adapters", name)
        history = reg.history("adapters", name)
        assert sorted(e["version"] for e in history if e["event"] == "publish") == expected
        assert sorted(e["version"] for e in history if e["event"] == "promote") == expected
        aliases = reg.aliases("adapters", name)
        assert aliases["latest"] == expected[-1]
        assert aliases["production"] == _production_stack(history)[-1]
    assert len(got["shared"]) == 6
    payloads = {
        Path(reg.resolve("adapters", "shared", v), "sub", "w.bin").read_bytes()
        for v in got["shared"]
    }
    assert payloads == {b"weights 4", b"weights 5"}


@pytest.mark.integration
def test_s3_registry_round_trip(s3_env, tmp_path, monkeypatch):
    import torch

    from mdlora.infra.artifacts.bundle import BackboneRef, BundleManifest, load_bundle, write_bundle
    from mdlora.infra.storage import open_fs

    uri = f"{s3_env}/registry"
    reg = Registry(*open_fs(uri))
    manifest = BundleManifest(
        domain="books",
        method="multilora",
        lora={"rank": 2},
        backbone=BackboneRef(name="ctr", version="v0001", content_hash="h" * 64),
        schema_hash="s" * 64,
        param_count=8,
        param_share=0.1,
    )
    write_bundle(tmp_path / "b1", {"a": torch.arange(8.0).reshape(2, 4)}, manifest)
    write_bundle(tmp_path / "b2", {"a": torch.ones(2, 4)}, manifest)
    assert reg.publish("adapters", "books", tmp_path / "b1") == "v0001"
    assert reg.publish("adapters", "books", tmp_path / "b2") == "v0002"
    # a publisher that uploaded its data but never its manifest
    reg.fs.pipe_file(f"{reg.root}/adapters/books/v0003/{RESERVATION}", b"{}")
    reg.fs.pipe_file(f"{reg.root}/adapters/books/v0003/adapter.safetensors", b"partial")
    assert reg.versions("adapters", "books") == ["v0001", "v0002"]
    assert reg.names("adapters") == ["books"]
    assert reg.publish("adapters", "books", tmp_path / "b1") == "v0004"
    with monkeypatch.context() as m:  # a stale listing: If-None-Match still refuses taken numbers
        m.setattr(reg, "_ls_names", lambda directory: [])
        assert reg.publish("adapters", "books", tmp_path / "b2") == "v0005"

    reg.promote("adapters", "books", "v0001")
    assert reg.resolve("adapters", "books") == f"{uri}/adapters/books/v0001"
    reg.promote("adapters", "books", "v0002")
    assert reg.rollback("adapters", "books") == "v0001"
    local = reg.fetch("adapters", "books", "production", tmp_path / "cache")
    assert local.parent.parent.parent.parent == tmp_path / "cache"  # cache/<registry key>/adapters/books/v0001
    assert local.relative_to(tmp_path / "cache").parts[1:] == ("adapters", "books", "v0001")
    loaded = load_bundle(local, expect_backbone_hash="h" * 64, expect_schema_hash="s" * 64)
    assert torch.equal(loaded.tensors["a"], torch.arange(8.0).reshape(2, 4)) and loaded.manifest.version == "v0001"
    assert reg.aliases("adapters", "books") == {"latest": "v0005", "production": "v0001"}
    assert reg.verify("adapters", "books", "v0002") == []

    # compare-and-swap: another writer updates aliases.json between our read and our write
    other, read_state, raced = Registry(*open_fs(uri)), reg._state, []

    def racing_state(kind, name):
        state = read_state(kind, name)
        if not raced:
            raced.append(other.promote("adapters", "books", "v0004"))
        return state

    with monkeypatch.context() as m:
        m.setattr(reg, "_state", racing_state)
        assert reg.promote("adapters", "books", "v0002") == "v0004"  # retried after the conflict
    promotes = [e["version"] for e in reg.history("adapters", "books") if e["event"] == "promote"]
    assert promotes == ["v0001", "v0002", "v0004", "v0002"]  # no update lost

    reg.fs.pipe_file(f"{reg.root}/adapters/books/v0002/adapter.safetensors", b"tampered")
    assert main(["bundles", "verify", "books", "v0002", "--root", uri]) == 2
    (problem,) = reg.verify("adapters", "books", "v0002")
    assert "v0002/adapter.safetensors: sha256 mismatch" in problem


def test_cli_list_show_verify_promote_rollback(tmp_path, capsys):
    root = str(tmp_path / "reg")
    reg = local_registry(tmp_path / "reg")
    reg.publish("backbones", "ctr", make_artifact(tmp_path / "src", kind="backbone"))
    reg.publish("backbones", "ctr", tmp_path / "src")
    cli = ["--root", root, "--kind", "backbones"]
    assert main(["bundles", "list", *cli]) == 0
    assert "ctr\tversions: v0001,v0002" in capsys.readouterr().out
    assert main(["bundles", "show", "ctr", "v0001", *cli]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "v0001"
    assert main(["bundles", "verify", "ctr", *cli]) == 0
    assert capsys.readouterr().out.splitlines() == ["ctr v0001: ok", "ctr v0002: ok"]
    assert main(["bundles", "promote", "ctr", "v0001", *cli]) == 0
    assert main(["bundles", "promote", "ctr", "v0002", *cli]) == 0
    assert main(["bundles", "rollback", "ctr", *cli]) == 0
    assert reg.aliases("backbones", "ctr")["production"] == "v0001"
    assert main(["bundles", "rollback", "ctr", *cli]) == 2
    assert "no earlier production version" in capsys.readouterr().err
    assert main(["bundles", "promote", "../x", "v0001", *cli]) == 2
    assert main(["bundles", "show", *cli]) == 2
    (tmp_path / "reg" / "backbones" / "ctr" / "v0002" / "sub" / "w.bin").write_bytes(b"tampered")
    assert main(["bundles", "verify", "ctr", *cli]) == 2
    assert "v0002/sub/w.bin: sha256 mismatch" in capsys.readouterr().out


def test_local_fetch_checks_every_file_before_handing_out_the_path(tmp_path):
    reg = local_registry(tmp_path / "reg")
    reg.publish("adapters", "books", make_artifact(tmp_path / "src"))
    path = Path(reg.fetch("adapters", "books", "latest", tmp_path / "cache"))
    (path / "sub" / "w.bin").write_bytes(b"tampered")
    with pytest.raises(RegistryError, match=r"adapters/books v0001 is corrupt: .*w.bin: sha256 mismatch"):
        reg.fetch("adapters", "books", "latest", tmp_path / "cache")


def test_verify_reports_an_adapter_bundle_too_new_to_read(tmp_path):
    from mdlora.infra.artifacts.bundle import write_bundle
    from tests.infra.test_bundle import make_manifest, make_tensors, rewrite_manifest

    reg = local_registry(tmp_path / "reg")
    write_bundle(tmp_path / "src", make_tensors(), make_manifest())
    reg.publish("adapters", "books", tmp_path / "src")
    assert reg.verify("adapters", "books", "v0001") == []
    rewrite_manifest(Path(reg.resolve("adapters", "books", "v0001")), format_version=99)
    assert main(["bundles", "verify", "books", "--root", str(tmp_path / "reg")]) == 2
    (problem,) = reg.verify("adapters", "books", "v0001")
    assert "format_version 99 is newer" in problem


def test_s3_fetch_cache_is_per_registry_checked_and_shared_safely(s3_env, tmp_path):
    """Two registries' ``books/v0001`` never share a cached copy; a damaged cached copy is
    downloaded again; a manifest naming a file outside its version writes nothing."""
    from concurrent.futures import ThreadPoolExecutor

    from mdlora.infra.storage import open_fs

    a, b = Registry(*open_fs(f"{s3_env}/a")), Registry(*open_fs(f"{s3_env}/b"))
    assert a.publish("adapters", "books", make_artifact(tmp_path / "a", b"weights of a")) == "v0001"
    assert b.publish("adapters", "books", make_artifact(tmp_path / "b", b"weights of b")) == "v0001"
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(4) as pool:  # concurrent fetches of one version: one copy, every caller served
        (in_a,) = set(pool.map(lambda _: a.fetch("adapters", "books", "v0001", cache), range(4)))
    in_b = b.fetch("adapters", "books", "v0001", cache)
    assert in_a != in_b
    assert (in_a / "sub/w.bin").read_bytes() == b"weights of a" and (in_b / "sub/w.bin").read_bytes() == b"weights of b"
    (in_a / "sub/w.bin").write_bytes(b"damaged in the cache")
    assert a.fetch("adapters", "books", "v0001", cache) == in_a
    assert (in_a / "sub/w.bin").read_bytes() == b"weights of a"  # downloaded again

    manifest = json.loads(a.fs.cat_file(f"{a.root}/adapters/books/v0001/manifest.json"))
    manifest["files"]["../../../escaped.txt"] = "0" * 64
    a.fs.pipe_file(f"{a.root}/adapters/books/v0001/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(ArtifactError, match="outside the version"):
        a.fetch("adapters", "books", "v0001", tmp_path / "cache2")
    assert not list(tmp_path.rglob("escaped.txt")) and not (tmp_path / "cache2").exists()


def test_s3_alias_change_whose_reply_was_lost_is_applied_once(s3_env, tmp_path, monkeypatch):
    """The PUT of a rollback lands but its reply is lost; the retry meets a 412 (the ETag moved):
    the registry sees its own change already there instead of rolling back a second time."""
    from mdlora.infra.storage import open_fs

    reg = Registry(*open_fs(f"{s3_env}/registry"))
    src = make_artifact(tmp_path / "src")
    for _ in range(3):
        reg.promote("adapters", "books", reg.publish("adapters", "books", src))
    put, lost = reg.fs.pipe_file, []

    def reply_lost(path, data, **kw):
        put(path, data, **kw)
        if not lost and path.endswith("aliases.json"):
            lost.append(path)
            raise FileExistsError(path)  # what s3fs raises for 412 Precondition Failed

    monkeypatch.setattr(reg.fs, "pipe_file", reply_lost)
    assert reg.rollback("adapters", "books") == "v0002"
    assert lost and reg.aliases("adapters", "books")["production"] == "v0002"
    assert [e["event"] for e in reg.history("adapters", "books")].count("rollback") == 1
