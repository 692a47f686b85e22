"""Cost of fitting statistics relative to one plain forward+backward pass over the same data.

For each method (second moment at projection 16, K-FAC and EK-FAC at
projection 0 and 16, a normalizer fitted from data) it runs `fit` through Ray
with one worker on the fixture corpus, and reports the wall time, the worker's
own compute time (forward, backward, accumulation; EK-FAC's two passes), its
ratio to an in-process forward+backward (with weight gradients) over the same
documents and token batches, and the peak RSS of the driver and of the worker.

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
import pyarrow.parquet as pq
import ray
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
from rayattr.data import TokenizedDocs, token_budget_batches
from rayattr.fixtures import default_cache_dir, make_fixture
from rayattr.grads.collector import per_example_loss
from rayattr.grads.engine import collate
from rayattr.model import load_tokenizer
from rayattr.ray.fit import fit
from rayattr.ray.pipeline import ensure_ray

TOKEN_BATCH_SIZE = 2048
CASES = [("second-moment", 16), ("kfac", 0), ("kfac", 16), ("ekfac", 0), ("ekfac", 16), ("normalizer", 0)]


def plain_forward_backward_seconds(fixture, docs: int) -> tuple[float, int]:
    """One forward+backward (weights too) over the same docs and token batches, in process."""
    tokenizer = load_tokenizer(str(fixture.neox))
    texts = pq.read_table(fixture.train, columns=["text"]).column("text").to_pylist()[:docs]
    tokens = [np.array(t) for t in tokenizer(texts)["input_ids"]]
    corpus = TokenizedDocs(np.arange(len(tokens)), tokens, np.ones(len(tokens), np.int64))
    model = AutoModelForCausalLM.from_pretrained(fixture.neox)
    batches = token_budget_batches(np.array([len(t) for t in tokens]), TOKEN_BATCH_SIZE)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for index in batches:
            batch = collate(corpus, index, tokenizer.pad_token_id)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                           position_ids=batch.position_ids).logits
            per_example_loss(logits, batch.input_ids, batch.label_mask).sum().backward()
            model.zero_grad(set_to_none=True)
        best = min(best, time.perf_counter() - start)
    return best, sum(len(t) for t in tokens)


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
    driver_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    table = Table("method", "wall s", "worker compute s", "x fwd+bwd", "worker peak RSS MB",
                  title=f"{args.docs} docs, {tokens:,} tokens; plain forward+backward {plain:.2f} s; driver peak RSS {driver_rss:.0f} MB")
    for name, row in rows.items():
        table.add_row(name, f"{row['wall_s']:.1f}", f"{row['compute_s']:.2f}",
                      f"{row['ratio_to_forward_backward']:.1f}", f"{row['worker_peak_rss_mb']:.0f}")
    Console().print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"docs": args.docs, "tokens": tokens, "plain_forward_backward_s": plain,
                               "driver_peak_rss_mb": driver_rss, "methods": rows}, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
