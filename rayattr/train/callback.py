"""The HF ``Trainer`` (and ``trl.SFTTrainer``) side of train-time collection.

``prepare_trainer`` makes every training batch carry its examples' dataset ids:
the id column survives the Trainer's removal of unused columns, and the collator
moves it into the batch under ``IDS_KEY``, which the capture takes out again before
the model call. ``GradientCollectorCallback`` brackets each optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from rayattr.config import GradSpec, ModelSpec, RayattrError
from rayattr.grads.live import IDS_KEY
from rayattr.grads.normalizer import NormalizerKind
from rayattr.train.collector import TrainTimeCollector


class IdCollator:
    """Wraps a collator: each feature's id goes into the batch as one ``IDS_KEY`` tensor."""

    def __init__(self, collator: Callable[[list[dict]], dict], id_column: str) -> None:
        self.collator, self.id_column = collator, id_column

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if any(self.id_column not in feature for feature in features):
            raise RayattrError(f"a training example has no {self.id_column!r} column; pass the dataset's id column "
                               "as prepare_trainer(trainer, id_column=...)")
        ids = torch.tensor([int(feature[self.id_column]) for feature in features], dtype=torch.long)
        batch = self.collator([{k: v for k, v in f.items() if k != self.id_column} for f in features])
        batch[IDS_KEY] = ids
        return batch


def prepare_trainer(trainer: Trainer, id_column: str = "id") -> Trainer:
    """Carry ``id_column`` of the training set through to the model call (rows are keyed by it).

    A ``datasets.Dataset`` without that column gets its row numbers as ids. Returns the trainer.
    """
    dataset = trainer.train_dataset
    columns = getattr(dataset, "column_names", None)
    if columns is not None and id_column not in columns:
        trainer.train_dataset = dataset.add_column(id_column, list(range(len(dataset))))
    trainer._set_signature_columns_if_needed()  # the Trainer keeps only these dataset columns
    if id_column not in trainer._signature_columns:
        trainer._signature_columns = [*trainer._signature_columns, id_column]
    if not isinstance(trainer.data_collator, IdCollator):
        trainer.data_collator = IdCollator(trainer.data_collator, id_column)
    return trainer


class GradientCollectorCallback(TrainerCallback):
    """Writes each training example's projected gradient, as the step's own backward computes it,
    to the ``gradients`` table of ``run_path`` (with ``track_order``, also ``order``: step, id).

    Rows of a step are gradients of each example's summed loss at the weights that step
    starts from (``rayattr build``'s convention). Call ``prepare_trainer(trainer)`` first.
    """

    def __init__(self, run_path: str, grads: GradSpec | None = None, track_order: bool = True, every_n_steps: int = 1,
                 normalize: NormalizerKind | None = None, model_spec: ModelSpec | None = None) -> None:
        self.run_path, self.grads, self.track_order = run_path, grads or GradSpec(), track_order
        self.every_n_steps, self.normalize, self.model_spec = every_n_steps, normalize, model_spec
        self.collector: TrainTimeCollector | None = None
        self.epoch = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        self.collector = TrainTimeCollector(
            self.run_path, model, self.grads, track_order=self.track_order, every_n_steps=self.every_n_steps,
            normalize=self.normalize, model_spec=self.model_spec, training_args=_hashable(args),
            main_process=state.is_world_process_zero)
        self.collector.start(state.global_step)

    def on_epoch_begin(self, args, state, control, **kwargs) -> None:
        self.epoch = int(round(state.epoch or 0))

    def on_step_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs) -> None:
        lr = lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else 0.0
        self.collector.begin_step(state.global_step, self.epoch, lr, optimizer)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.collector.end_step()
        if control.should_save:  # committed before the checkpoint that covers them is written
            self.collector.flush()

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.collector.close()


def _hashable(args: Any) -> dict[str, Any]:
    """The training arguments that shape training (paths and logging left out)."""
    settings = args.to_dict()
    for key in ("output_dir", "logging_dir", "run_name", "hub_token", "push_to_hub_token", "report_to"):
        settings.pop(key, None)
    return settings
