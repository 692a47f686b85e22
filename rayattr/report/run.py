"""What a run path records about its run, for the report: the config that names its model and data,
its step markers (timings) and completion records (counts), and how its query vectors were made.

The score table keeps only a fingerprint of the training data, so the texts come from the run's
config: ``RUN_PATH/trackstar.yaml``, or the config a ``score`` or ``magic`` run was made from. That
config is checked against the score table's fingerprints before any text is shown beside a score.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from rayattr import storage
from rayattr.commands import STEPS_DIR, TRACKSTAR_CONFIG, MagicConfig, ScoreConfig, TrackstarSpec, load_config
from rayattr.config import DataSpec, ModelSpec, RayattrError, from_dict, stable_hash
from rayattr.space import TableMeta
from rayattr.store import GRADIENTS, RECORDS_DIR, Completion, GradientTable, ScoreMeta, table_exists

TRACKSTAR_QUERY = "query"  # where a trackstar run keeps its query vectors, under its run path
# The order trackstar runs its steps in; the markers do not record it.
STEP_ORDER = {name: i for i, name in enumerate(("normalizer", "index_stats", "query_stats", "mixed", "query", "score"))}


@dataclass(frozen=True)
class Step:
    """A completed trackstar step, as its marker records it."""

    name: str
    seconds: float
    detail: dict[str, Any]


@dataclass(frozen=True)
class RunRecord:
    """A scored run: where its texts are, which model read them, and what it recorded on the way."""

    run_path: str
    command: str  # trackstar, score or magic
    config: Any
    config_path: str
    model: ModelSpec | None  # whose tokenizer splits the texts (None: the run names no model)
    train: DataSpec
    query: DataSpec | None  # None: the run names no query texts (self-influence, a query table without data)
    query_meta: TableMeta | None  # how the query vectors were made (magic has none)
    steps: list[Step]
    completions: list[Completion]


def load_run(run_path: str, scores: ScoreMeta, run_config: str | None) -> RunRecord:
    """The record of the run whose score table has ``scores`` metadata, its config read from ``run_config``
    or from the trackstar config in the run path."""
    path = run_config or storage.join(run_path, TRACKSTAR_CONFIG)
    if not storage.exists(path):
        raise RayattrError(f"{run_path} holds no {TRACKSTAR_CONFIG} naming the run's model and data; pass "
                           "--run-config CONFIG.yaml, the config the run was made from (`--save-config`)")
    command, config = load_config(path)
    if isinstance(config, TrackstarSpec):
        query_path = storage.join(run_path, TRACKSTAR_QUERY)
        query_meta = GradientTable.open(query_path).meta if table_exists(query_path, GRADIENTS) else None
        model, train, query = config.model, config.train, config.query
    elif isinstance(config, MagicConfig):
        model, train, query, query_meta = config.model, config.train, config.query, None
    elif isinstance(config, ScoreConfig):
        model, train = _scored_data(config)
        query_meta = GradientTable.open(config.query_path).meta if config.query_path else None
        query = from_dict(DataSpec, query_meta.data) if query_meta and query_meta.data else None
    else:
        raise RayattrError(f"{path} configures `{command}`, which writes no scores; pass the config of the trackstar, "
                           f"score or magic run that wrote {run_path}")
    expected = ({"fingerprint": config.fingerprint} if isinstance(config, MagicConfig) else
                {"index": getattr(config, "index_path", None) or stable_hash(dataclasses.asdict(train))})
    if any(scores.settings.get(key) != value for key, value in expected.items()):
        raise RayattrError(f"{path} describes another run than the scores in {run_path} (other training data or "
                           "settings); pass the config that run was made from")
    return RunRecord(run_path, command, config, path, model, train, query, query_meta, _steps(run_path),
                     _completions(run_path))


def _scored_data(config: ScoreConfig) -> tuple[ModelSpec | None, DataSpec]:
    """The model and training data of a score run: its spec, or the metadata of the table it scored."""
    if config.spec is not None:
        return config.spec.model, config.spec.data
    index = GradientTable.open(config.index_path).meta
    model = index.source.get("model")
    return (from_dict(ModelSpec, model) if model else None), from_dict(DataSpec, index.data)


def _steps(run_path: str) -> list[Step]:
    root = storage.join(run_path, STEPS_DIR)
    records = {name[: -len(".json")]: json.loads(storage.read_bytes(storage.join(root, name)))
               for name in storage.list_files(root, ".json")}
    return sorted((Step(name, record["seconds"], record["detail"]) for name, record in records.items()),
                  key=lambda step: STEP_ORDER.get(step.name, len(STEP_ORDER)))



def _completions(run_path: str) -> list[Completion]:
    names = storage.list_files(storage.join(run_path, RECORDS_DIR), ".json")
    return [record for name in names if (record := Completion.load(run_path, name[: -len(".json")])) is not None]
