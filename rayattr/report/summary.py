"""The index page's account of a run, each fact from where the run records it: the method and settings
(the score table's metadata and the run's config), the model and data (the config), projection and
normalizer (the query table's metadata), mixing and sample sizes (trackstar's step markers) and the
counts (the tables and their completion records)."""

from __future__ import annotations

from typing import Any

from rayattr.commands import TrackstarSpec
from rayattr.config import DataSpec, GradSpec, ModelSpec
from rayattr.report.run import RunRecord, Step
from rayattr.store import SCORES, ScoreMeta

METHODS = {"trackstar": "TrackStar (rayattr trackstar)", "score": "gradient scoring (rayattr score)",
           "magic": "MAGIC metagradients (rayattr magic)"}
MODES = {"individual": "a score per query", "mean": "the mean over the queries",
         "nearest": "the nearest query's (max over queries)", "self": "self-influence g^T H^-1 g"}


def run_facts(record: RunRecord, meta: ScoreMeta, rows: int, reported: int, per_token: bool) -> list[tuple[str, str]]:
    """``(what, value)`` pairs, plain text, in the order the page lists them."""
    config, settings = record.config, meta.settings
    facts = [("method", METHODS[record.command])]
    if record.command == "magic":
        facts.append(("scores", "minus the metagradient of each query's loss in each training document's weight"))
    else:
        facts.append(("scores", _scoring(settings)))
    facts += [("model", _model(record.model)), ("training data", _data(record.train))]
    if record.query is not None:
        facts.append(("query data", _data(record.query)))
    grads = config.grads if isinstance(config, TrackstarSpec) else getattr(getattr(config, "spec", None), "grads", None)
    facts += _space(record, grads)
    if isinstance(config, TrackstarSpec):
        facts += _trackstar(config, {step.name: step for step in record.steps})
    done = next((c for c in record.completions if c.table == SCORES), None)
    scored = f"{rows:,}" + ("" if done is None else f" ({len(done.skipped):,} skipped with no loss token, "
                                                     f"{len(done.non_finite):,} left out for a non-finite gradient)")
    facts += [("training rows scored", scored),
              ("queries", f"{len(meta.query_ids):,} ({reported:,} in this report)"),
              ("per-token scores", "yes (table token_scores)" if per_token else "no"),
              ("written by", f"rayattr {meta.rayattr_version}")]
    return facts


def _scoring(settings: dict[str, Any]) -> str:
    mode = MODES.get(settings.get("mode"), str(settings.get("mode")))
    similarity = "cosine (unit-normalized, H^-1/2 on both sides)" if settings.get("unit_normalize") else "inner product"
    preconditioner = settings.get("preconditioner")
    return f"{mode}; {similarity}; " + (f"preconditioner {preconditioner}" if preconditioner else "no preconditioner")


def _model(spec: ModelSpec | None) -> str:
    if spec is None:
        return "not recorded"
    return spec.model + (f" @ {spec.revision}" if spec.revision else "") + f" ({spec.precision})"


def _data(spec: DataSpec) -> str:
    return f"{spec.dataset} [{spec.split}], columns {', '.join(spec.document_columns)}"


def _space(record: RunRecord, grads: GradSpec | None) -> list[tuple[str, str]]:
    """Projection, modules and normalizer: as the query table records them, else as the config asked."""
    facts = []
    meta = record.query_meta
    if meta is not None:
        projection = ", ".join(f"{key} {value}" for key, value in sorted(meta.projection.items())
                               if key != "fingerprint")
        facts.append(("projection", f"{projection or 'none'}; {meta.dim:,} numbers per row over "
                                    f"{len(meta.modules)} modules"))
    elif grads is not None:
        facts.append(("projection", f"type {grads.projection_type}, dim {grads.projection_dim}"))
    if grads is not None:
        modules = ", ".join(grads.modules)
        facts.append(("training rows", f"{grads.dtype} ({grads.loss_reduction} loss, modules {modules})"))
    if meta is not None:
        facts.append(("normalizer", f"fingerprint {meta.normalizer}" if meta.normalizer else "none"))
    return facts


def _trackstar(config: TrackstarSpec, steps: dict[str, Step]) -> list[tuple[str, str]]:
    facts = []
    if config.normalizer != "none":
        source = steps["normalizer"].detail.get("source", "") if "normalizer" in steps else ""
        facts.append(("normalizer kind", f"{config.normalizer}" + (f", from {source}" if source else "")))
    sample = steps["index_stats"].detail if "index_stats" in steps else {}
    facts.append(("index statistics", f"second moments of the first {config.stats_sample_size:,} training rows"
                  + (f" ({sample['examples']:,} documents, {sample['tokens']:,} tokens)" if sample else "")))
    if not config.mix:
        facts.append(("mixing", "off: index statistics only"))
    elif "mixed" in steps:
        mixed = steps["mixed"].detail
        facts.append(("mixing", f"lambda {mixed['lambda']:.4g} at eigen-rank k = {mixed['k']} "
                                f"(target_downweight_components {config.target_downweight_components})"))
    return facts
