"""Cost of fitting statistics relative to one plain forward+backward pass over the same data.

For each method (second moment at projection 16, K-FAC and EK-FAC at
projection 0 and 16, a normalizer fitted from data) it runs `fit` through Ray
with one worker on the fixture corpus, and reports the wall time, the worker's
own compute time (forward, backward, accumulation; EK-FAC's two passes), its
ratio to an in-process forward+backward (with weight gradients) over the same
documents and token batches, and the peak RSS of the driver and of the worker.
Then the cost of *applying* the EK-FAC fitted at projection 0 on the on-the-fly
scoring path, in process on the same documents: a scoring worker's engine rows
(full gradients) alone, and rows followed by ``H^-1/2`` and a cosine against 16
queries (TrackStar-style scoring with EK-FAC), each against the forward+backward.

    python benchmarks/fit_cost.py [--docs 1000] [--out benchmarks/results/fit_cost.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from common import TOKEN_BATCH_SIZE, forward_backward, tokenized_corpus
from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
from rayattr.data import token_budget_batches
from rayattr.grads.engine import GradientEngine
from rayattr.hessian.precondition import Preconditioner
from rayattr.fixtures import default_cache_dir, make_fixture
from rayattr.model import load_model
from rayattr.tokenizer import load_tokenizer
from rayattr.ray.entry import fit
from rayattr.ray.pipeline import ensure_ray
from rayattr.score import Preprocess, Scorer

CASES = [("second-moment", 16), ("kfac", 0), ("kfac", 16), ("ekfac", 0), ("ekfac", 16), ("normalizer", 0)]


def plain_forward_backward_seconds(fixture, docs: int) -> tuple[float, int]:
    """Best of 3 in-process forward+backward passes (weights too) over the same docs and batches."""
    corpus = tokenized_corpus(fixture, docs)
    model = AutoModelForCausalLM.from_pretrained(fixture.neox)
    lengths = np.array([len(t) for t in corpus.tokens])
    batches = token_budget_batches(lengths, TOKEN_BATCH_SIZE)
    pad_id = load_tokenizer(str(fixture.neox)).pad_token_id
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        forward_backward(model, corpus, batches, pad_id, weights=True)
        best = min(best, time.perf_counter() - start)
    return best, int(lengths.sum())


def ekfac_scoring_seconds(fixture, docs: int, stats: str, queries: int = 16) -> dict[str, float]:
    """Best of 3: full-gradient engine rows, and rows + EK-FAC ``H^-1/2`` + cosine against ``queries``."""
    corpus = tokenized_corpus(fixture, docs)
    model = load_model(ModelSpec(str(fixture.neox)))
    engine = GradientEngine(model, GradSpec(projection_dim=0, token_batch_size=TOKEN_BATCH_SIZE),
                            load_tokenizer(str(fixture.neox)).pad_token_id)
    preconditioner = Preconditioner.load(stats, power=-0.5)
    scorer = Scorer(torch.randn(queries, engine.dim), Preprocess(preconditioner, unit_normalize=True))
    best = {"rows": float("inf"), "rows + EK-FAC H^-1/2 + cosine": float("inf"), "EK-FAC H^-1/2 alone": float("inf")}
    for _ in range(3):
        start = time.perf_counter()
        rows = torch.from_numpy(engine.rows(corpus).grads)
        middle = time.perf_counter()
        scorer.score(rows)
        end = time.perf_counter()
        best["rows"] = min(best["rows"], middle - start)
        best["rows + EK-FAC H^-1/2 + cosine"] = min(best["rows + EK-FAC H^-1/2 + cosine"], end - start)
        start = time.perf_counter()
        preconditioner.apply(rows)
        best["EK-FAC H^-1/2 alone"] = min(best["EK-FAC H^-1/2 alone"], time.perf_counter() - start)
    engine.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--out", default="benchmarks/results/fit_cost.json")
    args = parser.parse_args()
    fixture = make_fixture(default_cache_dir())
    plain, tokens = plain_forward_backward_seconds(fixture, args.docs)
    ensure_ray()

    def spec(projection_dim: int, docs: int) -> RunSpec:
        return RunSpec(ModelSpec(str(fixture.neox)), DataSpec(str(fixture.train), split=f"train[:{docs}]"),
                       GradSpec(projection_dim=projection_dim, token_batch_size=TOKEN_BATCH_SIZE))

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method, p in CASES:
            summary = fit(f"{tmp}/{method}-{p}", spec(p, args.docs), method)
            rows[f"{method} p={p}"] = {
                "wall_s": summary.seconds, "compute_s": summary.worker_compute_seconds,
                "ratio_to_forward_backward": summary.worker_compute_seconds / plain,
                "worker_peak_rss_mb": summary.worker_peak_rss_mb,
            }
        scoring = ekfac_scoring_seconds(fixture, args.docs, f"{tmp}/ekfac-0")
    driver_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    table = Table("method", "wall s", "worker compute s", "x fwd+bwd", "worker peak RSS MB",
                  title=f"{args.docs} docs, {tokens:,} tokens; plain forward+backward {plain:.2f} s; driver peak RSS {driver_rss:.0f} MB")
    for name, row in rows.items():
        table.add_row(name, f"{row['wall_s']:.1f}", f"{row['compute_s']:.2f}",
                      f"{row['ratio_to_forward_backward']:.1f}", f"{row['worker_peak_rss_mb']:.0f}")
    Console().print(table)
    apply_table = Table("on-the-fly scoring step (EK-FAC p=0)", "s", "x fwd+bwd", title="applying the EK-FAC, in process")
    for name, seconds in scoring.items():
        apply_table.add_row(name, f"{seconds:.2f}", f"{seconds / plain:.1f}")
    Console().print(apply_table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"docs": args.docs, "tokens": tokens, "plain_forward_backward_s": plain,
                               "driver_peak_rss_mb": driver_rss, "methods": rows,
                               "ekfac_scoring_s": scoring,
                               "ekfac_scoring_ratio_to_forward_backward": {k: v / plain for k, v in scoring.items()}},
                              indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
