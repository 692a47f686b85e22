"""Build scaling on a two-node Ray cluster: tokens/s per worker count and parallel efficiency.

Starts a ``ray.cluster_utils.Cluster`` of two nodes (each with half this
machine's CPUs, and one GPU with ``--device cuda``), writes the fixture corpus
repeated k times (row indices are the ids, so every copy's ids are distinct;
``--size small`` k=4, ``full`` k=20) and runs ``build`` (projection 16) with
1, 2, 4, ... workers up to the CPU count (GPU: one per node), the actors
spread over the nodes. Per worker count: tokens/s end to end (actor start and
model load included) and in steady state (from the first committed batch to
the last), and efficiency = tokens/s / (workers x the one-worker tokens/s).
A warm-up build of a few hundred documents runs first, so the first measured
build pays no first-time costs (imports, file cache).

    PYTHONPATH=.:benchmarks python benchmarks/scaling.py [--size small|full] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from rich.table import Table

from common import repeated_corpus, write_results
from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
from rayattr.fixtures import default_cache_dir, make_fixture
from rayattr.ray.entry import build
from rayattr.ray.pipeline import ensure_ray
from rayattr.ray.progress import BuildProgress

NODES = 2
REPEATS = {"small": 4, "full": 20}
ROW_GROUP = 256  # documents per parquet row group
WARM_UP_DOCS = 256


@contextmanager
def two_node_cluster(device: str) -> Iterator[None]:
    """A local Ray cluster of ``NODES`` nodes sharing this machine's CPUs (and its GPU)."""
    node = {"num_cpus": max(1, (os.cpu_count() or 2) // NODES), "num_gpus": int(device == "cuda")}
    cluster = Cluster(initialize_head=True, head_node_args=node)
    for _ in range(NODES - 1):
        cluster.add_node(**node)
    ensure_ray(cluster.address)
    try:
        yield
    finally:
        ray.shutdown()
        cluster.shutdown()


def worker_counts(device: str) -> list[int]:
    """1, 2, 4, ... up to the CPUs (CPU) or one per node (GPU)."""
    limit = NODES if device == "cuda" else max(NODES, os.cpu_count() or NODES)
    return [2**i for i in range(limit.bit_length()) if 2**i <= limit]


def timed_build(run_path: str, spec: RunSpec, workers: int) -> dict:
    """One build; steady state counts the tokens committed after the first batch over the time to the last."""
    commits: list[tuple[float, int]] = []

    def record(progress: BuildProgress) -> None:
        commits.append((time.perf_counter(), progress.tokens))

    progress = build(run_path, spec, workers=workers, on_progress=record)
    (first_at, first_tokens), (last_at, last_tokens) = commits[0], commits[-1]
    return {
        "workers": workers, "tokens": progress.tokens, "wall_s": progress.seconds,
        "first_row_s": progress.first_row_seconds, "nodes": len(progress.nodes),
        "end_to_end_tokens_per_s": progress.tokens_per_second,
        "steady_tokens_per_s": (last_tokens - first_tokens) / (last_at - first_at) if last_at > first_at else None,
    }


def with_efficiency(rows: list[dict]) -> list[dict]:
    """Each rate over ``workers x`` the one-worker rate."""
    base = rows[0]
    for row in rows:
        for rate in ("end_to_end", "steady"):
            one, many = base[f"{rate}_tokens_per_s"], row[f"{rate}_tokens_per_s"]
            row[f"{rate}_efficiency"] = many / (row["workers"] * one) if one and many else None
    return rows


def scaling_table(report: dict) -> Table:
    title = (f"build, projection 16, {report['docs']:,} documents ({report['tokens']:,} tokens), "
             f"{NODES}-node cluster, {report['cpus']} CPUs, {report['device']}")
    table = Table("workers", "nodes used", "wall s", "first row s", "tokens/s end to end", "efficiency",
                  "tokens/s steady", "efficiency (steady)", title=title)

    def cell(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)

    for row in report["builds"]:
        table.add_row(str(row["workers"]), str(row["nodes"]), cell(row["wall_s"], ".1f"), cell(row["first_row_s"], ".1f"),
                      cell(row["end_to_end_tokens_per_s"], ",.0f"), cell(row["end_to_end_efficiency"], ".2f"),
                      cell(row["steady_tokens_per_s"], ",.0f"), cell(row["steady_efficiency"], ".2f"))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(REPEATS), default="small", help="small: corpus x4, full: x20")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    fixture = make_fixture(default_cache_dir())
    grads = GradSpec(projection_dim=16)
    model = ModelSpec(str(fixture.neox), device=args.device)
    with tempfile.TemporaryDirectory() as tmp, two_node_cluster(args.device):
        corpus = Path(tmp) / "train.parquet"
        docs = repeated_corpus(fixture.train, corpus, REPEATS[args.size], row_group_size=ROW_GROUP)
        timed_build(str(Path(tmp) / "warm-up"), RunSpec(model, DataSpec(str(fixture.train), split=f"train[:{WARM_UP_DOCS}]"), grads), 1)
        spec = RunSpec(model, DataSpec(str(corpus)), grads)
        builds = with_efficiency([timed_build(str(Path(tmp) / f"workers-{n}"), spec, n) for n in worker_counts(args.device)])
    report = {"device": args.device, "cpus": os.cpu_count(), "docs": docs, "tokens": builds[0]["tokens"], "builds": builds}
    write_results("scaling", args.size, report, [scaling_table(report)])


if __name__ == "__main__":
    main()
