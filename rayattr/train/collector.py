"""Train-time collection for any training loop: hooks on the model, rows into the run's tables.

A loop (the HF callback, a Ray Train worker's, a plain one) brackets each optimizer step:

    collector.start(first_step)                     # once: create or resume the tables
    with collector.step(step, epoch, lr, optimizer):
        for micro_batch in step_batches:            # gradient accumulation: any number
            model(**micro_batch, rayattr_ids=ids).loss.backward()
    optimizer.step()

Rows of step ``s`` are gradients at the weights that step starts from: step 0's equal a
``rayattr build`` at the initial checkpoint. They are buffered and committed every
``FLUSH_TOKENS`` tokens (or ``FLUSH_BYTES``), and whenever the loop is about to checkpoint (``flush``), so a
checkpoint never covers a step whose rows are not committed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from rayattr.config import GradSpec, ModelSpec, RayattrError, stable_hash
from rayattr.grads.engine import rows_meta
from rayattr.grads.live import LiveCapture
from rayattr.grads.normalizer import NormalizerKind, from_optimizer
from rayattr.model import model_fingerprint
from rayattr.train.tables import TrainTables

FLUSH_TOKENS = 65_536  # tokens of rows buffered before a commit (a build's append size)
FLUSH_BYTES = 256 * 2**20  # or bytes of rows: full-gradient rows are large
LIVE_NORMALIZER = "optimizer:{kind}:live"  # the normalizer a table of optimizer-normalized rows names


class TrainTimeCollector:
    """Per-example rows of one training process, written to ``run_path`` (each process its own appends).

    ``normalize``: divide each step's rows by the optimizer's moments as that step starts
    (Adam ``v``, or Adafactor row/column moments), as LESS and TrackStar do; a step before
    the optimizer holds any moment gets no rows. ``main_process``: the one process of a
    distributed run that creates and rewinds the tables.
    """

    def __init__(self, run_path: str, model: nn.Module, grads: GradSpec | None = None, *, track_order: bool = True,
                 every_n_steps: int = 1, normalize: NormalizerKind | None = None, model_spec: ModelSpec | None = None,
                 training_args: dict[str, Any] | None = None, main_process: bool = True) -> None:
        if every_n_steps < 1:
            raise RayattrError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.run_path, self.model, self.track_order = run_path, model, track_order
        self.every_n_steps, self.normalize, self.main_process = every_n_steps, normalize, main_process
        self.capture = LiveCapture(model, grads or GradSpec())
        name = ModelSpec(model_spec.model if model_spec else str(getattr(model.config, "_name_or_path", "model")))
        self.meta = rows_meta(self.capture.collector, model_fingerprint(model, model_spec or name), None, model_spec,
                              train_time=True, normalizer=LIVE_NORMALIZER.format(kind=normalize) if normalize else None)
        self.meta = dataclasses.replace(self.meta, source=self.meta.source | {"training_args": stable_hash(training_args or {})})
        self.tables: TrainTables | None = None
        self._step: tuple[int, int, float] | None = None
        self._buffer: list = []
        self._buffered_tokens = self._buffered_bytes = 0

    def start(self, step: int = 0) -> None:
        """Open the tables before training from ``step`` (0, or the step a checkpoint resumes at);
        rows of ``step`` and later, left by a killed run, are removed first."""
        if self.main_process:
            self.tables = TrainTables.open(self.run_path, self.meta, self.track_order, resuming=step > 0)
            self.tables.rewind(step)
        _barrier()
        if not self.main_process:
            self.tables = TrainTables.open(self.run_path, self.meta, self.track_order, resuming=True)

    def begin_step(self, step: int, epoch: int = 0, lr: float = 0.0, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Capture the micro-batches of optimizer step ``step`` (rows every ``every_n_steps``)."""
        if self.tables is None:
            raise RayattrError("call start() before the first training step")
        enabled = step % self.every_n_steps == 0
        if enabled and self.normalize:
            if optimizer is None:
                raise RayattrError("normalizing rows by the optimizer needs the optimizer at each step")
            normalizer = from_optimizer(optimizer, self.model, self.normalize, self.capture.collector.spec.include_bias)
            self.capture.collector.use_normalizer(normalizer)
            enabled = normalizer is not None
        self.capture.enabled = enabled
        self._step = (int(step), int(epoch), float(lr))

    def end_step(self) -> None:
        """After the step's last backward: buffer its rows, and commit when the buffer is full."""
        if self._step is None:
            raise RayattrError("end_step() without begin_step()")
        rows, seen = self.capture.take()
        self._buffer.append((*self._step, rows, seen))
        self._buffered_tokens += int(rows.num_tokens.sum())
        self._buffered_bytes += rows.grads.numel() * rows.grads.element_size()
        self._step = None
        if self._buffered_tokens >= FLUSH_TOKENS or self._buffered_bytes >= FLUSH_BYTES:
            self.flush()

    @contextmanager
    def step(self, step: int, epoch: int = 0, lr: float = 0.0,
             optimizer: torch.optim.Optimizer | None = None) -> Iterator[None]:
        self.begin_step(step, epoch, lr, optimizer)
        yield
        self.end_step()

    def flush(self) -> None:
        """Commit every buffered step; call it before saving a checkpoint."""
        if self.tables is not None:
            self.tables.write(self._buffer)
        self._buffer, self._buffered_tokens, self._buffered_bytes = [], 0, 0

    def close(self) -> None:
        self.flush()
        self.capture.close()


def _barrier() -> None:
    """Wait for every process of a distributed run (the main one creates the tables first)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
