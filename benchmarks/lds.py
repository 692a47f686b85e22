"""Counterfactual truth: the linear datamodeling score (LDS) of each attribution method.

The job: the fixture's trained GPT-NeoX (seed-0 world) is fine-tuned on documents of another
world (the seed-1 fixture: new people, new facts) with ``rayattr.lds.recipe.Recipe``; the
queries are facts of that world (prompt + completion, loss on the completion) whose supporting
documents are in the fine-tuning set, with filler documents about other facts. A retrain bank
(``rayattr retrain``: one Ray task per run) fine-tunes on random halves of the set (the same
batch stream, the other half weighted 0) and records each query's loss, and a second bank leaves
5% out; each method scores the full set once, and ``rayattr validate`` gives its LDS on each bank
with a 95% bootstrap interval over queries.

Methods: MAGIC (exact metagradients through the fine-tune, from the initial checkpoint); at the
fine-tuned checkpoint, EK-FAC influence (p=0 and projection 16, fitted on the fine-tuning set),
TrackStar at its defaults (projection 16, summed loss) and at projection 32, cosine and inner
product of full gradients; random scores. Gradient methods other than TrackStar's defaults take
each document's mean token loss, the recipe's. TrackStar at p=0 is left out: its mixed second
moment is a dense d x d matrix per module, 149k x 149k for this model's output head.

    PYTHONPATH=benchmarks:. python benchmarks/lds.py [--size small|full] [--optimizer adam|sgd] [--workers 2]

Writes results/lds.json (small, adam), lds_sgd.json, lds_full.json ..., and a PNG beside each.
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
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from rich.console import Console
from rich.table import Table

from common import pyplot, write_results
from rayattr.commands import MagicConfig, RetrainConfig, TrackstarSpec
from rayattr.config import TRACKSTAR_GRADS, DataSpec, GradSpec, ModelSpec, RunSpec
from rayattr.fixtures import default_cache_dir, make_fixture, train_fixture_model
from rayattr.lds.inputs import read_docs
from rayattr.lds.recipe import Recipe, train
from rayattr.lds.validate import validate
from rayattr.model import load_model
from rayattr.tokenizer import load_tokenizer
from rayattr.ray.entry import fit, score
from rayattr.ray.pipeline import ensure_ray
from rayattr.ray.retrain import magic, retrain
from rayattr.ray.score import ScoreSettings, reduce
from rayattr.store import SCORES, ScoreMeta, ScoreTable
from rayattr.trackstar import trackstar

# Learning rates that fit the new facts about equally: the mean query loss goes 7.98 -> 2.16 with Adam, 2.24
# with SGD. SGD at 0.3 (-> 1.77) trains at the edge of stability: leaving one document out moved a query's
# loss 8x what its exact metagradient predicts, and no method's scores predicted the retrains.
RECIPES = {"adam": Recipe(optimizer="adam", learning_rate=1e-3, batch_size=8, epochs=2, seed=0),
           "sgd": Recipe(optimizer="sgd", learning_rate=0.1, batch_size=8, epochs=2, seed=0)}
BERGSON_PUBLISHED = {"MAGIC": 0.983, "EK-FAC": 0.474, "TrackStar": 0.184}  # its GPT-2 fine-tune table


@dataclass(frozen=True)
class Size:
    queries: int  # facts of the new world asked about
    fillers: int  # fine-tuning documents that support none of them
    runs: int  # retrained subsets in each bank


SIZES = {"small": Size(32, 48, 32), "full": Size(64, 96, 64)}
FRACTIONS = (0.5, 0.95)  # retrained on half the set (the usual LDS), and with 5% of it left out


def finetuning_set(root: Path, size: Size) -> tuple[DataSpec, DataSpec]:
    """The fine-tuning documents (every supporting document of the first queries, then fillers) and the queries."""
    world = make_fixture(default_cache_dir(), seed=1)
    truth = json.loads(world.ground_truth.read_text())
    queries = pq.read_table(world.queries).slice(0, size.queries)
    supports = sorted({doc for name in queries.column("query_id").to_pylist() for doc in truth[name]})
    documents = pq.read_table(world.train, columns=["doc_id", "text"])
    others = np.setdiff1d(documents.column("doc_id").to_numpy(), supports)
    fillers = np.random.default_rng(0).choice(others, size.fillers, replace=False)
    picked = np.sort(np.concatenate([supports, fillers]))
    pq.write_table(documents.take(picked), root / "finetune.parquet")
    pq.write_table(queries.select(["query_id", "prompt", "completion"]), root / "queries.parquet")
    return (DataSpec(str(root / "finetune.parquet")),
            DataSpec(str(root / "queries.parquet"), prompt_column="prompt", completion_column="completion"))


def finetuned(base: ModelSpec, data: DataSpec, recipe: Recipe, out: Path) -> ModelSpec:
    """The model the recipe makes from ``base`` on all of ``data``: the checkpoint gradient methods attribute."""
    model = load_model(base).requires_grad_(True)
    params = train(model, read_docs(data, base, model.config), None, recipe)
    model.load_state_dict(params, strict=False)
    model.save_pretrained(out)
    load_tokenizer(base.model).save_pretrained(out)
    return ModelSpec(str(out))


class Methods:
    """Ways to score the fine-tuning set against the queries at the fine-tuned checkpoint, each into ``path``."""

    def __init__(self, model: ModelSpec, data: DataSpec, queries: DataSpec, workers: int) -> None:
        self.model, self.data, self.queries, self.workers = model, data, queries, workers

    def gradient_scores(self, path: str, grads: GradSpec, settings: ScoreSettings, method: str | None = None) -> None:
        """Queries reduced per query (no aggregation), the fine-tuning set scored on the fly."""
        reduce(f"{path}/query", RunSpec(self.model, self.queries, grads), aggregation="none", workers=self.workers)
        if method:
            fit(f"{path}/stats", RunSpec(self.model, self.data, grads), method, workers=self.workers)
            settings = dataclasses.replace(settings, hessian=f"{path}/stats")
        score(path, f"{path}/query", settings, spec=RunSpec(self.model, self.data, grads), workers=self.workers)

    def trackstar(self, path: str, grads: GradSpec) -> None:
        trackstar(TrackstarSpec(path, self.model, self.data, self.queries, grads=grads, workers=self.workers))


def random_scores(path: str, data: DataSpec, queries: DataSpec) -> None:
    ids = np.arange(pq.read_metadata(data.dataset).num_rows)
    query_ids = list(range(pq.read_metadata(queries.dataset).num_rows))
    scores = np.random.default_rng(0).normal(size=(len(ids), len(query_ids))).astype(np.float32)
    table = ScoreTable.create(path, ScoreMeta(len(query_ids), False, query_ids, {"method": "random"}), SCORES)
    table.append(pa.table({"id": ids, "num_tokens": np.ones(len(ids), np.int32),
                           "scores": pa.FixedSizeListArray.from_arrays(scores.reshape(-1), len(query_ids))}))


def measure(args: argparse.Namespace, size: Size, root: Path) -> dict:
    recipe = RECIPES[args.optimizer]
    base = ModelSpec(str(train_fixture_model(make_fixture(default_cache_dir()))))
    data, queries = finetuning_set(root, size)
    final = finetuned(base, data, recipe, root / "finetuned")
    ensure_ray()
    bank_seconds = {}
    for fraction in FRACTIONS:  # the same recipe and queries; subsets of each size
        started = time.perf_counter()
        retrain(RetrainConfig(bank_path=str(root / f"bank-{fraction}"), model=base, train=data, query=queries,
                              recipe=recipe, runs=size.runs, fraction=fraction))
        bank_seconds[fraction] = time.perf_counter() - started
    at_final = Methods(final, data, queries, args.workers)
    mean = GradSpec(projection_dim=0, loss_reduction="mean")
    plan = [
        ("MAGIC", lambda p: magic(MagicConfig(run_path=p, model=base, train=data, query=queries, recipe=recipe,
                                              workers=args.workers))),
        ("EK-FAC influence, p=0", lambda p: at_final.gradient_scores(p, mean, ScoreSettings(), "ekfac")),
        ("EK-FAC influence, projection 16", lambda p: at_final.gradient_scores(
            p, dataclasses.replace(mean, projection_dim=16), ScoreSettings(), "ekfac")),
        ("TrackStar (defaults: projection 16, summed loss)", lambda p: at_final.trackstar(p, TRACKSTAR_GRADS)),
        ("TrackStar, projection 32", lambda p: at_final.trackstar(
            p, dataclasses.replace(TRACKSTAR_GRADS, projection_dim=32, loss_reduction="mean"))),
        ("cosine, p=0", lambda p: at_final.gradient_scores(p, mean, ScoreSettings(unit_normalize=True))),
        ("inner product, p=0", lambda p: at_final.gradient_scores(p, mean, ScoreSettings())),
        ("random", lambda p: random_scores(p, data, queries)),
    ]
    rows = []
    for number, (label, work) in enumerate(plan):
        path, started = str(root / f"method-{number}"), time.perf_counter()
        work(path)
        rows.append({"method": label, "path": path, "seconds": time.perf_counter() - started})
        Console().print(f"{label}: {rows[-1]['seconds']:.0f} s", markup=False)
    ray.shutdown()
    for row in rows:
        path = row.pop("path")
        for fraction in FRACTIONS:
            result = validate(path, str(root / f"bank-{fraction}"), seed=0).lds
            row[str(fraction)] = {"lds": result.lds, "low": result.low, "high": result.high, "queries": result.queries}
    return {"rows": rows, "bank_seconds": bank_seconds, "documents": pq.read_metadata(data.dataset).num_rows,
            "queries": size.queries, "runs": size.runs, "recipe": dataclasses.asdict(recipe),
            "fractions": list(FRACTIONS)}


def report_table(report: dict) -> Table:
    columns = [f"LDS, {fraction:.0%} kept [95% interval]" for fraction in FRACTIONS]
    table = Table("method", *columns, "wall s", "Bergson's published LDS (GPT-2 fine-tune)", title=report["title"])
    for row in report["rows"]:
        published = next((f"{v:.3f}" for k, v in BERGSON_PUBLISHED.items() if row["method"].startswith(k)), "")
        cells = [f"{row[str(f)]['lds']:.3f} [{row[str(f)]['low']:.3f}, {row[str(f)]['high']:.3f}]" for f in FRACTIONS]
        table.add_row(row["method"], *cells, f"{row['seconds']:.0f}", published)
    return table


def plot(report: dict, path: Path, console: Console) -> None:
    """Bars per method, one per subset size, with their bootstrap intervals."""
    plt = pyplot(console)
    if plt is None:
        return
    rows = report["rows"]
    y = np.arange(len(rows))
    height = 0.8 / len(FRACTIONS)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.5 * len(rows)))
    for i, fraction in enumerate(FRACTIONS):
        cells = [row[str(fraction)] for row in rows]
        lds = np.array([c["lds"] for c in cells])
        errors = np.array([[c["lds"] - c["low"] for c in cells], [c["high"] - c["lds"] for c in cells]])
        ax.barh(y + (i - (len(FRACTIONS) - 1) / 2) * height, lds, height, xerr=errors, capsize=2,
                label=f"subsets of {fraction:.0%}")
    ax.axvline(0, color="black", lw=0.8)
    ax.set(yticks=y, yticklabels=[r["method"] for r in rows], xlim=(-0.3, 1), title=report["title"], xlabel="LDS")
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    console.print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=SIZES)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--optimizer", default="adam", choices=RECIPES, help="the fine-tune's recipe (RECIPES)")
    parser.add_argument("--work-dir", help="keep the bank and the runs here (default: a temporary directory)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
        report = measure(args, SIZES[args.size], Path(args.work_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="lds-") as tmp:
            report = measure(args, SIZES[args.size], Path(tmp))
    report |= {"wall_s": time.perf_counter() - started, "workers": args.workers,
               "title": (f"LDS, {args.optimizer} fine-tune: {report['queries']} queries x {report['documents']} "
                         f"documents, {report['runs']} retrained subsets per size (95% bootstrap over queries)")}
    out = write_results("lds" if args.optimizer == "adam" else f"lds_{args.optimizer}", args.size, report,
                        [report_table(report)])
    plot(report, out.with_suffix(".png"), Console())


if __name__ == "__main__":
    main()
