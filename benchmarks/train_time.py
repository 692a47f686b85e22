"""Train-time gradient collection overhead against plain HF ``Trainer`` training.

One run, the same model, documents and seed for every variant: the bench GPT-NeoX
of ``throughput.py`` (21.3M parameters, 512 wide, 6 layers, random init, the fixture
tokenizer) trained with AdamW for a fixed number of steps on the fixture text packed
into 256-token documents (one epoch: ``steps x batch`` documents), as

  (a) plain ``Trainer.train()``, no callback,
  (b) with rayattr's ``GradientCollectorCallback`` at projection 16 (every Linear),
  (c) with Bergson 2.5.1's ``GradientCollectorCallback`` at projection 16, in its own venv
      (``use_optimizer_state=False``, float32 rows: the same job as (b)),
  (d) with rayattr's at projection 0 (full gradients; the output head excluded: ``lm_head``,
      ``embed_out`` before transformers 5).

Each variant runs in a fresh subprocess (``train_time_child.py``; peak RSS is its own),
interleaved over rounds that each start with another variant; the table shows medians
(and the median of each run's overhead against its own round's plain run) and the JSON
every round. Per run: wall seconds of
``trainer.train()`` (the collector's set-up and final commit included), the median
step (intervals between ``on_step_end``, the first step left out), tokens/s over the
documents' non-pad tokens, overhead against (a) as ``(t / t_plain - 1) * 100``, peak
RSS, and the rows in rayattr's ``gradients`` table. Bergson's README claims "~17%
performance overhead" for its train-time callback: the target is below that.

    PYTHONPATH=benchmarks:. python benchmarks/train_time.py [--size small|full] [--rounds 3]
        [--device cpu|cuda] [--bf16] [--skip-install]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import lancedb
import pyarrow.parquet as pq
from datasets import Dataset
from rich.table import Table

from common import HEAD_MODULES, bench_model, machine, packed_corpus, write_results
from peer_tools import PEERS, ensure_venv, peer_env
from rayattr.fixtures import default_cache_dir, make_fixture
from rayattr.tokenizer import load_tokenizer
from rayattr.store import GRADIENTS

SEQ_LEN = 256
SIZES = {  # per-device batch (documents of SEQ_LEN tokens), optimizer steps
    "small": {"batch": 4, "steps": 20},
    "full": {"batch": 8, "steps": 10},  # projection 0 buffers 80 rows of 72 MiB: ~13 GiB peak RSS
}
PLAIN = "plain HF Trainer"
BERGSON = "Bergson 2.5.1 callback, projection 16"
VARIANTS = {  # name: (tool, projection); no tool: plain training
    PLAIN: (None, None),
    "rayattr callback, projection 16": ("rayattr", 16),
    BERGSON: ("bergson", 16),
    "rayattr callback, projection 0 (full gradients, head excluded)": ("rayattr", 0),
}
CHILD = Path(__file__).with_name("train_time_child.py")


def run_child(job: dict[str, Any], bergson_venv: Path) -> dict[str, Any]:
    """One variant in a fresh interpreter (Bergson's venv for its callback); rayattr's rows counted after."""
    python, env = (bergson_venv / "bin" / "python", peer_env(bergson_venv)) if job["tool"] == "bergson" else (sys.executable, None)
    done = subprocess.run([str(python), str(CHILD), json.dumps(job)], check=False, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{job['variant']} failed with exit status {done.returncode}:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rows = 0 if job["tool"] is None else None  # Bergson preallocates a memory map: no count of rows written
    if job["tool"] == "rayattr":
        rows = lancedb.connect(job["run"]).open_table(GRADIENTS).count_rows()
    return result | {"rows": rows}


def training_set(fixture: Any, model_dir: Path, root: Path, docs: int) -> int:
    """``docs`` packed documents of ``SEQ_LEN`` tokens saved as a ``datasets.Dataset`` (with an
    ``id`` column) under ``root / "train"``; returns their non-pad tokens."""
    tokenizer = load_tokenizer(str(model_dir))
    texts = pq.read_table(packed_corpus(fixture, root / "packed.parquet", docs, tokenizer, SEQ_LEN)).column("text")
    encoded = tokenizer(texts.to_pylist(), truncation=True, max_length=SEQ_LEN)
    Dataset.from_dict({"id": list(range(docs)), "input_ids": encoded["input_ids"],
                       "attention_mask": encoded["attention_mask"]}).save_to_disk(str(root / "train"))
    return sum(sum(mask) for mask in encoded["attention_mask"])


def summary(runs: list[dict[str, Any]], tokens: int) -> dict[str, dict[str, float]]:
    """Medians per variant, overheads against the plain Trainer's medians (and each run's
    against its own round's plain run, added to ``runs``)."""
    plain_wall = {r["round"]: r["wall_s"] for r in runs if r["variant"] == PLAIN}
    for r in runs:
        r["overhead_pct"] = (r["wall_s"] / plain_wall[r["round"]] - 1) * 100
    medians = {}
    for name in VARIANTS:
        mine = [r for r in runs if r["variant"] == name]
        medians[name] = {key: statistics.median(r[key] for r in mine) for key in ("wall_s", "step_s", "peak_rss_mib")}
        medians[name]["paired_overhead_pct"] = statistics.median(r["overhead_pct"] for r in mine)
        medians[name]["rows"] = mine[0]["rows"]
    plain = medians[PLAIN]
    for m in medians.values():
        m["tokens_per_s"] = tokens / m["wall_s"]
        m["overhead_pct"] = (m["wall_s"] / plain["wall_s"] - 1) * 100
        m["step_overhead_pct"] = (m["step_s"] / plain["step_s"] - 1) * 100
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant, interleaved")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true", help="TrainingArguments(bf16=True)")
    parser.add_argument("--skip-install", action="store_true", help="use the Bergson venv as it is")
    parser.add_argument("--torch", default="torch==2.13.0", help="torch requirement of the Bergson venv")
    args = parser.parse_args()
    bergson_venv = ensure_venv(PEERS["bergson"], default_cache_dir().parent / "peers", args.torch, not args.skip_install)
    size = SIZES[args.size]
    docs = size["batch"] * size["steps"]
    fixture = make_fixture(default_cache_dir())
    model_dir = bench_model(fixture, default_cache_dir() / "bench-neox-21m", max_positions=SEQ_LEN)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="train-time-") as tmp:
        root = Path(tmp)
        tokens = training_set(fixture, model_dir, root, docs)
        variants = list(VARIANTS.items())
        for round_ in range(args.rounds):
            first = round_ % len(variants)  # each round starts with another variant: no order effect in the medians
            for name, (tool, projection) in variants[first:] + variants[:first]:
                print(f"round {round_ + 1}/{args.rounds}: {name}", flush=True)
                job = {"variant": name, "tool": tool, "projection": projection, "model": str(model_dir),
                       "data": str(root / "train"), "run": str(root / "run"), "out": str(root / "out"),
                       "exclude": list(HEAD_MODULES) if projection == 0 else [], "device": args.device,
                       "bf16": args.bf16} | size
                runs.append({"variant": name, "round": round_} | run_child(job, bergson_venv))
                shutil.rmtree(root / "run", ignore_errors=True)
    medians = summary(runs, tokens)
    precision = "bf16" if args.bf16 else "fp32"
    table = Table("variant", "wall s", "tokens/s", "overhead vs plain %", "overhead vs its round's plain %",
                  "median step s", "step overhead %",
                  "peak RSS MiB", "rows", title=(
                      f"train-time collection, 21.3M GPT-NeoX, {size['steps']} AdamW steps x {size['batch']} documents "
                      f"x {SEQ_LEN} tokens ({tokens:,} non-pad tokens), {precision} on {args.device}, medians of "
                      f"{args.rounds} round(s), {machine()}; projection 0 excludes the output head "
                      f"({'/'.join(HEAD_MODULES)}); Bergson's README claims ~17% overhead for its callback: target < 17%"))
    for name, m in medians.items():
        table.add_row(name, f"{m['wall_s']:.1f}", f"{m['tokens_per_s']:,.0f}", f"{m['overhead_pct']:+.1f}",
                      f"{m['paired_overhead_pct']:+.1f}", f"{m['step_s']:.2f}", f"{m['step_overhead_pct']:+.1f}",
                      f"{m['peak_rss_mib']:,.0f}", "-" if m["rows"] is None else f"{m['rows']:,}")
    write_results("train_time", args.size, {
        "seq_len": SEQ_LEN, "tokens": tokens, "tokens_counted": "non-pad input tokens (attention mask)",
        "device": args.device, "precision": precision, "rounds": args.rounds, "target_overhead_pct": 17.0,
        "head_excluded_at_projection_0": list(HEAD_MODULES), "medians": medians, "runs": runs,
    } | size, [table])


if __name__ == "__main__":
    main()
