"""The Python API: the same operations as the CLI, for notebooks and scripts."""

from __future__ import annotations

from collections.abc import Iterator

from rayattr.commands import (BuildConfig, HessianConfig, MagicConfig, ReduceConfig, ReportConfig, RetrainConfig,
                              ScoreConfig, TrackstarSpec, ValidateConfig, load_config)
from rayattr.config import RunSpec
from rayattr.data import TokenizedDocs, plan_shards, read_shard, reward_baselines, tokenize
from rayattr.grads.engine import GradientRows, engine_for
from rayattr.lds.bank import Bank
from rayattr.lds.recipe import Recipe
from rayattr.lds.validate import validate
from rayattr.model import max_positions, tokenizer_source
from rayattr.tokenizer import load_tokenizer
from rayattr.ray.entry import build, fit as fit_hessian, score
from rayattr.ray.progress import BuildProgress
from rayattr.ray.retrain import magic, retrain
from rayattr.ray.score import reduce
from rayattr.report import write_report
from rayattr.runconfig import run
from rayattr.score import ScoreSettings
from rayattr.search import Attributor, Index
from rayattr.space import TableMeta
from rayattr.store import GRADIENTS, GradientTable, read_topk
from rayattr.trackstar import trackstar

__all__ = [
    "Attributor", "Bank", "BuildConfig", "BuildProgress", "HessianConfig", "Index", "MagicConfig", "Recipe",
    "ReduceConfig", "ReportConfig", "RetrainConfig", "ScoreConfig", "ScoreSettings", "TrackstarSpec", "ValidateConfig",
    "build_index", "collect_in_process", "fit_hessian", "load_config", "magic", "open_index", "read_topk", "reduce",
    "retrain", "run", "score", "trackstar", "validate", "write_report",
]

build_index = build


def open_index(run_path: str, table: str = GRADIENTS) -> GradientTable:
    """An existing gradient table, with its metadata checked."""
    return GradientTable.open(run_path, table)


def collect_in_process(spec: RunSpec, docs_per_step: int = 1024) -> Iterator[tuple[TableMeta, GradientRows]]:
    """Stream gradient rows of ``spec.data`` computed in this process (no Ray).

    Yields ``(meta, rows)`` chunks; the rows equal what ``build_index`` writes.
    """
    engine, meta = engine_for(spec)
    tokenizer = load_tokenizer(tokenizer_source(spec.model), spec.model.revision)
    max_length = min(spec.data.max_length or 10**9, max_positions(engine.model))
    baselines = reward_baselines(spec.data)
    try:
        for shard in plan_shards(spec.data):
            for table in read_shard(spec.data, shard, batch_rows=docs_per_step):
                tokens = tokenize(table, spec.data, tokenizer, max_length, baselines)
                yield meta, engine.rows(TokenizedDocs.from_arrow(tokens))
    finally:
        engine.close()
