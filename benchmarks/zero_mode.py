"""ZeRO-3 worker groups against replica actor pools: throughput and per-worker memory.

For each mode (a model replica per actor; the model partitioned over a Ray
Train group with DeepSpeed ZeRO-3) it runs, with the same number of workers
on the same fixture documents, a `build` (projection 16) and a second-moment
`fit`, and reports end-to-end tokens/s, the workers' own compute time, their
peak RSS, and (ZeRO) the share of the parameters each worker holds.

On a small model ZeRO-3 costs more than replicas: every module's parameters
are all-gathered before its forward and again before its backward, and the
workers wait for each other at every step. It is for models that do not fit
one device, where replicas are not an option.

    python benchmarks/zero_mode.py [--docs 1000] [--workers 2] [--out benchmarks/results/zero_mode.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
from rayattr.fixtures import default_cache_dir, make_fixture
from rayattr.ray.entry import build, fit
from rayattr.ray.pipeline import ensure_ray

MODES = {"replica": 0, "zero-3": 3}


def run_mode(spec: RunSpec, zero_stage: int, workers: int, root: Path) -> dict:
    """One build and one second-moment fit in one mode."""
    started = time.perf_counter()
    progress = build(str(root / "build"), spec, workers=workers, zero_stage=zero_stage)
    build_seconds = time.perf_counter() - started
    fitted = fit(str(root / "stats"), spec, "second-moment", workers=workers, zero_stage=zero_stage)
    row = {
        "build_tokens_per_second": progress.tokens_per_second, "build_seconds": build_seconds,
        "first_row_seconds": progress.first_row_seconds, "tokens": progress.tokens,
        "fit_seconds": fitted.seconds, "fit_worker_compute_seconds": fitted.worker_compute_seconds,
        "fit_worker_peak_rss_mb": fitted.worker_peak_rss_mb,
    }
    reports = getattr(progress, "workers", [])
    if reports:
        row["build_worker_peak_rss_mb"] = [r.peak_rss_mb for r in reports]
        row["partition_share"] = [r.partition_numel / r.model_numel for r in reports]
        row["idle_passes"] = [r.idle_passes for r in reports]
        row["passes"] = [r.passes for r in reports]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/zero_mode.json")
    args = parser.parse_args()
    fixture = make_fixture(default_cache_dir())
    ensure_ray()
    with tempfile.TemporaryDirectory() as tmp:
        # Row groups of 100 documents: enough shards for every worker of either mode.
        train = Path(tmp) / "train.parquet"
        pq.write_table(pq.read_table(fixture.train).slice(0, args.docs), train, row_group_size=100)
        spec = RunSpec(ModelSpec(str(fixture.neox)), DataSpec(str(train)), GradSpec(projection_dim=16))
        results = {mode: run_mode(spec, stage, args.workers, Path(tmp) / mode) for mode, stage in MODES.items()}
    report = {"docs": args.docs, "workers": args.workers, "modes": results,
              "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    table = Table("mode", "build tok/s", "build s", "first row s", "fit s", "fit worker compute s",
                  "worker peak RSS MB (fit)", "worker peak RSS MB (build)", "parameters held per worker",
                  title=f"{args.workers} workers, {args.docs} fixture documents, projection 16")
    for mode, row in results.items():
        table.add_row(
            mode, f"{row['build_tokens_per_second']:,.0f}", f"{row['build_seconds']:.1f}",
            f"{row['first_row_seconds']:.1f}", f"{row['fit_seconds']:.1f}", f"{row['fit_worker_compute_seconds']:.2f}",
            f"{row['fit_worker_peak_rss_mb']:,.0f}",
            ", ".join(f"{v:,.0f}" for v in row.get("build_worker_peak_rss_mb", [])) or "-",
            ", ".join(f"{v:.0%}" for v in row.get("partition_share", [])) or "100% each",
        )
    Console().print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
