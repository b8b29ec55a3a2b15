"""Schema loading errors and the content hash."""

from __future__ import annotations

import copy

import pytest

from mdlora.config import ConfigError
from mdlora.embeddings.schema import Schema

TINY_HASH = "92efd3644d6375833e65de581cee7809e2d2900e65cea01afc5c418caae2868a"


def test_round_trip_and_pinned_content_hash(tiny_schema_dict, tmp_path):
    s = Schema.from_dict(tiny_schema_dict)
    s.dump(tmp_path / "s.yaml")
    back = Schema.load(tmp_path / "s.yaml")
    assert back == s
    # pinned: a change here changes every backbone's identity and must be deliberate
    assert s.content_hash() == back.content_hash() == TINY_HASH


def test_content_hash_ignores_domain_vocab_extension_but_not_features(tiny_schema_dict):
    s = Schema.from_dict(tiny_schema_dict)
    extended = s.with_domains(["d", "a"])
    assert extended.domain.values == ["a", "b", "c", "d"]
    assert extended.content_hash() == s.content_hash()
    changed = copy.deepcopy(tiny_schema_dict)
    changed["tables"][0]["num_embeddings"] = 101
    assert Schema.from_dict(changed).content_hash() != s.content_hash()
    aux = copy.deepcopy(tiny_schema_dict)
    aux["aux"][0]["values"] = ["F", "M", "X"]
    assert Schema.from_dict(aux).content_hash() != s.content_hash()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(labell="x"), "labell: unknown key"),
        (lambda d: d["tables"][0].update(dim="4"), "tables[0].dim: expected an integer"),
        (lambda d: d["sparse"][0].update(policy="md5"), "sparse[0].policy: 'md5' is not one of"),
        (lambda d: d["domain"].update(values=["a", "../x"]), "'../x'"),
        (lambda d: d["sparse"][1].update(table="nope"), "unknown table 'nope'"),
        (lambda d: d.update(name="../evil"), "schema name '../evil'"),
        (lambda d: d.pop("label"), "label: required key is missing"),
    ],
)
def test_bad_schema_names_the_key(tiny_schema_dict, tmp_path, edit, message):
    edit(tiny_schema_dict)
    with pytest.raises(
        ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")
    ):
        Schema.from_dict(tiny_schema_dict)


def test_load_error_names_the_file(tmp_path, tiny_schema_dict):
    import yaml

    tiny_schema_dict["tables"][0]["dim"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny_schema_dict))
    with pytest.raises(ConfigError, match=r"bad\.yaml: .*dim: must be >= 1, got 0"):
        Schema.load(path)
