"""One training run of ``train_time.py`` in this interpreter: rayattr's venv or Bergson's.

It imports only transformers, datasets and torch at the top, so Bergson's own venv can run
it; the callback of the tool a job names is attached by ``attach``. Prints one JSON line.

    python benchmarks/train_time_child.py JOB_JSON
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import load_from_disk
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainerCallback,
                          TrainingArguments)


class StepClock(TrainerCallback):
    """Times of every ``on_step_end``: the steady step time without set-up and the final commit."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.ends.append(time.perf_counter())


def attach(trainer: Trainer, job: dict[str, Any]) -> None:
    """The job's tool's train-time callback at ``job["projection"]``, no optimizer normalization, float32 rows."""
    if job["tool"] == "rayattr":
        from rayattr.config import GradSpec
        from rayattr.train import GradientCollectorCallback, prepare_trainer

        prepare_trainer(trainer)
        spec = GradSpec(projection_dim=job["projection"], exclude_modules=tuple(job["exclude"]))
        trainer.add_callback(GradientCollectorCallback(job["run"], spec))
    elif job["tool"] == "bergson":
        from bergson.huggingface import GradientCollectorCallback, prepare_for_gradient_collection

        prepare_for_gradient_collection(trainer)
        trainer.add_callback(GradientCollectorCallback(Path(job["run"]), projection_dim=job["projection"],
                                                       dtype=np.dtype(np.float32), use_optimizer_state=False))


def train(job: dict[str, Any]) -> dict[str, Any]:
    """``trainer.train()`` timed, with peak memory."""
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    model = AutoModelForCausalLM.from_pretrained(job["model"])
    args = TrainingArguments(
        output_dir=job["out"], use_cpu=job["device"] == "cpu", bf16=job["bf16"], per_device_train_batch_size=job["batch"],
        max_steps=job["steps"], optim="adamw_torch", report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=load_from_disk(job["data"]),
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    if job["tool"]:
        attach(trainer, job)
    clock = StepClock()
    trainer.add_callback(clock)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    return {"wall_s": wall, "step_s": float(np.median(np.diff(clock.ends))),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if job["device"] == "cuda" else None}


if __name__ == "__main__":
    print(json.dumps(train(json.loads(sys.argv[1]))))
