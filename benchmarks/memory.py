"""Peak memory of `build` and on-the-fly `score` at 1x and Nx the data: it must not grow with the data.

Each (command, data size) case runs in a fresh spawned process that starts
its own local Ray, so no two cases share a high-water mark. Driver: that
process's ``ru_maxrss``. Workers: each gradient actor's own peak, reported
with its batch summaries (``BuildProgress.worker_peak_rss_mb``). Other Ray
processes (tokenize and top-k task workers, Ray Data's own actors, the raylet
with the object-store pages it touched): their ``VmHWM``, sampled every 0.5 s.
Nx is the first fixture documents written N times with distinct ids, streamed
to one parquet file a copy at a time. The queries are a reduce of a few fixture
queries (prompt/completion), made once in a process of their own.

    PYTHONPATH=benchmarks:. python benchmarks/memory.py [--size small|full] [--device cpu|cuda] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import ray
from rich.table import Table

from common import repeated_corpus, write_results
from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
from rayattr.fixtures import default_cache_dir, make_fixture
from rayattr.ray.entry import build, score
from rayattr.ray.progress import BuildProgress, peak_rss_mb
from rayattr.ray.score import ScoreSettings, reduce

TARGET_RATIO = 1.1  # largest allowed Nx / 1x peak
QUERIES = 16
COMMANDS = ("build", "score")
LOCAL = "local"  # a Ray of its own, never a cluster that another job on this machine started


@dataclass(frozen=True)
class Size:
    """The base corpus (the first ``docs`` fixture documents) and how many times it is repeated."""

    docs: int
    copies: tuple[int, ...]


SIZES = {"small": Size(docs=1100, copies=(1, 3)), "full": Size(docs=2200, copies=(1, 10))}


@dataclass(frozen=True)
class Setup:
    """What every case of one run shares."""

    model: str
    device: str
    workers: int
    queries: str  # the reduced query table
    base_docs: int  # the 1x size


@dataclass
class WorkerPeaks:
    """The workers' highest peak RSS once a run has counted 1x documents, and half its documents.

    A fresh worker's heap grows over its first batches (warm-up), and at 1x each worker sees only
    a few, so growth with the data shows best within one run: from half-way to the end.
    """

    base_docs: int
    at_1x: float | None = None
    at_half: float | None = None

    def __call__(self, progress: BuildProgress) -> None:
        peak = max(progress.worker_peak_rss_mb.values(), default=None)
        if self.at_1x is None and progress.docs >= self.base_docs:
            self.at_1x = peak
        if self.at_half is None and progress.docs >= progress.total_docs / 2:
            self.at_half = peak


def run_spec(setup: Setup, data: DataSpec) -> RunSpec:
    return RunSpec(ModelSpec(setup.model, device=setup.device), data, GradSpec(projection_dim=16))


def in_fresh_process(function, *args):
    """``function(*args)`` in a new spawned interpreter: its own Ray and its own RSS high-water mark."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def make_queries(setup: Setup, queries_parquet: str) -> None:
    """Per-example query rows of the first fixture queries (loss on the completion)."""
    data = DataSpec(queries_parquet, split=f"train[:{QUERIES}]", prompt_column="prompt", completion_column="completion")
    reduce(setup.queries, run_spec(setup, data), aggregation="none", workers=setup.workers, ray_address=LOCAL)


def run_case(setup: Setup, command: str, train: str, run_path: str) -> dict:
    """One command over ``train``, measured from its call; runs in a fresh process."""
    started = time.time()
    spec = run_spec(setup, DataSpec(train))
    peaks = WorkerPeaks(setup.base_docs)
    common = {"workers": setup.workers, "ray_address": LOCAL, "on_progress": peaks}
    with sampled_peaks() as ray_peaks:
        if command == "build":
            progress = build(run_path, spec, **common)
        else:
            progress = score(run_path, setup.queries, ScoreSettings(), spec=spec, **common).progress
        wall = time.time() - started
    ray.shutdown()
    first_row = progress.first_row_seconds
    return {
        "docs": progress.docs, "tokens": progress.tokens, "wall_s": wall,
        "first_row_s": None if first_row is None else first_row + progress.wall_start - started,
        "worker_peak_rss_mb": sorted(progress.worker_peak_rss_mb.values()),
        "worker_peak_at_1x_docs_mb": peaks.at_1x, "worker_peak_at_half_mb": peaks.at_half,
        "driver_peak_rss_mb": peak_rss_mb(), "ray_process_peak_rss_mb": ray_peaks,
    }


@contextmanager
def sampled_peaks(interval: float = 0.5) -> Iterator[dict[str, float]]:
    """Highest VmHWM (MB) per kind of process among this process's descendants (Ray's daemons,
    task workers and actors), sampled in a thread; growth in a process's last interval is missed."""
    seen: dict[int, tuple[str, float]] = {}
    peaks: dict[str, float] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_until, args=(stop, seen, interval))
    sampler.start()
    try:
        yield peaks
    finally:
        stop.set()
        sampler.join()
        sample(seen)
        for label, mb in seen.values():
            peaks[label] = max(mb, peaks.get(label, 0.0))


def sample_until(stop: threading.Event, seen: dict[int, tuple[str, float]], interval: float) -> None:
    while not stop.wait(interval):
        sample(seen)


def sample(seen: dict[int, tuple[str, float]]) -> None:
    """Raise each live descendant's ``(label, VmHWM)``; a worker keeps the label of its last task when idle."""
    for pid in descendants(os.getpid()):
        try:
            label = process_label(Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0"))
            mb = vm_hwm_mb(Path(f"/proc/{pid}/status").read_text())
        except OSError:  # exited meanwhile
            continue
        if mb is None:  # a zombie: exited, not yet reaped
            continue
        old_label, old_mb = seen.get(pid, (label, 0.0))
        seen[pid] = (old_label if label in ("IDLE", "default_worker.py") else label, max(mb, old_mb))


def process_label(argv: list[str]) -> str:
    """``ray::Actor.method`` -> ``Actor``; a Python process by its script; a binary by its name."""
    if argv[0].startswith("ray::"):
        return re.sub(r"\.\w+$", "", argv[0].removeprefix("ray::"))
    program = Path(argv[0]).name
    scripts = [arg for arg in argv[1:] if arg.endswith(".py")]
    return Path(scripts[0]).name if program.startswith("python") and scripts else program


def descendants(root: int) -> set[int]:
    """Every live process below ``root`` (parents read from ``/proc/PID/stat``)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def vm_hwm_mb(status: str) -> float | None:
    """``VmHWM`` of a ``/proc/PID/status`` text in MB (None for a zombie, which has no memory lines)."""
    line = next((line for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return None if line is None else int(line.split()[1]) / 1024


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row's peaks relative to the same command's 1x row, and its workers' end peak relative
    to their peak half-way through the same run."""
    base = {row["command"]: row for row in rows if row["copies"] == 1}
    for row in rows:
        ref, workers = base[row["command"]], max(row["worker_peak_rss_mb"])
        row["driver_ratio"] = row["driver_peak_rss_mb"] / ref["driver_peak_rss_mb"]
        row["worker_ratio"] = workers / max(ref["worker_peak_rss_mb"])
        row["worker_second_half_ratio"] = workers / row["worker_peak_at_half_mb"]
        row["other_ray_ratio"] = max(other_ray_peaks(row).values()) / max(other_ray_peaks(ref).values())
    return rows


def other_ray_peaks(row: dict) -> dict[str, float]:
    """Ray processes other than the gradient actors (whose own reports are the worker column)."""
    return {name: mb for name, mb in row["ray_process_peak_rss_mb"].items() if not name.startswith("MapWorker(")}


def memory_table(rows: list[dict], title: str) -> Table:
    table = Table("case", "data", "docs", "tokens", "driver peak MB", "worker peak MB", "workers at 1x docs / half MB",
                  "largest other Ray process MB", "first row s", "wall s", "driver / 1x", "workers / 1x",
                  "workers / half-way", title=title)
    for row in rows:
        table.add_row(
            row["command"], f"{row['copies']}x", f"{row['docs']:,}", f"{row['tokens']:,}", f"{row['driver_peak_rss_mb']:,.0f}",
            ", ".join(f"{v:,.0f}" for v in row["worker_peak_rss_mb"]),
            f"{row['worker_peak_at_1x_docs_mb']:,.0f} / {row['worker_peak_at_half_mb']:,.0f}",
            "{1:,.0f} ({0})".format(*max(other_ray_peaks(row).items(), key=lambda item: item[1])),
            "-" if row["first_row_s"] is None else f"{row['first_row_s']:.1f}", f"{row['wall_s']:.1f}",
            *(f"{row[key]:.3f}" for key in ("driver_ratio", "worker_ratio", "worker_second_half_ratio")),
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    started = time.perf_counter()
    size = SIZES[args.size]
    fixture = make_fixture(default_cache_dir())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        setup = Setup(str(fixture.neox), args.device, args.workers, f"{tmp}/queries", size.docs)
        in_fresh_process(make_queries, setup, str(fixture.queries))
        for copies in size.copies:
            train = str(Path(tmp) / f"train-{copies}x.parquet")
            repeated_corpus(fixture.train, Path(train), copies, size.docs)
            for command in COMMANDS:
                row = in_fresh_process(run_case, setup, command, train, f"{tmp}/{command}-{copies}x")
                rows.append({"command": command, "copies": copies} | row)
    rows = with_ratios(sorted(rows, key=lambda row: (COMMANDS.index(row["command"]), row["copies"])))
    wall = time.perf_counter() - started
    title = (f"{args.workers} workers, {args.device}, projection 16, {QUERIES} queries; "
             f"target: peak within {TARGET_RATIO}x of 1x; whole run {wall:.0f} s")
    write_results("memory", args.size, {"base_docs": size.docs, "device": args.device, "workers": args.workers,
                                        "queries": QUERIES, "target_ratio": TARGET_RATIO, "wall_s": wall, "cases": rows},
                  [memory_table(rows, title)])

if __name__ == "__main__":
    main()
