"""Fact-tracing quality per method on the fixture, and on-the-fly scoring throughput.

The fixture's queries (prompt + completion, loss on the completion) are ranked
against every training document of the fine-tuned fixture GPT-NeoX's corpus,
and each full ranking is compared with the ground-truth supporting documents:
recall@1, recall@10 and MRR. Rows:

* ideal: each query's supporting documents first (recall@1 is at most 1 / |support|);
* random: the exact expectation under a uniformly random ranking (no sampling);
* BM25 Okapi on lower-cased words (``benchmarks/bm25.py``), query = prompt + completion;
* projection 16 (Kronecker, as ``rayattr build``): inner product, cosine,
  cosine with the Adafactor normalizer from the fine-tune's AdamW state,
  cosine with the index second moment ``H_index^-1/2`` on both sides (without
  and with the normalizer), TrackStar (normalizer, mixed query/index second
  moment) at the default ``target_downweight_components`` and, in ``full``, a
  sweep of it, each with its mixing coefficient lambda;
* projection 0 (``full`` only): inner product of full gradients, and EK-FAC
  influence, ``g_q^T H_EKFAC^-1 g_train`` with the EK-FAC inverse (fitted on the
  training set, damping 0.1 x mean eigenvalue) on the query side, scored on the
  fly because a 2,200 x 247,296 table is not worth storing.

Projection-16 rows score built tables (``index_path``; equal to on-the-fly
scores by tests/ray/test_score.py); the throughput rows time the two builds and an
on-the-fly score of the same corpus with TrackStar's settings and workers.
``small`` (50 queries, no sweep, no projection-0 rows) takes a few minutes on 2
CPU cores; ``full`` runs everything.

    PYTHONPATH=benchmarks:. python benchmarks/fact_tracing.py [--variant easy] [--size small|full]
        [--device cpu|cuda] [--workers 2]

Writes results/fact_tracing_<variant>.json (small) or fact_tracing_<variant>_full.json, and a PNG beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
from rich.console import Console
from rich.table import Table

from bm25 import BM25, words
from common import pyplot, write_results
from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
from rayattr.fixtures import Fixture, default_cache_dir, fact_tracing_quality, make_fixture, train_fixture_model
from rayattr.grads.normalizer import from_optimizer_state
from rayattr.hessian.mixing import mix_stats
from rayattr.model import load_model
from rayattr.ray.entry import build, fit, score
from rayattr.ray.pipeline import ensure_ray
from rayattr.ray.progress import BuildProgress
from rayattr.ray.score import ScoreResult, ScoreSettings, reduce

KS = (1, 10)
METRICS = tuple(f"recall@{k}" for k in KS) + ("mrr",)
DEFAULT_TARGET = 1000  # mix_stats' default target_downweight_components: the main TrackStar row


@dataclass(frozen=True)
class Size:
    """What one ``--size`` runs."""

    queries: int | None  # the first queries of the fixture; None: all of them
    targets: tuple[int, ...]  # target_downweight_components swept besides the default
    full_gradients: bool  # the projection-0 rows (inner product, EK-FAC influence)


SIZES = {"small": Size(50, (), False), "full": Size(None, (10, 100, 300), True)}


@dataclass
class Run:
    """What every step of one benchmark run shares: specs, a scratch directory, the worker count."""

    fixture: Fixture
    root: Path
    model: ModelSpec
    train: DataSpec
    queries: DataSpec
    workers: int
    num_docs: int
    scored: int = 0

    def path(self, name: str) -> str:
        return str(self.root / name)

    def reduce_queries(self, name: str, grads: GradSpec) -> None:
        """Per-query rows (no aggregation) in ``query-<name>``."""
        reduce(self.path(f"query-{name}"), RunSpec(self.model, self.queries, grads), aggregation="none",
               workers=self.workers)

    def build_index(self, name: str, grads: GradSpec) -> BuildProgress:
        """The training gradients in ``index-<name>``; the build's progress times it."""
        return build(self.path(f"index-{name}"), RunSpec(self.model, self.train, grads), workers=self.workers)

    def fit_stats(self, name: str, data: DataSpec, grads: GradSpec, method: str = "second-moment") -> str:
        """``method`` statistics of ``data`` in the sub-directory ``name``; returns its path."""
        fit(self.path(name), RunSpec(self.model, data, grads), method, workers=self.workers)
        return self.path(name)

    def score_side(self, side: str, settings: ScoreSettings, spec: RunSpec | None = None) -> ScoreResult:
        """Score ``query-<side>`` against ``index-<side>``, or on the fly with ``spec``, into a fresh sub-run."""
        source = {"spec": spec} if spec else {"index_path": self.path(f"index-{side}")}
        self.scored += 1
        return score(self.path(f"scores-{self.scored}"), self.path(f"query-{side}"), settings,
                     workers=self.workers, **source)

    def rank(self, label: str, side: str, settings: ScoreSettings, spec: RunSpec | None = None) -> dict:
        """The quality row of one scoring."""
        result = self.score_side(side, settings, spec)
        return {"method": label} | fact_tracing_quality(self.fixture, result.query_ids, result.topk.ids, KS)


def reference_rows(fixture: Fixture, first: dict, num_docs: int) -> list[dict]:
    """The ceiling (supporting documents first: recall@1 is at most 1 / |support|), the random
    expectation (carried by every quality dict) and BM25, on the same queries as ``first``."""
    count = first["queries"]
    supports = list(json.loads(fixture.ground_truth.read_text()).values())[:count]  # in query order
    ideal = np.stack([np.r_[s, np.setdiff1d(np.arange(num_docs), s)] for s in supports])
    texts = pq.read_table(fixture.train, columns=["text"]).column("text").to_pylist()
    index = BM25(words(text) for text in texts)
    queries = pq.read_table(fixture.queries, columns=["prompt", "completion"]).to_pylist()[:count]
    lexical = np.stack([index.rank(words(q["prompt"] + q["completion"])) for q in queries])
    random = {"method": "random (expected)", "queries": count} | {m: first[f"random_{m}"] for m in METRICS}
    ids = np.arange(count)
    return [{"method": "ideal (supporting documents first)"} | fact_tracing_quality(fixture, ids, ideal, KS),
            random,
            {"method": "BM25 (words of prompt + completion)"} | fact_tracing_quality(fixture, ids, lexical, KS)]


def normalizer(run: Run) -> str:
    """The Adafactor normalizer from the fine-tune's AdamW state, saved in the run."""
    model = load_model(dataclasses.replace(run.model, device="cpu"))
    from_optimizer_state(Path(run.model.model) / "optimizer.pt", model).save(run.path("normalizer"))
    return run.path("normalizer")


def projected_rows(run: Run, projection_dim: int, size: Size) -> tuple[list[dict], list[dict], dict]:
    """Projection-``projection_dim`` rows, the TrackStar mixing coefficients, and the throughput passes."""
    grads = {"raw": GradSpec(projection_dim=projection_dim),
             "norm": GradSpec(projection_dim=projection_dim, normalizer=normalizer(run))}
    timings = {}
    for name, spec in grads.items():
        timings[f"build {name}"] = run.build_index(name, spec)
        run.reduce_queries(name, spec)
    index_stats = {name: run.fit_stats(f"index-stats-{name}", run.train, spec) for name, spec in grads.items()}
    ranked = ScoreSettings(top_k=run.num_docs)  # full rankings: MRR is exact, not cut at a depth
    cosine = dataclasses.replace(ranked, unit_normalize=True)
    rows = [
        run.rank("inner product", "raw", ranked),
        run.rank("cosine", "raw", cosine),
        run.rank("cosine + normalizer", "norm", cosine),
        run.rank("cosine + H_index^-1/2", "raw", dataclasses.replace(cosine, hessian=index_stats["raw"])),
        run.rank("cosine + normalizer + H_index^-1/2", "norm", dataclasses.replace(cosine, hessian=index_stats["norm"])),
    ]
    query_stats = run.fit_stats("query-stats", run.queries, grads["norm"])
    mixes = [mix(run, query_stats, index_stats["norm"], target) for target in (DEFAULT_TARGET, *size.targets)]
    for entry in mixes:
        target, lam = entry["target_downweight_components"], entry["lambda"]
        label = "TrackStar (mixed H" + ("" if target == DEFAULT_TARGET else f", target {target}") + f", lambda {lam:.3f})"
        rows.append(run.rank(label, "norm", dataclasses.replace(cosine, hessian=run.path(f"mixed-{target}"))))
    trackstar = dataclasses.replace(cosine, hessian=run.path(f"mixed-{DEFAULT_TARGET}"))
    timings["score on the fly"] = run.score_side("norm", trackstar, RunSpec(run.model, run.train, grads["norm"])).progress
    return rows, mixes, timings


def mix(run: Run, query_stats: str, index_stats: str, target: int) -> dict:
    """TrackStar's mixed second moment for one ``target_downweight_components``, saved as ``mixed-<target>``."""
    lam, k = mix_stats(query_stats, index_stats, run.path(f"mixed-{target}"), target_downweight_components=target)
    return {"target_downweight_components": target, "k": k, "lambda": lam}


def full_gradient_rows(run: Run) -> list[dict]:
    """Full gradients (projection 0), scored on the fly: plain inner product, then classical influence."""
    full = GradSpec(projection_dim=0)
    run.reduce_queries("full", full)
    ekfac = run.fit_stats("ekfac", run.train, full, "ekfac")
    spec = RunSpec(run.model, run.train, full)
    ranked = ScoreSettings(top_k=run.num_docs)
    return [run.rank("inner product, p=0", "full", ranked, spec),
            run.rank("EK-FAC influence (H^-1 on the query), p=0", "full", dataclasses.replace(ranked, hessian=ekfac), spec)]


def report_tables(report: dict) -> list[Table]:
    """The quality table, the mixing coefficients behind the TrackStar rows, and the throughput passes."""
    quality = Table("method", *METRICS, title=report["title"])
    for row in report["quality"]:
        quality.add_row(row["method"], *[f"{row[m]:.3f}" for m in METRICS])
    mixing = Table("target_downweight_components", "k used", "lambda", title="TrackStar mixing coefficients")
    for entry in report["trackstar"]:
        mixing.add_row(str(entry["target_downweight_components"]), str(entry["k"]), f"{entry['lambda']:.4f}")
    speed = Table("pass", "tokens", "wall s", "tokens/s", "ratio to build",
                  title=f"{report['workers']} worker(s), end to end; whole run {report['wall_s']:.0f} s")
    reference = report["throughput"]["build norm"]["tokens_per_second"]
    for name, p in report["throughput"].items():
        speed.add_row(name, f"{p['tokens']:,}", f"{p['seconds']:.1f}", f"{p['tokens_per_second']:,.0f}",
                      f"{p['tokens_per_second'] / reference:.2f}")
    return [quality, mixing, speed]


def plot(report: dict, path: Path, console: Console) -> None:
    """Grouped horizontal bars: one group per method, one bar per metric."""
    plt = pyplot(console)
    if plt is None:
        return
    rows = report["quality"]
    y = np.arange(len(rows))
    height = 0.8 / len(METRICS)
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.5 * len(rows)))
    for i, metric in enumerate(METRICS):
        ax.barh(y + (i - (len(METRICS) - 1) / 2) * height, [row[metric] for row in rows], height, label=metric)
    ax.set(yticks=y, yticklabels=[row["method"] for row in rows], xlim=(0, 1), title=report["title"])
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    console.print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="easy", choices=["easy", "hard"])
    parser.add_argument("--size", default="small", choices=SIZES)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--projection-dim", type=int, default=16)
    args = parser.parse_args()
    started = time.perf_counter()
    size = SIZES[args.size]
    fixture = make_fixture(default_cache_dir(), variant=args.variant)
    model = ModelSpec(str(train_fixture_model(fixture)), device=args.device)
    split = f"train[:{size.queries}]" if size.queries else "train"
    queries = DataSpec(str(fixture.queries), split=split, prompt_column="prompt", completion_column="completion")
    num_docs = pq.read_metadata(fixture.train).num_rows
    ensure_ray()
    with tempfile.TemporaryDirectory(prefix="fact-tracing-") as tmp:
        run = Run(fixture, Path(tmp), model, DataSpec(str(fixture.train)), queries, args.workers, num_docs)
        rows, mixes, timings = projected_rows(run, args.projection_dim, size)
        rows += full_gradient_rows(run) if size.full_gradients else []
        ray.shutdown()
    rows = reference_rows(fixture, rows[0], num_docs) + rows
    report = {
        "variant": args.variant, "size": args.size, "device": args.device, "projection_dim": args.projection_dim,
        "workers": args.workers, "queries": rows[0]["queries"], "documents": num_docs,
        "title": (f"fact tracing, {args.variant} fixture: {rows[0]['queries']} queries x {num_docs:,} documents, "
                  f"projection {args.projection_dim} unless p=0"),
        "random": "exact expectation under a uniformly random full ranking",
        "quality": [{"method": row["method"]} | {m: row[m] for m in METRICS} for row in rows],
        "trackstar": mixes,
        "throughput": {name: {"tokens": p.tokens, "seconds": p.seconds, "tokens_per_second": p.tokens_per_second}
                       for name, p in timings.items()},
        "wall_s": time.perf_counter() - started,
    }
    out = write_results(f"fact_tracing_{args.variant}", args.size, report, report_tables(report))
    plot(report, out.with_suffix(".png"), Console())

if __name__ == "__main__":
    main()
