"""The typed backbone manifest reads what earlier code published and refuses what it cannot."""

from __future__ import annotations

import pytest

from mdlora.infra.artifacts import BackboneError, BackboneManifest

# the keys publish_backbone wrote before the manifest was typed (format_version 1)
EARLIER = {"format_version": 1, "kind": "backbone", "name": "ctr", "schema_hash": "s" * 64, "code_version": "0.1.0",
           "data_window": "", "step": 40, "run": "", "created_at": "2026-11-23T04:27:00Z",
           "files": {"train_state.json": "a" * 64}, "content_hash": "c" * 64}


def test_a_manifest_written_by_earlier_code_loads(recwarn):
    m = BackboneManifest.from_dict(EARLIER | {"version": "v0003"})  # the registry adds the version
    assert m.version == "v0003" and not recwarn.list
    assert (m.name, m.step, m.content_hash, m.files) == ("ctr", 40, "c" * 64, EARLIER["files"])
    old = {k: v for k, v in EARLIER.items() if k != "run"}  # before runs were recorded
    assert BackboneManifest.from_dict(old).run == ""


@pytest.mark.parametrize("change, message", [
    ({"schema_hash": None}, "schema_hash"),
    ({"format_version": 2}, "newer than this mdlora"),
    ({"kind": "adapter"}, "kind"),
])
def test_a_manifest_it_cannot_trust_is_refused_naming_why(change, message):
    data = {k: v for k, v in (EARLIER | change).items() if v is not None}
    with pytest.raises(BackboneError, match=message):
        BackboneManifest.from_dict(data, source="backbones/ctr v0001")


def test_unknown_keys_warn():
    with pytest.warns(UserWarning, match="unknown manifest keys"):
        BackboneManifest.from_dict(EARLIER | {"future": 1})
