"""Feature schema of one multi-domain CTR log: columns, tables, id policies, domain vocabularies.

A schema is a YAML file::

    name: synthetic
    label: click                       # 0/1 column
    domain: {column: domain, values: [d0, d1, d2]}   # the natural domain division
    aux:                               # optional auxiliary divisions (MultiLoRA)
      - {name: gender, column: gender, values: [F, M]}
    date_column: date                  # optional, for --window filters (hive partition ok)
    tables:
      - {name: user, num_embeddings: 100000, dim: 16}
      - {name: item, num_embeddings: 100000, dim: 16}
    sparse:
      - {name: user_id, table: user, policy: hash}            # raw ids hashed into buckets
      - {name: item_id, table: item, policy: index}           # ids must lie in [0, N)
      - {name: hist, column: hist_items, table: item, multi: true, max_len: 20}  # list column
    dense:
      - {name: price, norm: log}
      - {name: age, norm: standard, mean: 35.0, std: 12.0}

Tables may be shared by several features (``item_id`` and ``hist`` above). Domain values are
kept as strings; integer domain columns are matched by their decimal string.

The :meth:`Schema.content_hash` covers everything that shapes the backbone's inputs (label,
features, tables, id policies, normalisation, aux vocabularies) but not the natural domain
vocabulary, which ``mdlora add-domain`` may extend without invalidating the backbone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import yaml

from mdlora.config import ConfigError, from_dict, read_yaml, to_dict
from mdlora.names import check_name  # re-exported: mdlora.embeddings.schema.check_name


@dataclass(kw_only=True)
class TableSpec:
    """One embedding table."""

    name: str
    """Table name, referenced by features."""
    num_embeddings: int
    """Rows in the table (hash buckets for hashed features)."""
    dim: int
    """Embedding dimension D."""

    def __post_init__(self) -> None:
        check_name(self.name, "table name")
        if self.num_embeddings < 1:
            raise ValueError(f"num_embeddings: must be >= 1, got {self.num_embeddings} (table {self.name!r})")
        if self.dim < 1:
            raise ValueError(f"dim: must be >= 1, got {self.dim} (table {self.name!r})")


@dataclass(kw_only=True)
class SparseFeature:
    """A categorical id feature looked up in a table and sum-pooled."""

    name: str
    """Feature name (the KJT key)."""
    table: str
    """Name of the table it is looked up in."""
    column: str = ""
    """Parquet column; defaults to ``name``."""
    policy: Literal["index", "hash"] = "index"
    """``index``: ids are row numbers and must lie in [0, num_embeddings); ``hash``: raw int or
    string ids hashed (stable across processes) into num_embeddings buckets."""
    multi: bool = False
    """The column is a list column (multi-valued feature)."""
    max_len: int | None = None
    """Keep at most this many values per row of a multi-valued feature (the first ones)."""

    def __post_init__(self) -> None:
        check_name(self.name, "sparse feature name")
        self.column = self.column or self.name
        if self.max_len is not None and (not self.multi or self.max_len < 1):
            raise ValueError(f"max_len: needs multi: true and a value >= 1 (feature {self.name!r})")


@dataclass(kw_only=True)
class DenseFeature:
    """A float feature, normalised before it reaches the model."""

    name: str
    """Feature name."""
    column: str = ""
    """Parquet column; defaults to ``name``."""
    norm: Literal["none", "standard", "log"] = "none"
    """``standard``: (x - mean) / std; ``log``: log1p(max(x, 0)); ``none``: as is."""
    mean: float = 0.0
    """Mean for ``standard``."""
    std: float = 1.0
    """Standard deviation for ``standard``."""
    fill: float | None = None
    """Value for nulls/NaN; ``None`` makes a null an input error."""

    def __post_init__(self) -> None:
        check_name(self.name, "dense feature name")
        self.column = self.column or self.name
        if self.std <= 0:
            raise ValueError(f"std: must be > 0, got {self.std} (feature {self.name!r})")


@dataclass(kw_only=True)
class Division:
    """A division of rows into named groups: the natural domains or an auxiliary division."""

    column: str
    """Parquet column holding the group of each row (string or integer)."""
    values: list[str]
    """The vocabulary, in id order."""
    name: str = ""
    """Division name (auxiliary divisions); defaults to ``column``."""

    def __post_init__(self) -> None:
        self.name = self.name or self.column
        self.values = [str(v) for v in self.values]
        for v in self.values:
            check_name(v, f"{self.name} value")
        if len(set(self.values)) != len(self.values):
            raise ValueError(f"{self.name}.values: duplicate values in {self.values}")

    def index(self, value: str) -> int:
        """Id of ``value`` in this division's vocabulary (ValueError naming it if unknown)."""
        try:
            return self.values.index(str(value))
        except ValueError:
            raise ValueError(f"{self.name} {value!r}: not in the vocabulary {self.values}") from None


@dataclass(kw_only=True)
class Schema:
    """The whole log schema. Feature order is the order of ``sparse`` / ``dense``."""

    name: str
    """Dataset name."""
    label: str
    """0/1 label column."""
    domain: Division
    """Natural domain division."""
    tables: list[TableSpec]
    """Embedding tables."""
    sparse: list[SparseFeature]
    """Categorical features (KJT keys, in this order)."""
    dense: list[DenseFeature] = field(default_factory=list)
    """Float features (columns of the dense tensor, in this order)."""
    aux: list[Division] = field(default_factory=list)
    """Auxiliary divisions for MultiLoRA (e.g. user gender)."""
    date_column: str | None = None
    """Column (or hive partition key) holding the log date ``YYYY-MM-DD`` for window filters."""

    def __post_init__(self) -> None:
        check_name(self.name, "schema name")
        if not self.sparse:
            raise ValueError("sparse: at least one sparse feature is required")
        names = [t.name for t in self.tables]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"tables: duplicate table names {sorted(dup)}")
        tables = set(names)
        fnames = [f.name for f in self.sparse] + [f.name for f in self.dense]
        dup = {n for n in fnames if fnames.count(n) > 1}
        if dup:
            raise ValueError(f"sparse/dense: duplicate feature names {sorted(dup)}")
        for f in self.sparse:
            if f.table not in tables:
                raise ValueError(f"sparse.{f.name}.table: unknown table {f.table!r} (tables: {sorted(tables)})")
        unused = tables - {f.table for f in self.sparse}
        if unused:
            raise ValueError(f"tables: {sorted(unused)} not used by any sparse feature")
        aux_names = [a.name for a in self.aux]
        if len(set(aux_names)) != len(aux_names):
            raise ValueError(f"aux: duplicate division names {aux_names}")
        if self.label in {f.column for f in self.sparse} | {f.column for f in self.dense}:
            raise ValueError(f"label: column {self.label!r} is also used as a feature")

    # ---- loading / saving -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> Schema:
        """Build from a mapping; unknown keys and bad values raise ConfigError naming the key."""
        return from_dict(cls, data)

    @classmethod
    def load(cls, path: str | Path) -> Schema:
        """Load a schema YAML file; errors name the file and the key."""
        try:
            return cls.from_dict(read_yaml(path))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        """Plain mapping (what :meth:`from_dict` reads)."""
        return to_dict(self)

    def dump(self, path: str | Path | None = None) -> str:
        """YAML text of the schema; also written to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def content_hash(self) -> str:
        """sha256 of the canonical schema without the natural domain vocabulary (see module doc)."""
        d = self.to_dict()
        d["domain"].pop("values")
        d.pop("name")
        blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    # ---- derived views ----------------------------------------------------------------------
    @property
    def feature_names(self) -> list[str]:
        """Sparse feature names in KJT key order."""
        return [f.name for f in self.sparse]

    @property
    def dense_names(self) -> list[str]:
        """Dense feature names in column order of the dense tensor."""
        return [f.name for f in self.dense]

    def table(self, name: str) -> TableSpec:
        """The table called ``name``."""
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(f"unknown table {name!r}")

    def columns(self) -> list[str]:
        """Every Parquet column the reader needs (label, divisions, features), deduplicated."""
        cols = [self.label, self.domain.column, *(a.column for a in self.aux)]
        cols += [f.column for f in self.sparse] + [f.column for f in self.dense]
        return list(dict.fromkeys(cols))

    def pooled_dim(self) -> int:
        """Width of the concatenated pooled embeddings: sum of each feature's table dim."""
        return sum(self.table(f.table).dim for f in self.sparse)

    def with_domains(self, values: list[str]) -> Schema:
        """A copy whose natural domain vocabulary is extended by ``values`` (existing ids kept)."""
        new = list(self.domain.values) + [v for v in values if v not in self.domain.values]
        return replace(self, domain=Division(column=self.domain.column, name=self.domain.name, values=new))

    def embedding_bag_configs(self) -> list:
        """TorchRec ``EmbeddingBagConfig`` per table, listing the features that use it."""
        from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

        return [
            EmbeddingBagConfig(
                name=t.name,
                embedding_dim=t.dim,
                num_embeddings=t.num_embeddings,
                feature_names=[f.name for f in self.sparse if f.table == t.name],
                pooling=PoolingType.SUM,
            )
            for t in self.tables
        ]
