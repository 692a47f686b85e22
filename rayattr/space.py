"""The vector space of gradient rows, and the one rule for comparing two of them.

``TableMeta`` records how a table's vectors were made. Vectors (and the statistics fitted on
them) can be compared, mixed or preconditioned together only when they agree on ``SPACE_FIELDS``:
the model, the modules, the projection and the normalizer. Every such check goes through
``space_mismatches``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from rayattr import __version__
from rayattr.config import RayattrError

FORMAT_VERSION = 1  # of the table metadata; readers refuse newer formats
GRADIENTS = "gradients"  # the row kind (and table name) of gradient vectors
SPACE_FIELDS = ("model", "modules", "projection", "normalizer")  # decide the space vectors live in
VECTOR_FIELDS = ("dtype", "dim")  # decide the shape and storage of the vectors


@dataclass(frozen=True)
class TableMeta:
    """How a table's vectors were made (stored as JSON in the schema metadata)."""

    model: dict[str, str]
    modules: list[dict[str, Any]]
    projection: dict[str, Any]
    dtype: str
    dim: int
    per_token: bool = False
    normalizer: str | None = None
    preconditioner: str | None = None
    unit_normalized: bool = False
    train_time: bool = False  # rows written while the model trained: also step, epoch and lr columns
    data: dict[str, Any] = field(default_factory=dict)
    # How to recompute such vectors (model and gradient specs, paths included);
    # informational, never compared: paths differ between machines.
    source: dict[str, Any] = field(default_factory=dict)
    kind: str = GRADIENTS
    format_version: int = FORMAT_VERSION
    rayattr_version: str = __version__

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> TableMeta:
        payload = json.loads(raw)
        version = payload.get("format_version", 0)
        if version > FORMAT_VERSION:
            raise RayattrError(
                f"{where} was written by rayattr {payload.get('rayattr_version')} (table format {version}); "
                f"this rayattr {__version__} reads format <= {FORMAT_VERSION}: upgrade rayattr"
            )
        return cls(**payload)

    def mismatches(self, other: TableMeta, fields: tuple[str, ...] = SPACE_FIELDS) -> list[str]:
        """Names of the given fields on which two tables disagree."""
        return [name for name in fields if getattr(self, name) != getattr(other, name)]


def space_of(record: TableMeta | Mapping[str, Any]) -> dict[str, Any]:
    """The space fields of a table's metadata or of a statistics manifest."""
    if isinstance(record, Mapping):
        return {name: record.get(name) for name in SPACE_FIELDS}
    return {name: getattr(record, name) for name in SPACE_FIELDS}


def space_mismatches(first: TableMeta | Mapping[str, Any], second: TableMeta | Mapping[str, Any]) -> list[str]:
    """Names of the space fields on which two tables or manifests disagree."""
    one, other = space_of(first), space_of(second)
    return [name for name in SPACE_FIELDS if one[name] != other[name]]


def require_same_space(first: TableMeta | Mapping[str, Any], second: TableMeta | Mapping[str, Any],
                       what: str, fix: str) -> None:
    """Raise ``"{what} disagree on <fields>; {fix}"`` unless both live in one space."""
    differing = space_mismatches(first, second)
    if differing:
        raise RayattrError(f"{what} disagree on {', '.join(differing)}; {fix}")
