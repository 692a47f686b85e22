"""Build throughput against the physical limit, on the fixture model and corpus.

Measured in one process on the same token-budget batches, interleaved over
rounds after a warm-up: (a) a full forward+backward (weight gradients too),
(b) the physical limit: forward + backward to activations only, (c) the
in-process gradient engine at projection 16 and 0. Then (d) `build` through
Ray with 1 and 2 workers, end to end (Ray start, actor start, writes) and in
steady state (from the first committed row to the last).

    python benchmarks/build_throughput.py [--rounds 3] [--out benchmarks/results/build_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
from common import TOKEN_BATCH_SIZE, forward_backward, tokenized_corpus
from rayattr.data import token_budget_batches
from rayattr.fixtures import default_cache_dir, make_fixture
from rayattr.grads.engine import GradientEngine
from rayattr.model import load_tokenizer
from rayattr.ray.pipeline import build

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/build_throughput.json")
    args = parser.parse_args()

    fixture = make_fixture(default_cache_dir())
    docs = tokenized_corpus(fixture)
    lengths = np.array([len(t) for t in docs.tokens])
    tokens = int(lengths.sum())
    batches = token_budget_batches(lengths, TOKEN_BATCH_SIZE)
    model = AutoModelForCausalLM.from_pretrained(fixture.neox).eval()
    pad_id = load_tokenizer(str(fixture.neox)).pad_token_id

    def run_engine(p: int) -> None:
        """Engine construction (projection matrices, hooks) is counted: a worker does it once."""
        engine = GradientEngine(model, GradSpec(projection_dim=p, token_batch_size=TOKEN_BATCH_SIZE), pad_id)
        try:
            engine.rows(docs)
        finally:
            engine.close()

    cases = {
        "forward+backward (weights)": lambda: forward_backward(model, docs, batches, pad_id, weights=True),
        "forward+backward (activations only) = limit": lambda: forward_backward(model, docs, batches, pad_id, weights=False),
        "engine, projection 16": lambda: run_engine(16),
        "engine, projection 0 (full)": lambda: run_engine(0),
    }
    for fn in cases.values():  # warm-up
        fn()
    timings: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    results = {name: tokens / statistics.median(ts) for name, ts in timings.items()}

    spec = RunSpec(ModelSpec(str(fixture.neox)), DataSpec(str(fixture.train)), GradSpec(projection_dim=16, token_batch_size=TOKEN_BATCH_SIZE))
    ray_rows = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            progress = build(str(Path(tmp) / "run"), spec, workers=workers)
        ray_rows[workers] = {
            "end_to_end_tokens_per_s": progress.tokens / progress.seconds,
            "wall_s": progress.seconds,
            "first_row_s": progress.first_row_seconds,
        }
        results[f"ray build, {workers} worker(s), end to end"] = progress.tokens / progress.seconds

    limit = results["forward+backward (activations only) = limit"]
    table = Table("measurement", "tokens/s", "ratio to limit", title=f"{tokens:,} tokens, {len(docs)} docs, {torch.get_num_threads()} threads")
    for name, rate in results.items():
        table.add_row(name, f"{rate:,.0f}", f"{rate / limit:.2f}")
    Console().print(table)
    for workers, row in ray_rows.items():
        Console().print(f"ray build {workers} worker(s): wall {row['wall_s']:.1f} s, first row after {row['first_row_s']:.1f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "tokens": tokens, "docs": len(docs), "token_batch_size": TOKEN_BATCH_SIZE, "threads": torch.get_num_threads(),
        "tokens_per_s": results, "ratio_to_limit": {k: v / limit for k, v in results.items()}, "ray": ray_rows,
    }, indent=2))


if __name__ == "__main__":
    main()
