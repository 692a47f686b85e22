"""Train-time collection in a Ray Train worker group: DDP fine-tuning that writes every example's rows.

Each worker trains a replica on its split of the token stream (``get_dataset_shard``) and
appends its own examples' rows to the run path through a ``TrainTimeCollector``: no shared
filesystem, the run path is the only meeting point. The hooks see each worker's local
activations and output gradients, before DDP averages the weight gradients, so a row is
its example's own gradient whatever the number of workers.
"""

from __future__ import annotations

import dataclasses
import uuid

import numpy as np
import pyarrow as pa
import torch
from ray import train as ray_train
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, prepare_model

from rayattr import storage
from rayattr.commands import TrainConfig
from rayattr.data import TokenizedDocs, plan_shards
from rayattr.grads.engine import collate
from rayattr.grads.live import IDS_KEY, IGNORE_INDEX
from rayattr.model import load_model, tokenizer_source
from rayattr.tokenizer import load_tokenizer
from rayattr.ray.pipeline import ensure_ray, shard_items, token_stream, user_errors
from rayattr.ray.replicas import WorkerResources, release_replicas
from rayattr.store import GradientTable, connect
from rayattr.train import ORDER, TrainTimeCollector

SHUFFLE_BATCHES = 16  # batches in each worker's shuffle buffer


def train(config: TrainConfig, ray_address: str | None = None) -> dict[str, int]:
    """Run the training; returns the rows written and the examples trained on (counted in the tables)."""
    config = dataclasses.replace(config, run_path=storage.absolute(config.run_path))
    ensure_ray(ray_address)
    stream = token_stream(config.spec, shard_items(plan_shards(config.spec.data)))
    release_replicas()  # the group needs the CPUs (GPUs) a warm replica pool holds
    resources = WorkerResources.plan(config.workers)
    per_worker = {"CPU": resources.num_cpus} | ({"GPU": resources.num_gpus} if resources.num_gpus else {})
    trainer = TorchTrainer(
        _train_loop, train_loop_config={"config": config, "threads": resources.threads},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=resources.num_gpus > 0,
                                     resources_per_worker=per_worker),
        # No global shuffle: its all-to-all tasks ask a whole CPU each, which the workers hold on a small
        # node; each worker shuffles within a buffer instead (seeded per worker).
        datasets={"train": stream},
        run_config=RunConfig(name=f"rayattr-train-{uuid.uuid4().hex[:12]}"),
    )
    with user_errors():
        trainer.fit()
    seen = connect(config.run_path).open_table(ORDER).count_rows() if config.track_order else None
    return {"rows": GradientTable.open(config.run_path).count(), "examples_seen": seen}


def _train_loop(loop_config: dict) -> None:
    """One worker: a DDP replica, AdamW, the collector on the unwrapped model."""
    config: TrainConfig = loop_config["config"]
    spec = config.spec
    context = ray_train.get_context()
    torch.set_num_threads(loop_config["threads"])
    torch.manual_seed(config.seed)
    model = load_model(spec.model).train().requires_grad_(True)
    pad_id = load_tokenizer(tokenizer_source(spec.model), spec.model.revision).pad_token_id
    collector = TrainTimeCollector(config.run_path, model, spec.grads, track_order=config.track_order,
                                   every_n_steps=config.every_n_steps, normalize=config.normalize, model_spec=spec.model,
                                   training_args={"config": repr(config)}, main_process=context.get_world_rank() == 0)
    wrapped = prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    collector.start(0)
    step = 0
    shard = ray_train.get_dataset_shard("train")
    for epoch in range(config.epochs):
        batches = shard.iter_batches(batch_size=config.batch_size, batch_format="pyarrow",
                                     local_shuffle_buffer_size=SHUFFLE_BATCHES * config.batch_size,
                                     local_shuffle_seed=config.seed + 1000 * epoch + context.get_world_rank())
        for batch in batches:
            with collector.step(step, epoch, config.learning_rate, optimizer):
                out = wrapped(**_model_inputs(batch, pad_id, next(model.parameters()).device))
                out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
    collector.close()


def _model_inputs(batch: pa.Table, pad_id: int, device: torch.device) -> dict:
    """A padded causal-LM batch with labels (build's label positions) and the examples' ids."""
    docs = TokenizedDocs.from_arrow(batch)
    tokens = collate(docs, np.arange(len(docs.ids)), pad_id)
    labels = tokens.input_ids.masked_fill(~tokens.label_mask, IGNORE_INDEX)
    return {"input_ids": tokens.input_ids.to(device), "attention_mask": tokens.attention_mask.long().to(device),
            "labels": labels.to(device), IDS_KEY: tokens.doc_ids}
