"""Train-time gradient collection overhead against plain HF ``Trainer`` training.

One run, the same model, documents and seed for every variant: the bench GPT-NeoX
of ``throughput.py`` (21.3M parameters, 512 wide, 6 layers, random init, the fixture
tokenizer) trained with AdamW for a fixed number of steps on the fixture text packed
into 256-token documents (one epoch: ``steps x batch`` documents), as

  (a) plain ``Trainer.train()``, no callback,
  (b) with ``GradientCollectorCallback`` at projection 16 (every Linear),
  (c) with it at projection 0 (full gradients; the output head excluded: ``embed_out``,
      named ``lm_head`` since transformers 5).

Each variant runs in a fresh subprocess (peak RSS is its own), interleaved over
rounds; the table shows medians and the JSON every round. Per run: wall seconds of
``trainer.train()`` (the collector's set-up and final commit included), the median
step (intervals between ``on_step_end``, the first step left out), tokens/s over the
documents' non-pad tokens, overhead against (a) as ``(t / t_plain - 1) * 100``, peak
RSS, and the rows in the run's ``gradients`` table. Bergson's README claims "~17%
performance overhead" for its train-time callback: the target is below that.

    PYTHONPATH=benchmarks:. python benchmarks/train_time.py [--size small|full] [--rounds 3]
        [--device cpu|cuda] [--bf16]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import pyarrow.parquet as pq
import torch
from datasets import Dataset, load_from_disk
from rich.table import Table
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

from common import HEAD_MODULES, bench_model, machine, packed_corpus, write_results
from rayattr.config import GradSpec
from rayattr.fixtures import default_cache_dir, make_fixture
from rayattr.model import load_tokenizer
from rayattr.store import GRADIENTS
from rayattr.train import GradientCollectorCallback, prepare_trainer

SEQ_LEN = 256
SIZES = {  # per-device batch (documents of SEQ_LEN tokens), optimizer steps
    "small": {"batch": 4, "steps": 20},
    "full": {"batch": 8, "steps": 10},  # projection 0 buffers 80 rows of 72 MiB: ~13 GiB peak RSS
}
PLAIN = "plain HF Trainer"
VARIANTS = {  # name: projection (None: no callback)
    PLAIN: None,
    "callback, projection 16": 16,
    "callback, projection 0 (full gradients, head excluded)": 0,
}


class StepClock(TrainerCallback):
    """Times of every ``on_step_end``: the steady step time without set-up and the final commit."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.ends.append(time.perf_counter())


def train(job: dict[str, Any]) -> dict[str, Any]:
    """One variant in this process: ``trainer.train()`` timed, then rows and peak memory read."""
    tokenizer = load_tokenizer(job["model"])
    model = AutoModelForCausalLM.from_pretrained(job["model"])
    args = TrainingArguments(
        output_dir=job["out"], use_cpu=job["device"] == "cpu", bf16=job["bf16"], per_device_train_batch_size=job["batch"],
        max_steps=job["steps"], optim="adamw_torch", report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=load_from_disk(job["data"]),
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    if job["projection"] is not None:
        prepare_trainer(trainer)
        exclude = HEAD_MODULES if job["projection"] == 0 else ()
        trainer.add_callback(GradientCollectorCallback(job["run"], GradSpec(projection_dim=job["projection"],
                                                                            exclude_modules=exclude)))
    clock = StepClock()
    trainer.add_callback(clock)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    rows = lancedb.connect(job["run"]).open_table(GRADIENTS).count_rows() if job["projection"] is not None else 0
    return {"wall_s": wall, "step_s": float(np.median(np.diff(clock.ends))), "rows": rows,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if job["device"] == "cuda" else None}


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    """``train(job)`` in a fresh interpreter; its result is the last line it prints."""
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], check=False,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{job['variant']} failed with exit status {done.returncode}:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


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
        medians[name] = {key: statistics.median(r[key] for r in mine) for key in ("wall_s", "step_s", "peak_rss_mib", "rows")}
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
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one variant's job, as JSON (run_child)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(train(json.loads(args.child))))
        return
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
            for name, projection in variants[first:] + variants[:first]:
                print(f"round {round_ + 1}/{args.rounds}: {name}", flush=True)
                job = {"variant": name, "projection": projection, "model": str(model_dir), "data": str(root / "train"),
                       "run": str(root / "run"), "out": str(root / "out"), "device": args.device, "bf16": args.bf16} | size
                runs.append({"variant": name, "round": round_} | run_child(job))
                shutil.rmtree(root / "run", ignore_errors=True)
    medians = summary(runs, tokens)
    precision = "bf16" if args.bf16 else "fp32"
    table = Table("variant", "wall s", "tokens/s", "overhead vs plain %", "median step s", "step overhead %",
                  "peak RSS MiB", "rows", title=(
                      f"train-time collection, 21.3M GPT-NeoX, {size['steps']} AdamW steps x {size['batch']} documents "
                      f"x {SEQ_LEN} tokens ({tokens:,} non-pad tokens), {precision} on {args.device}, medians of "
                      f"{args.rounds} round(s), {machine()}; projection 0 excludes the output head "
                      f"({'/'.join(HEAD_MODULES)}); Bergson's README claims ~17% overhead for its callback: target < 17%"))
    for name, m in medians.items():
        table.add_row(name, f"{m['wall_s']:.1f}", f"{m['tokens_per_s']:,.0f}", f"{m['overhead_pct']:+.1f}",
                      f"{m['step_s']:.2f}", f"{m['step_overhead_pct']:+.1f}", f"{m['peak_rss_mib']:,.0f}",
                      f"{m['rows']:,.0f}")
    write_results("train_time", args.size, {
        "seq_len": SEQ_LEN, "tokens": tokens, "tokens_counted": "non-pad input tokens (attention mask)",
        "device": args.device, "precision": precision, "rounds": args.rounds, "target_overhead_pct": 17.0,
        "head_excluded_at_projection_0": list(HEAD_MODULES), "medians": medians, "runs": runs,
    } | size, [table])


if __name__ == "__main__":
    main()
