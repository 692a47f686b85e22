"""rayattr build vs Bergson build on the same job, in one run, as a user runs them.

The job: the bench GPT-NeoX (512 wide, 6 layers, 8 heads, intermediate 2048,
untied; random init, the fixture tokenizer), documents of ~313 tokens packed
from the fixture's training text, projection 16, token batches of 512, fp32,
the output head (``lm_head``, ``embed_out`` before transformers 5) excluded, no normalizer. Each tool runs as its own command line
from a cold start (``rayattr build`` starts its own local Ray; ``bergson
build`` one process), rayattr with 1 and 2 workers, and with 2 workers joining
a Ray that ``ray start --head`` left running (as on a cluster; started and
stopped outside the timing, its processes outside the RSS), interleaved over
rounds.

Per run: wall time from launch to exit, tokens/s over that wall, peak RSS of
the command's whole process tree (Ray's processes and workers included,
sampled every 0.25 s), and for rayattr the first row after launch and after its
worker loaded the model (from its summary) and the steady rate (rows written
between the first row and the last, read from its LanceDB table while it runs). Bergson writes a preallocated memory map, so
neither can be observed from outside for it.

    PYTHONPATH=benchmarks:. python benchmarks/same_job.py [--size small|medium|full] [--rounds 1]
        [--skip-install] [--device cpu|cuda]

On a GPU: ``--device cuda`` runs both in bf16 (Bergson's environment then
needs a CUDA build of torch: ``--torch`` names what it installs).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import lancedb
import psutil
import pyarrow.parquet as pq
from rich.table import Table

from common import HEAD_MODULES, bench_model, packed_corpus, write_results
from peer_tools import PEERS, ensure_venv, peer_env
from rayattr.fixtures import default_cache_dir, make_fixture
from rayattr.tokenizer import load_tokenizer
from rayattr.store import GRADIENTS

MIN_TOKENS = 300  # packed documents of 300 tokens or more: ~313 on average
SIZES = {"small": 200, "medium": 2_000, "full": 20_000}
JOINED = "joining a running Ray"  # tool-name suffix: `ray start --head` before the command, not timed
POLL_SECONDS = 0.25


@dataclass
class Run:
    """One command's measurements."""

    tool: str
    round: int
    wall_s: float
    peak_rss_mb: float
    first_row_s: float | None = None  # after launch
    first_row_after_load_s: float | None = None  # after the writing worker had its model loaded (rayattr's summary)
    steady_docs_per_s: float | None = None  # rows written between the first row and the last


def watch(argv: list[str], env: dict[str, str] | None, table_dir: Path | None, docs: int, log: Path) -> Run:
    """Run ``argv``; sample its process tree's RSS and (rayattr) its table's row count until it exits."""
    samples: list[tuple[float, int]] = []
    peak = 0.0
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        start = time.perf_counter()
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        root = psutil.Process(child.pid)
        while child.poll() is None:
            peak = max(peak, tree_rss_mb(root))
            rows = table_rows(table_dir) if table_dir is not None else None
            if rows:
                samples.append((time.perf_counter() - start, rows))
            time.sleep(POLL_SECONDS)
        wall = time.perf_counter() - start
    if child.returncode:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"{argv[0]} failed with exit status {child.returncode}; end of {log}:\n{tail}")
    run = Run(Path(argv[0]).name, 0, wall, peak)
    if table_dir is not None:  # this run's summary is the last in the log
        run.first_row_after_load_s = first_row_after_load(log.read_text().rsplit("\n$ ", 1)[-1])
    if samples:
        run.first_row_s = samples[0][0]
        last = next((s for s in samples if s[1] >= docs), samples[-1])
        if last[0] > samples[0][0]:
            run.steady_docs_per_s = (last[1] - samples[0][1]) / (last[0] - samples[0][0])
    return run


def first_row_after_load(output: str) -> float | None:
    """Seconds from model load to first row, from a ``rayattr build`` summary table (cells may wrap)."""
    text = " ".join(output.replace("│", " ").split())
    found = re.findall(r"\(([0-9.]+) s after its worker loaded the model\)", text)
    return float(found[-1]) if found else None


@contextmanager
def ray_running(start: bool) -> Iterator[None]:
    """A local Ray left running by ``ray start --head`` (outside the timing), which the command joins."""
    if not start:
        yield
        return
    ray_cli = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray_cli, "start", "--head", "--include-dashboard=false"], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run([ray_cli, "stop", "--force"], check=True, capture_output=True)


def tree_rss_mb(root: psutil.Process) -> float:
    """Resident memory of ``root`` and every process under it, in MiB."""
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.Error:  # exited meanwhile
            pass
    return total / 2**20


def table_rows(run_path: Path) -> int | None:
    """Rows in a run's gradient table so far, or None before it exists."""
    try:
        return lancedb.connect(str(run_path)).open_table(GRADIENTS).count_rows()
    except Exception:  # not created yet, or a commit in flight
        return None


def commands(tool: str, root: Path, corpus: Path, jsonl: Path, model: Path, bergson_venv: Path,
             device: str, tag: str) -> tuple[list[str], dict[str, str] | None, Path | None]:
    """``(argv, env, table to watch)`` of one tool on the job."""
    precision = "bf16" if device == "cuda" else "fp32"
    run = root / tag
    if tool.startswith("rayattr"):
        workers = tool.split()[1]  # "rayattr 2" or "rayattr 2 joining a running Ray"
        argv = [str(Path(sys.executable).with_name("rayattr")), "build", str(run), "--model", str(model),
                "--dataset", str(corpus), "--projection-dim", "16", "--token-batch-size", "512", "--precision", precision,
                *(flag for module in HEAD_MODULES for flag in ("--exclude-modules", module)), "--workers", workers]
        return argv, None, run
    env = peer_env(bergson_venv)
    if device == "cuda":
        env.pop("CUDA_VISIBLE_DEVICES")
    argv = [str(bergson_venv / "bin" / "bergson"), "build", str(run), "--model", str(model), "--dataset", str(jsonl),
            "--prompt_column", "text", "--projection_dim", "16", "--token_batch_size", "512", "--precision", precision,
            "--filter_modules", ",".join(f"*{module}" for module in HEAD_MODULES), "--nproc_per_node", "1"]
    return argv, env, None


def summary_table(tokens: int, docs: int, runs: list[Run], title: str) -> tuple[Table, dict]:
    """Medians per tool; the wall ratio to Bergson's."""
    tools = list(dict.fromkeys(r.tool for r in runs))
    medians = {}
    for tool in tools:
        mine = [r for r in runs if r.tool == tool]
        first = [r.first_row_s for r in mine if r.first_row_s is not None]
        after_load = [r.first_row_after_load_s for r in mine if r.first_row_after_load_s is not None]
        steady = [r.steady_docs_per_s for r in mine if r.steady_docs_per_s is not None]
        medians[tool] = {"wall_s": statistics.median(r.wall_s for r in mine),
                         "peak_rss_mb": statistics.median(r.peak_rss_mb for r in mine),
                         "first_row_s": statistics.median(first) if first else None,
                         "first_row_after_load_s": statistics.median(after_load) if after_load else None,
                         "steady_tokens_per_s": statistics.median(steady) * tokens / docs if steady else None}
    bergson = medians["bergson"]["wall_s"]
    table = Table("tool", "wall s", "x Bergson", "tokens/s", "steady tokens/s", "first row s",
                  "first row after model load s", "peak RSS MiB", title=title)
    for tool, m in medians.items():
        table.add_row(tool, f"{m['wall_s']:.1f}", f"{m['wall_s'] / bergson:.2f}", f"{tokens / m['wall_s']:,.0f}",
                      "-" if m["steady_tokens_per_s"] is None else f"{m['steady_tokens_per_s']:,.0f}",
                      "-" if m["first_row_s"] is None else f"{m['first_row_s']:.1f}",
                      "-" if m["first_row_after_load_s"] is None else f"{m['first_row_after_load_s']:.1f}",
                      f"{m['peak_rss_mb']:,.0f}")
    return table, medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each tool, interleaved")
    parser.add_argument("--tools", nargs="+", default=["rayattr 1", "rayattr 2", f"rayattr 2 {JOINED}", "bergson"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--skip-install", action="store_true", help="use Bergson's environment as it is")
    parser.add_argument("--torch", default="torch==2.13.0", help="what Bergson's environment installs torch from")
    args = parser.parse_args()
    docs = SIZES[args.size]
    fixture = make_fixture(default_cache_dir())
    model = bench_model(fixture, default_cache_dir() / "bench-neox-21m-pos1024", max_positions=1024)
    tokenizer = load_tokenizer(str(model))
    venv = ensure_venv(PEERS["bergson"], default_cache_dir().parent / "peers", args.torch, not args.skip_install)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="same-job-") as tmp:
        root = Path(tmp)
        corpus = packed_corpus(fixture, root / "corpus.parquet", docs, tokenizer, MIN_TOKENS)
        texts = pq.read_table(corpus).column("text").to_pylist()
        tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
        jsonl = root / "corpus.jsonl"  # Bergson reads no parquet
        jsonl.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
        log = default_cache_dir().parent / f"same_job_{args.size}.log"  # every command's output, kept
        log.unlink(missing_ok=True)
        for round_ in range(args.rounds):
            for tool in args.tools:
                argv, env, table = commands(tool, root, corpus, jsonl, model, venv, args.device,
                                            f"{tool.replace(' ', '-')}-{round_}")
                print(f"round {round_ + 1}/{args.rounds}: {tool}", flush=True)
                with ray_running(tool.endswith(JOINED)):
                    run = watch(argv, env, table, docs, log)
                run.tool, run.round = tool, round_
                runs.append(run)
    title = (f"build, {docs:,} documents ({tokens:,} tokens), projection 16, token batch 512, "
             f"{'bf16 on cuda' if args.device == 'cuda' else 'fp32 on cpu'}, medians of {args.rounds} round(s)")
    table, medians = summary_table(tokens, docs, runs, title)
    write_results("same_job", args.size, {
        "docs": docs, "tokens": tokens, "device": args.device, "bergson": PEERS["bergson"].version,
        "medians": medians, "runs": [asdict(r) for r in runs],
    }, [table])


if __name__ == "__main__":
    main()
