"""The optional domain-indicator embedding is an ordinary hashed feature on the domain column."""

from __future__ import annotations

import pyarrow as pa
import torch

from mdlora.embeddings.batch import BatchConverter
from mdlora.embeddings.hashing import bucket, hash_strings
from mdlora.embeddings.schema import Schema


def test_domain_column_doubles_as_a_hashed_feature():
    schema = Schema.from_dict({
        "name": "t", "label": "click", "domain": {"column": "domain", "values": ["a", "b"]},
        "tables": [{"name": "u", "num_embeddings": 10, "dim": 4}, {"name": "dom", "num_embeddings": 8, "dim": 4}],
        "sparse": [{"name": "u", "table": "u"},
                   {"name": "domain_ind", "column": "domain", "table": "dom", "policy": "hash"}],
    })
    batch = BatchConverter(schema).convert(pa.table({"click": [0, 1, 1], "domain": ["a", "b", "a"], "u": [1, 2, 3]}))
    ind = batch.sparse["domain_ind"].values()
    assert torch.equal(batch.domains, torch.tensor([0, 1, 0]))
    assert ind[0] == ind[2] != ind[1]
    expected = bucket(hash_strings(pa.array(["a", "b"])), 8)
    assert ind.tolist() == [int(expected[0]), int(expected[1]), int(expected[0])]
    # a domain added later (add-domain) still gets an id: hashing needs no vocabulary
    new = BatchConverter(schema.with_domains(["c"])).convert(pa.table({"click": [1], "domain": ["c"], "u": [0]}))
    assert 0 <= int(new.sparse["domain_ind"].values()[0]) < 8
