"""Counterfactual runs on Ray: the retrain bank (one task per retrained subset) and MAGIC
(one task per group of queries), each task training on its own CPU or GPU.

Tasks read their documents themselves (nothing whole passes through the driver) and return
what is small: a run's query losses, a query group's scores. The driver records each finished
run at once, so a killed bank resumes with the runs it lacks; Ray retries a task whose
worker died.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import torch

from rayattr import storage
from rayattr.commands import MagicConfig, RetrainConfig
from rayattr.config import DataSpec
from rayattr.data import plan_shards
from rayattr.lds.bank import Bank, BankMeta, subset_of
from rayattr.lds.inputs import read_docs
from rayattr.lds.magic import metagradients
from rayattr.lds.recipe import query_losses, train
from rayattr.model import load_model
from rayattr.ray.pipeline import ensure_ray, user_errors
from rayattr.ray.score import write_topk
from rayattr.store import SCORES, ScoreMeta, ScoreTable
from rayattr.topk import TopK

TASK_RETRIES = 3  # a task whose worker process died is run again this many times


@dataclass(frozen=True)
class RunFinished:
    """A bank run recorded (what ``retrain`` reports as each finishes)."""

    run: int
    done: int
    total: int
    seconds: float

    def describe(self) -> str:
        return f"retrain: run {self.run} recorded ({self.done}/{self.total} in the bank, {self.seconds:.1f} s)"


def dataset_ids(data: DataSpec) -> np.ndarray:
    """A dataset's ids, from its shard plan (no document is read)."""
    return np.concatenate([np.arange(s.first_id, s.first_id + s.num_rows, dtype=np.int64) for s in plan_shards(data)])


def retrain(config: RetrainConfig, ray_address: str | None = None,
            on_run: Callable[[RunFinished], None] | None = None) -> Bank:
    """Fill the bank at ``config.bank_path`` with ``config.runs`` retrained subsets (those it lacks)."""
    ensure_ray(ray_address)
    train_ids = dataset_ids(config.train)
    query_ids = dataset_ids(config.query)
    meta = BankMeta([int(q) for q in query_ids], len(train_ids), config.fraction, config.subset_seed,
                    {"fingerprint": config.fingerprint})
    bank = Bank.create(storage.absolute(config.bank_path), meta)
    todo = [run for run in range(config.runs) if run not in bank.finished()]
    options = _task_options(config.cpus_per_task)
    pending = {_retrain_run.options(**options).remote(config, subset_of(train_ids, config.fraction, config.subset_seed, run)): run
               for run in todo}
    started, done = time.perf_counter(), config.runs - len(todo)
    with user_errors():
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            run = pending.pop(ready[0])
            bank.append(run, subset_of(train_ids, config.fraction, config.subset_seed, run), ray.get(ready[0]))
            done += 1
            if on_run is not None:
                on_run(RunFinished(run, done, config.runs, time.perf_counter() - started))
    return bank


def magic(config: MagicConfig, ray_address: str | None = None) -> tuple[TopK, np.ndarray]:
    """MAGIC scores into ``config.run_path`` (tables ``scores`` and ``topk``), the queries split into groups run as
    ``config.workers`` tasks; returns the top-k and the query ids."""
    ensure_ray(ray_address)
    run_path = storage.absolute(config.run_path)
    query_ids = dataset_ids(config.query)
    groups = [g for g in np.array_split(query_ids, config.workers) if g.size]
    options = _task_options(config.cpus_per_task)
    with user_errors():
        parts = ray.get([_magic_group.options(**options).remote(config, group) for group in groups])
    train_ids, num_tokens = parts[0][:2]
    scores = np.concatenate([part[2] for part in parts], axis=1).astype(np.float32)
    meta = ScoreMeta(width=len(query_ids), per_token=False, query_ids=[int(q) for q in query_ids],
                     settings={"method": "magic", "fingerprint": config.fingerprint})
    table = ScoreTable.create(run_path, meta, SCORES)
    table.table.delete("true")  # a rerun replaces the scores whole
    table.append(pa.table({"id": train_ids, "num_tokens": num_tokens,
                           "scores": pa.FixedSizeListArray.from_arrays(scores.reshape(-1), len(query_ids))}))
    top = TopK.of_block(config.top_k, train_ids, scores)
    write_topk(run_path, top, query_ids, meta)
    return top, query_ids


def _task_options(cpus: float) -> dict:
    gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    return {"num_cpus": cpus, "num_gpus": gpus, "max_retries": TASK_RETRIES}


def _inputs(config: RetrainConfig | MagicConfig, query_ids: np.ndarray | None = None) -> tuple:
    """The model at its initial checkpoint, every training document and the queries, in this worker."""
    torch.set_num_threads(max(1, int(config.cpus_per_task)))
    model = load_model(config.model).requires_grad_(True)  # the recipe trains every parameter
    docs = read_docs(config.train, config.model, model.config)
    queries = read_docs(config.query, config.model, model.config)
    if query_ids is not None:
        queries = queries.take(np.isin(queries.ids, query_ids))
    return model, docs, queries


@ray.remote
def _retrain_run(config: RetrainConfig, subset: np.ndarray) -> np.ndarray:
    """One bank run: train on ``subset`` (the same batch stream, weight 0 elsewhere), then each query's loss."""
    model, docs, queries = _inputs(config)
    weights = torch.from_numpy(np.isin(docs.ids, subset)).to(next(model.parameters()))
    params = train(model, docs, weights, config.recipe)
    return query_losses(model, params, queries).double().cpu().numpy()


@ray.remote
def _magic_group(config: MagicConfig, query_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(train ids, their token counts, scores [N, Q_group])``: minus each query's metagradient in each
    document's weight (a higher score: upweighting the document lowers the query's loss)."""
    model, docs, queries = _inputs(config, query_ids)
    grads = metagradients(model, docs, queries, config.recipe, checkpoint_every=config.checkpoint_every,
                          query_batch=config.query_batch)
    num_tokens = np.array([len(t) for t in docs.tokens], np.int32)
    return docs.ids, num_tokens, (-grads).T.double().cpu().numpy()
