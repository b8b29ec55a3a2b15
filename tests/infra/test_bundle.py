"""Adapter bundles: round trip, checksums, hash/format checks, manifest keys, crash safety."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import mdlora
from mdlora.infra.artifacts.bundle import (
    FORMAT_VERSION,
    BackboneRef,
    BundleError,
    BundleManifest,
    load_bundle,
    verify_bundle,
    write_bundle,
)
from mdlora.infra.artifacts.layout import ADAPTER_WEIGHTS as WEIGHTS
from mdlora.infra.artifacts.layout import MANIFEST

BACKBONE_HASH = "b" * 64
SCHEMA_HASH = "s" * 64


def make_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "tower.0.lora_A": torch.randn(4, 16, generator=g),
        "tower.0.lora_B": torch.randn(8, 4, generator=g, dtype=torch.float64),
        "tower.2.lora_A": torch.randn(2, 8, generator=g).to(torch.bfloat16),
    }


def make_manifest(**overrides) -> BundleManifest:
    fields = dict(
        domain="books",
        method="mlora",
        lora={"rank": 4, "alpha": 8.0, "targets": ["tower.0", "tower.2"]},
        backbone=BackboneRef(name="ctr", version="v0002", content_hash=BACKBONE_HASH),
        schema_hash=SCHEMA_HASH,
        param_count=112,
        param_share=0.01,
        metrics={
            "validation": {
                "auc_backbone": 0.71,
                "auc_adapter": 0.73,
                "logloss_backbone": 0.5,
                "logloss_adapter": 0.48,
                "samples": 1000,
            }
        },
        data_window={"start": "2026-10-01", "end": "2026-10-31"},
    )
    return BundleManifest(**{**fields, **overrides})


@pytest.fixture
def bundle(tmp_path) -> Path:
    dest = tmp_path / "books" / "v0001"
    write_bundle(dest, make_tensors(), make_manifest())
    return dest


def load(path, backbone=BACKBONE_HASH, schema=SCHEMA_HASH):
    b = load_bundle(path, expect_backbone_hash=backbone, expect_schema_hash=schema)
    return b.tensors, b.manifest


def test_shared_tensors_round_trip_apart_from_the_domain_s(tmp_path):
    shared = {"tower.0.aux.F.A": torch.randn(4, 2), "tower.0.aux.M.A": torch.randn(4, 2)}
    write_bundle(tmp_path / "b", make_tensors(), make_manifest(), shared=shared)
    b = load_bundle(tmp_path / "b", expect_backbone_hash=BACKBONE_HASH, expect_schema_hash=SCHEMA_HASH)
    assert sorted(b.tensors) == sorted(make_tensors()) and sorted(b.shared) == sorted(shared)
    assert all(torch.equal(b.shared[k], v) for k, v in shared.items())
    assert load(write_bundle(tmp_path / "c", make_tensors(), make_manifest()) and tmp_path / "c")[0].keys() \
        == make_tensors().keys()
    with pytest.raises(ValueError, match="must not start with 'shared.'"):
        write_bundle(tmp_path / "d", {"shared.x": torch.zeros(1)}, make_manifest())
    assert not (tmp_path / "d").exists()


def test_round_trip_is_bit_identical_and_records_everything(bundle):
    assert sorted(p.name for p in bundle.iterdir()) == sorted([WEIGHTS, MANIFEST])
    tensors, manifest = load(bundle)
    expected = make_tensors()
    assert tensors.keys() == expected.keys()
    for k, v in expected.items():
        assert tensors[k].dtype == v.dtype and tensors[k].shape == v.shape
        assert torch.equal(tensors[k].view(torch.uint8), v.view(torch.uint8))  # bit-identical
    raw = json.loads((bundle / MANIFEST).read_text())
    assert raw["format_version"] == FORMAT_VERSION == manifest.format_version
    assert raw["code_version"] == mdlora.__version__
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$", raw["created_at"])
    assert set(raw["files"]) == {WEIGHTS} and len(raw["files"][WEIGHTS]) == 64
    assert manifest.backbone.content_hash == BACKBONE_HASH and manifest.domain == "books"
    assert manifest.metrics["validation"]["auc_adapter"] == 0.73
    assert verify_bundle(bundle) == []


def test_tampered_weights_are_refused_naming_the_file(bundle):
    data = bytearray((bundle / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (bundle / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"{WEIGHTS}: sha256 mismatch"):
        load(bundle)
    (problem,) = verify_bundle(bundle)
    assert WEIGHTS in problem


def test_wrong_backbone_or_schema_hash_names_both_hashes(bundle):
    with pytest.raises(BundleError, match=f"{BACKBONE_HASH}.*{'c' * 64}"):
        load(bundle, backbone="c" * 64)
    with pytest.raises(BundleError, match=f"{SCHEMA_HASH}.*{'d' * 64}"):
        load(bundle, schema="d" * 64)
    tensors, _ = load(bundle, backbone=None, schema=None)
    assert len(tensors) == 3


def rewrite_manifest(bundle: Path, **changes) -> None:
    raw = json.loads((bundle / MANIFEST).read_text())
    for k, v in changes.items():
        if v is None:
            raw.pop(k)
        else:
            raw[k] = v
    (bundle / MANIFEST).write_text(json.dumps(raw))


def test_newer_format_version_names_both_versions(bundle):
    rewrite_manifest(bundle, format_version=FORMAT_VERSION + 1)
    with pytest.raises(
        BundleError,
        match=rf"format_version {FORMAT_VERSION + 1} .*format_version {FORMAT_VERSION}\)",
    ):
        load(bundle)
    assert "newer" in verify_bundle(bundle)[0]


def test_missing_manifest_is_a_clear_error(bundle):
    (bundle / MANIFEST).unlink()
    with pytest.raises(BundleError, match="missing manifest"):
        load(bundle)
    assert "missing manifest" in verify_bundle(bundle)[0]


def test_unknown_key_warns_and_missing_required_key_fails(bundle):
    rewrite_manifest(bundle, quantized=True)
    with pytest.warns(UserWarning, match=r"unknown manifest keys \['quantized'\]"):
        _, manifest = load(bundle)
    assert manifest.domain == "books"
    rewrite_manifest(bundle, quantized=None, schema_hash=None)
    with pytest.raises(BundleError, match="schema_hash: required key is missing"):
        load(bundle)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"domain": "../x"}, "domain '../x'"),
        ({"method": "lora"}, "method"),
        ({"version": "3"}, "version"),
    ],
)
def test_invalid_manifest_values_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_manifest(**overrides)


def test_crash_during_write_leaves_no_visible_bundle(tmp_path, monkeypatch):
    import mdlora.infra.artifacts.bundle as bundle_mod

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(bundle_mod, "seal", crash)  # tensors written, manifest not yet
    dest = tmp_path / "books" / "v0001"
    with pytest.raises(RuntimeError, match="disk full"):
        write_bundle(dest, make_tensors(), make_manifest())
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # no staging leftovers either
    monkeypatch.undo()
    write_bundle(dest, make_tensors(), make_manifest())  # the name is still free
    with pytest.raises(FileExistsError, match="immutable"):
        write_bundle(dest, make_tensors(), make_manifest())


def test_format_1_multilora_bundle_is_refused_but_format_1_mlora_still_loads(tmp_path):
    old = tmp_path / "books" / "v0001"
    write_bundle(old, make_tensors(), make_manifest(format_version=1))
    assert load(old)[1].format_version == 1
    multi = tmp_path / "movies" / "v0001"
    write_bundle(multi, make_tensors(), make_manifest(domain="movies", method="multilora"))
    rewrite_manifest(multi, format_version=1)
    with pytest.raises(BundleError, match="format_version 1 MultiLoRA bundle predates"):
        load(multi)
