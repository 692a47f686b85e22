"""Wall time and peak memory of each sketch per batch, as the sketch dimension D grows.

GPT-2 small has ~1.24e8 parameters; its flattened gradient is the input the
paper times. The default N = 2^22 keeps the dense reference and FJL within a
24 GiB, 2-core CPU box; pass ``--n 124000000 --device cuda`` on a GPU for the
GPT-2-sized run. Per (sketch, D): construction time (random state drawn once),
median apply time of a ``[batch, N]`` float32 batch over ``--repeats``, peak
memory above the inputs during construction and apply (CUDA: the allocator's
peak; CPU: the process's peak RSS, reset through /proc/self/clear_refs), and
the size of the cached random state.

    PYTHONPATH=. python benchmarks/sketch_speed.py [--n 4194304] [--batch 2] [--device cpu] [--out benchmarks/results/sketch_speed.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from rayattr.config import RayattrError
from rayattr.grads.hadamard import next_pow2
from rayattr.grads.sketch import SKETCHES, Sketch, make_sketch


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def mmap_threshold(nbytes: int) -> None:
    """glibc serves allocations above ``nbytes`` with mmap and returns them to the OS when freed.

    Memory passes use a small threshold so the RSS high-water mark sees each
    case's own allocations rather than reused heap; timing passes use glibc's
    largest (32 MiB), which keeps heap reuse as fast as the default.
    """
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, nbytes)


class PeakMemory:
    """Peak bytes allocated above the starting point, on CUDA or (via the RSS high-water mark) on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cpu":
            mmap_threshold(1 << 17)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.start = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.peak = _status_bytes("VmHWM") - self.start
            mmap_threshold(32 << 20)


def _status_bytes(key: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key))
    return int(line.split()[1]) * 1024


def timed(fn: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def state_bytes(sketch: Sketch) -> int:
    """Bytes of the cached random state (a sparse matrix counts its indices and values)."""
    total = 0
    for name in sketch._state:
        tensor = getattr(sketch, name)
        parts = (tensor.indices(), tensor.values()) if tensor.is_sparse else (tensor,)
        total += sum(p.numel() * p.element_size() for p in parts)
    return total


def fjl_state_gb(n: int, dim: int) -> float:
    """FJL's sparse matrix while it is built: int64 row and column indices and float32 values, twice (coalesce)."""
    per_row = math.ceil(math.log2(next_pow2(n)) ** 2)
    return 2 * dim * per_row * 20 / 1e9


def measure(kind: str, n: int, dim: int, x: torch.Tensor, repeats: int) -> dict:
    """Time first (fast allocator settings), then peak memory in separate passes."""
    device = x.device
    build_s = timed(lambda: make_sketch(kind, n, dim, seed=0).to(device), device)
    with PeakMemory(device) as build_mem:
        sketch = make_sketch(kind, n, dim, seed=0).to(device)
    sketch(x)  # warm-up
    times = [timed(lambda: sketch(x), device) for _ in range(repeats)]
    with PeakMemory(device) as apply_mem:
        sketch(x)
    return {
        "D": dim, "build_s": build_s, "apply_s": statistics.median(times),
        "build_peak_mb": build_mem.peak / 2**20, "apply_peak_mb": apply_mem.peak / 2**20,
        "state_mb": state_bytes(sketch) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1 << 22, help="gradient length N (GPT-2 small: 124000000)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--min-log-dim", type=int, default=10)
    parser.add_argument("--max-log-dim", type=int, default=20)
    parser.add_argument("--log-dim-step", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-state-gb", type=float, default=4.0, help="skip FJL sizes whose sparse matrix needs more")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/sketch_speed.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    x = torch.randn(args.batch, args.n, generator=torch.Generator().manual_seed(0)).to(device)
    dims = [2**k for k in range(args.min_log_dim, args.max_log_dim + 1, args.log_dim_step)]
    results: dict[str, list[dict]] = {}
    for kind in SKETCHES:
        results[kind] = []
        for dim in dims:
            need = fjl_state_gb(args.n, dim) if kind == "fjl" else 0.0
            if need > args.max_state_gb:  # CPU allocation failures kill the process rather than raise
                results[kind].append({"D": dim, "refused": f"needs ~{need:.1f} GB > --max-state-gb"})
                continue
            try:
                results[kind].append(measure(kind, args.n, dim, x, args.repeats))
            except (RayattrError, torch.OutOfMemoryError) as exc:  # dense refuses, or the device is full
                results[kind].append({"D": dim, "refused": str(exc).splitlines()[0]})

    console = Console()
    title = f"apply ms per batch of {args.batch} x N={args.n:,} (build s | apply peak MB) on {device}; '-' refused"
    table = Table("sketch", *[f"2^{d.bit_length() - 1}" for d in dims], title=title)
    for kind, rows in results.items():
        table.add_row(kind, *[f"{1e3 * r['apply_s']:.0f} ({r['build_s']:.1f}|{r['apply_peak_mb']:.0f})"
                              if "apply_s" in r else "-" for r in rows])
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"n": args.n, "batch": args.batch, "device": str(device),
                               "threads": torch.get_num_threads(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
