"""rayattr side by side with its peers, Bergson 2.5.1 and kronfluence 1.0.1, on the fact-tracing fixtures.

Each method runs as the same job in each tool, every tool as command-line
subprocesses (the peers in their own virtual environments under the
benchmark cache, made on first use and reused after), on the fine-tuned
fixture GPT-NeoX and every query x training document of a fixture variant:

* TrackStar, each tool at its defaults: ``rayattr trackstar`` (projection 45
  per side with 4-bit rows, no normalizer without an optimizer state, every
  Linear including the output head, crossing rank 100, cosine with the mixed
  ``H^-1/2`` on both sides) and ``bergson trackstar`` (projection 16, float32
  rows, output head skipped, crossing rank 1000, inner product with the mixed
  ``H^-1`` on the query);
* ``full`` only: the same with the conventions made equal (no normalizer, no
  output head, cosine), plus rayattr with another projection seed, whose
  correlation with seed 0 is what random projection alone leaves;
* TrackStar at projection 0 on the ``attention.dense`` modules (a dense
  4,096 x 4,096 second moment each), no normalizer, cosine, Bergson's
  crossing rank: ``rayattr trackstar --projection-dim 0``, and Bergson's steps
  run one by one (its trackstar refuses projection 0): hessian of train and of
  queries, mix, query build, score;
* EK-FAC influence at projection 0 without the output head, ``g_q^T H^-1
  g_train``, damping 0.1 x each module's mean eigenvalue: ``rayattr hessian
  --method ekfac`` then ``rayattr score --hessian-path``, and kronfluence
  (``peer_tools.py`` as its runner) with the empirical and the true Fisher.

Rows give fact-tracing quality of each full score matrix (recall@1,
recall@10, MRR), the correlation of a job's matrix with rayattr's for the same
method (Pearson and Spearman over all query x document pairs, and the mean
per-query Pearson), and each job's wall time, start-up included. CPU only;
``small`` takes ~22 min on 2 cores. ``peer_fidelity.py`` compares the stored
rows themselves.

    PYTHONPATH=benchmarks:. python benchmarks/peers.py [--size small|full] [--variants easy hard]
        [--skip-install] [--workers 1] [--workdir DIR]

Writes results/peers.json (small) or results/peers_full.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from rich.table import Table

from common import HEAD_MODULES, write_results
from peer_tools import PEERS, bergson_inputs, bergson_scores, ensure_venv, peer_env, run_steps
from rayattr.fixtures import Fixture, default_cache_dir, fact_tracing_quality, make_fixture, train_fixture_model
from rayattr.codec import vectors_of
from rayattr.config import TRACKSTAR_GRADS
from rayattr.store import SCORES, ScoreTable

METRICS = ("recall@1", "recall@10", "mrr")
CORRELATIONS = ("pearson", "spearman", "query_pearson")
DENSE = "*attention.dense"  # the modules of the projection-0 TrackStar job
HEAD = [flag for module in HEAD_MODULES for flag in ("--exclude-modules", module)]
BERGSON_SKIPS = "*query_key_value,*mlp*"  # Bergson names what to leave out; these leave the attention.dense modules
BERGSON_CROSSING = 1000  # Bergson's target_downweight_components (rayattr's default is 100)


@dataclass(frozen=True)
class Size:
    """What one ``--size`` runs."""

    variants: tuple[str, ...]
    matched: bool  # also TrackStar at projection 16 with the two tools' conventions made the same


SIZES = {"small": Size(("easy", "hard"), False), "full": Size(("easy", "hard"), True)}


@dataclass
class Context:
    """One fixture variant's inputs and where its jobs write."""

    fixture: Fixture
    model: Path
    root: Path
    num_queries: int
    num_docs: int
    workers: int
    venvs: dict[str, Path]

    def rayattr(self, command: str, run: str, *args: str) -> list[str]:
        """A ``rayattr`` command line (the CLI beside this interpreter) writing into ``root/run``."""
        return [str(Path(sys.executable).with_name("rayattr")), command, str(self.root / run), "--workers",
                str(self.workers), *args]

    def model_args(self, data: Path, *columns: str) -> list[str]:
        return ["--model", str(self.model), "--dataset", str(data), *columns]

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"


Scored = tuple[np.ndarray, dict[str, float]]  # [queries, documents] scores, seconds per step


def rayattr_scores(run_path: Path, num_queries: int, num_docs: int) -> np.ndarray:
    """The full ``scores`` table of a rayattr run as ``[queries, documents]`` (query ids are row indices)."""
    table = ScoreTable.open(str(run_path), SCORES)
    matrix = np.full((num_docs, table.meta.width), np.nan)
    for batch in table.iter_batches(["id", "scores"]):
        matrix[batch.column("id").to_numpy()] = vectors_of(batch.column("scores"), table.meta.width)
    order = np.argsort(table.meta.query_ids)
    if len(order) != num_queries or np.isnan(matrix).any():
        raise SystemExit(f"{run_path} does not score every query against every document")
    return matrix[:, order].T


def rayattr_trackstar(ctx: Context, name: str, *extra: str) -> Scored:
    queries = ["--query-dataset", str(ctx.fixture.queries), "--query-prompt-column", "prompt",
               "--query-completion-column", "completion"]
    argv = ctx.rayattr("trackstar", name, *ctx.model_args(ctx.fixture.train), *queries, *extra)
    seconds = run_steps([("trackstar", argv)], ctx.log(name))
    return rayattr_scores(ctx.root / name, ctx.num_queries, ctx.num_docs), seconds


def rayattr_ekfac(ctx: Context) -> Scored:
    full = ["--projection-dim", "0", *HEAD]
    train = ctx.model_args(ctx.fixture.train)
    queries = ctx.model_args(ctx.fixture.queries, "--prompt-column", "prompt", "--completion-column", "completion")
    seconds = run_steps([
        ("hessian", ctx.rayattr("hessian", "ekfac/stats", *train, "--method", "ekfac", *full)),
        ("reduce", ctx.rayattr("reduce", "ekfac/query", *queries, "--aggregation", "none", *full)),
        ("score", ctx.rayattr("score", "ekfac/scores", "--query-path", str(ctx.root / "ekfac/query"), *train,
                              "--hessian-path", str(ctx.root / "ekfac/stats"), *full)),
    ], ctx.log("rayattr-ekfac"))
    return rayattr_scores(ctx.root / "ekfac/scores", ctx.num_queries, ctx.num_docs), seconds


def bergson_data(ctx: Context) -> tuple[list[str], list[str], Path]:
    """Bergson's train and query data flags, and its model copy."""
    inputs = ctx.root / "bergson-inputs"
    train, queries, model = bergson_inputs(ctx.fixture.train, ctx.fixture.queries, ctx.model, inputs)
    return (["--dataset", str(train), "--prompt_column", "text"],
            ["--dataset", str(queries), "--prompt_column", "prompt", "--completion_column", "completion"], model)


def bergson(ctx: Context, *args: str) -> list[str]:
    return [str(ctx.venvs["bergson"] / "bin" / "bergson"), *args]


def bergson_trackstar(ctx: Context, name: str, *extra: str) -> Scored:
    train, queries, model = bergson_data(ctx)
    run = ctx.root / name
    argv = bergson(ctx, "trackstar", str(run), "--model", str(model), "--data.dataset", train[1],
                   "--data.prompt_column", "text", "--query.dataset", queries[1], "--query.prompt_column", "prompt",
                   "--query.completion_column", "completion", "--nproc_per_node", "1", "--score", "individual",
                   "--token_batch_size", "256", *extra)
    seconds = run_steps([("trackstar", argv)], ctx.log(name), peer_env(ctx.venvs["bergson"]))
    return bergson_scores(run / "scores", ctx.num_queries), seconds


def bergson_trackstar_p0(ctx: Context) -> Scored:
    """Bergson's trackstar steps by hand at projection 0, cosine (``--unit_normalize``) like rayattr's."""
    train, queries, model = bergson_data(ctx)
    run = ctx.root / "bergson-p0"
    common = ["--model", str(model), "--projection_dim", "0", "--filter_modules", BERGSON_SKIPS,
              "--nproc_per_node", "1", "--token_batch_size", "256"]
    index_h, query_h, mixed = (str(run / name) for name in ("value_hessian", "query_hessian", "mixed_hessian"))
    autocorrelation = ["--method", "autocorrelation", *common]
    cosine = ["--hessian_path", mixed, "--unit_normalize", "true"]
    seconds = run_steps([
        ("train hessian", bergson(ctx, "hessian", index_h, *train, *autocorrelation)),
        ("query hessian", bergson(ctx, "hessian", query_h, *queries, *autocorrelation)),
        ("mix", bergson(ctx, "mix", "--query_path", query_h, "--index_path", index_h, "--output_path", mixed)),
        ("query", bergson(ctx, "build", str(run / "query"), *queries, *common, *cosine)),
        ("score", bergson(ctx, "score", str(run / "scores"), "--query_path", str(run / "query"),
                          "--score", "individual", *train, *common, *cosine)),
    ], ctx.log("bergson-p0"), peer_env(ctx.venvs["bergson"]))
    return bergson_scores(run / "scores", ctx.num_queries), seconds


def kronfluence_ekfac(ctx: Context, fisher: str) -> Scored:
    venv = ctx.venvs["kronfluence"]
    out = ctx.root / f"kronfluence-{fisher}.npy"
    argv = [str(venv / "bin" / "python"), str(Path(__file__).with_name("peer_tools.py")), "--model", str(ctx.model),
            "--train", str(ctx.fixture.train), "--queries", str(ctx.fixture.queries), "--out", str(out),
            "--fisher", fisher]
    seconds = run_steps([("ekfac", argv)], ctx.log(f"kronfluence-{fisher}"), peer_env(venv))
    return np.load(out), seconds


@dataclass(frozen=True)
class Job:
    tool: str
    run: Callable[[Context], Scored]


def methods(size: Size) -> dict[str, list[Job]]:
    """Each method's jobs, rayattr's first: the peers' scores are correlated with it."""
    matched = {"TrackStar p=16, matched (no normalizer, no head, cosine)": [
        Job("rayattr", lambda c: rayattr_trackstar(c, "trackstar-p16-matched", "--normalizer", "none", *HEAD)),
        Job("Bergson --unit_normalize",
            lambda c: bergson_trackstar(c, "bergson-p16-cosine", "--unit_normalize", "true")),
        Job("rayattr --seed 1 (projection noise)",
            lambda c: rayattr_trackstar(c, "trackstar-p16-seed1", "--normalizer", "none", "--seed", "1", *HEAD)),
    ]} if size.matched else {}
    return {
        f"TrackStar, defaults (rayattr p={TRACKSTAR_GRADS.projection_dim} {TRACKSTAR_GRADS.dtype}, Bergson p=16)": [
            Job("rayattr", lambda c: rayattr_trackstar(c, "trackstar-default")),
            Job("Bergson", lambda c: bergson_trackstar(c, "bergson-p16"))],
        **matched,
        "TrackStar p=0, attention.dense, no normalizer": [
            Job("rayattr", lambda c: rayattr_trackstar(c, "trackstar-p0", "--projection-dim", "0", "--dtype", "float32",
                                                       "--normalizer", "none", "--modules", DENSE,
                                                       "--target-downweight-components", str(BERGSON_CROSSING))),
            Job("Bergson, steps by hand", bergson_trackstar_p0)],
        "EK-FAC influence p=0, no head": [
            Job("rayattr", rayattr_ekfac),
            Job("kronfluence, empirical Fisher", lambda c: kronfluence_ekfac(c, "empirical")),
            Job("kronfluence, true Fisher", lambda c: kronfluence_ekfac(c, "true"))],
    }


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks along the last axis (ties broken by position; scores are floats)."""
    out = np.empty_like(x)
    np.put_along_axis(out, np.argsort(x, axis=-1), np.arange(x.shape[-1], dtype=x.dtype), axis=-1)
    return out


def correlations(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman over every query x document pair, and the mean of each query's Pearson."""
    flat = reference.ravel(), other.ravel()
    centred = [m - m.mean(1, keepdims=True) for m in (reference, other)]
    per_query = (centred[0] * centred[1]).sum(1) / np.sqrt((centred[0] ** 2).sum(1) * (centred[1] ** 2).sum(1))
    return {"pearson": float(np.corrcoef(*flat)[0, 1]),
            "spearman": float(np.corrcoef(ranks(flat[0]), ranks(flat[1]))[0, 1]),
            "query_pearson": float(per_query.mean())}


def variant_context(variant: str, root: Path, workers: int, venvs: dict[str, Path]) -> Context:
    """A fixture variant (made and fine-tuned on first use) and where its jobs write."""
    fixture = make_fixture(default_cache_dir(), variant=variant)
    return Context(fixture, train_fixture_model(fixture), root / variant, pq.read_metadata(fixture.queries).num_rows,
                   pq.read_metadata(fixture.train).num_rows, workers, venvs)


def peer_venvs(args: argparse.Namespace) -> dict[str, Path]:
    """Each peer's environment under the benchmark cache (made unless ``--skip-install``)."""
    root = default_cache_dir().parent / "peers"
    return {name: ensure_venv(peer, root, args.torch, not args.skip_install) for name, peer in PEERS.items()}


def run_variant(variant: str, size: Size, root: Path, workers: int, venvs: dict[str, Path]) -> list[dict]:
    """Every method's jobs on one fixture variant."""
    ctx = variant_context(variant, root, workers, venvs)
    fixture = ctx.fixture
    ids = np.arange(ctx.num_queries)
    rows = []
    for method, jobs in methods(size).items():
        reference = None
        for job in jobs:
            print(f"{variant}: {method}: {job.tool}", flush=True)
            scores, seconds = job.run(ctx)
            quality = fact_tracing_quality(fixture, ids, np.argsort(-scores, axis=1, kind="stable"))
            row = {"variant": variant, "method": method, "tool": job.tool, "wall_s": sum(seconds.values()),
                   "steps_s": seconds} | {m: quality[m] for m in METRICS}
            if reference is None:
                reference = scores
            else:
                row |= correlations(reference, scores)
            rows.append(row)
    return rows


def report_table(report: dict) -> Table:
    table = Table("variant", "method", "tool", *METRICS, "Pearson", "Spearman", "per-query Pearson", "wall s",
                  title=report["title"])
    for row in report["rows"]:
        corr = [f"{row[c]:.4f}" if c in row else "" for c in CORRELATIONS]
        table.add_row(row["variant"], row["method"], row["tool"], *[f"{row[m]:.3f}" for m in METRICS], *corr,
                      f"{row['wall_s']:.0f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=SIZES)
    parser.add_argument("--variants", nargs="+", choices=["easy", "hard"], help="default: the size's")
    parser.add_argument("--skip-install", action="store_true", help="use the peers' environments as they are")
    parser.add_argument("--torch", default="torch==2.13.0", help="what the peers' environments install torch from")
    parser.add_argument("--workers", type=int, default=1, help="rayattr workers (each peer runs one process)")
    parser.add_argument("--workdir", help="keep every job's output in this new directory (default: a temporary one)")
    args = parser.parse_args()
    if args.workdir and Path(args.workdir).exists() and any(Path(args.workdir).iterdir()):
        raise SystemExit(f"{args.workdir} is not empty: the tools refuse to write over earlier runs")
    started = time.perf_counter()
    size = SIZES[args.size]
    venvs = peer_venvs(args)
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        root = Path(args.workdir or tmp)
        rows = [row for variant in args.variants or size.variants
                for row in run_variant(variant, size, root, args.workers, venvs)]
    report = {
        "size": args.size, "workers": args.workers, "versions": {name: peer.version for name, peer in PEERS.items()},
        "title": (f"rayattr, Bergson {PEERS['bergson'].version} and kronfluence {PEERS['kronfluence'].version} on the "
                  "fact-tracing fixtures (all queries x documents); correlations with rayattr's scores for the method"),
        "rows": rows, "wall_s": time.perf_counter() - started,
    }
    write_results("peers", args.size, report, [report_table(report)])


if __name__ == "__main__":
    main()
