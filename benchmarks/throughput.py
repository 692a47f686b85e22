"""Gradient collection and scoring throughput against the physical limit.

The bench model is a ~21M-parameter GPT-NeoX built from a config (fixed seed,
the fixture tokenizer) and the corpus is the fixture's training text packed
into 256-token documents. In one process, on the same token-budget batches,
interleaved over rounds after a warm-up:

  (a) the physical limit: forward + backward to activations only (frozen
      parameters, the embeddings' output requires grad),
  (a') forward + backward with weight gradients (what a training step costs),
  (b) the in-process gradient engine at projection 16 and 0 (full gradients).

Then through Ray, end to end and in steady state (after the first written
row, so Ray, actor start-up and model loading drop out):

  (c) ``build`` with 1 and 2 workers,
  (d) on-the-fly ``score`` (cosine, 16 queries) with 2 workers.

Every rate is divided by (a). Worker threads: 1 worker uses all cores, 2 use
half each, so each Ray row has the same cores as (a); two single-threaded
processes can beat one two-threaded one on matmuls this small.

    PYTHONPATH=benchmarks:. python benchmarks/throughput.py [--size small|full] [--device cpu|cuda]
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from common import TOKEN_BATCH_SIZE, bench_inputs, first_documents, forward_backward, machine, packed_corpus, timed, write_results
from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
from rayattr.data import TokenizedDocs, token_budget_batches
from rayattr.grads.engine import GradientEngine
from rayattr.model import load_model
from rayattr.ray.entry import build, score
from rayattr.ray.pipeline import ensure_ray
from rayattr.ray.progress import BuildProgress
from rayattr.ray.score import ScoreSettings, reduce

SEQ_LEN = 256
QUERIES = 16
DOCS_PER_WRITE = 16  # 4,096 tokens: a write every two token batches, so both workers get work early
SIZES = {  # in-process documents, rounds; documents through Ray
    "small": {"docs": 32, "rounds": 1, "ray_docs": 96},
    "full": {"docs": 96, "rounds": 3, "ray_docs": 384},
}


def in_process(model: torch.nn.Module, docs: TokenizedDocs, pad_id: int, rounds: int) -> dict[str, float]:
    """Medians over interleaved rounds of the reference passes and the engine, in tokens/s."""
    tokens = sum(len(t) for t in docs.tokens)
    batches = token_budget_batches(np.array([len(t) for t in docs.tokens]), TOKEN_BATCH_SIZE)

    def engine(p: int) -> Callable[[], None]:
        def run() -> None:
            """Construction (projection matrices, hooks) is counted: a worker does it once per run."""
            collector = GradientEngine(model, GradSpec(projection_dim=p, token_batch_size=TOKEN_BATCH_SIZE), pad_id)
            try:
                collector.rows(docs)
            finally:
                collector.close()
        return run

    cases = {
        "(a) forward + backward to activations (limit)": lambda: forward_backward(model, docs, batches, pad_id, weights=False),
        "(a') forward + backward with weight gradients": lambda: forward_backward(model, docs, batches, pad_id, weights=True),
        "(b) engine, projection 16": engine(16),
        "(b) engine, projection 0 (full gradients)": engine(0),
    }
    return timed(cases, tokens, rounds)


def through_ray(root: Path, spec: RunSpec) -> dict[str, dict[str, float]]:
    """End-to-end and steady-state rates of ``build`` (1 and 2 workers) and on-the-fly ``score``."""
    rows = {}
    for workers in (1, 2):
        progress = build(str(root / f"build-{workers}"), spec, workers=workers, docs_per_write=DOCS_PER_WRITE)
        rows[f"(c) Ray build, {workers} worker(s)"] = _ray_row(progress)
    queries = RunSpec(spec.model, DataSpec(spec.data.dataset, split=f"train[:{QUERIES}]", max_length=SEQ_LEN,
                                           truncation=True), spec.grads)
    reduce(str(root / "queries"), queries, aggregation="none", workers=2)
    result = score(str(root / "scores"), str(root / "queries"), ScoreSettings(unit_normalize=True, top_k=10),
                   spec=spec, workers=2, docs_per_write=DOCS_PER_WRITE)
    rows["(d) Ray on-the-fly score, 2 workers"] = _ray_row(result.progress)
    return rows


def _ray_row(progress: BuildProgress) -> dict[str, float]:
    """End to end, and steady state on the workers' clocks (``BuildProgress.steady``: each worker's
    first write and the driver's end of the pass left out; the end is reported on its own)."""
    return {"end_to_end": progress.tokens_per_second, "steady": progress.steady_tokens_per_second,
            "wall_s": progress.seconds, "first_row_s": progress.first_row_seconds,
            "first_row_after_load_s": progress.first_row_after_load_seconds, "end_s": progress.end_seconds,
            "tokens": progress.tokens}


def main() -> None:
    args, size, fixture, model_dir, tokenizer = bench_inputs(__doc__, SIZES, SEQ_LEN)
    root = Path(tempfile.mkdtemp(prefix="throughput-"))
    corpus = packed_corpus(fixture, root / "packed.parquet", size["ray_docs"], tokenizer, SEQ_LEN)
    model_spec = ModelSpec(str(model_dir), device=args.device)
    _, data, docs = first_documents(corpus, size["docs"], tokenizer, SEQ_LEN)
    model = load_model(model_spec).eval()
    rates = in_process(model, docs, tokenizer.pad_token_id, size["rounds"])
    params = sum(p.numel() for p in model.parameters())
    del model

    ensure_ray()
    ray_rows = through_ray(root, RunSpec(model_spec, data, GradSpec(projection_dim=16, token_batch_size=TOKEN_BATCH_SIZE)))

    limit = rates["(a) forward + backward to activations (limit)"]
    table = Table("measurement", "tokens/s", "ratio to (a)", "steady tokens/s", "steady ratio", title=(
        f"{params / 1e6:.1f}M GPT-NeoX, seq {SEQ_LEN}, token batch {TOKEN_BATCH_SIZE}, {machine()}"))
    for name, rate in rates.items():
        table.add_row(name, f"{rate:,.0f}", f"{rate / limit:.2f}", "", "")
    for name, row in ray_rows.items():
        table.add_row(name, f"{row['end_to_end']:,.0f}", f"{row['end_to_end'] / limit:.2f}",
                      f"{row['steady']:,.0f}", f"{row['steady'] / limit:.2f}")
    notes = Table("pass", "tokens", "wall s", "first row s", "first row after model load s", "end of pass s",
                  title="through Ray, end to end")
    for name, row in ray_rows.items():
        notes.add_row(name, f"{row['tokens']:,}", f"{row['wall_s']:.1f}", f"{row['first_row_s']:.1f}",
                      f"{row['first_row_after_load_s']:.1f}", f"{row['end_s']:.1f}")
    write_results("throughput", args.size, {
        "model_parameters": params, "seq_len": SEQ_LEN, "token_batch_size": TOKEN_BATCH_SIZE, "docs": len(docs),
        "rounds": size["rounds"], "device": args.device, "in_process_tokens_per_s": rates,
        "ratio_to_limit": {name: rate / limit for name, rate in rates.items()}
        | {name: {"end_to_end": row["end_to_end"] / limit, "steady": row["steady"] / limit} for name, row in ray_rows.items()},
        "ray": ray_rows,
    }, [table, notes])


if __name__ == "__main__":
    main()
