"""Exact metagradients (MAGIC): how each query's loss after fine-tuning moves with each training
document's weight, by reverse-mode differentiation through the whole training run.

Each optimizer step maps (parameters, optimizer state, the step's document weights) to the next
parameters and state. Going backwards from the queries' gradients at the final parameters, every
step pulls the adjoint back through the optimizer update and the step's gradient (a Hessian-vector
product through the model), and its weight part is the metagradient contribution of the step's
documents. The forward states are not all kept: one in every ``checkpoint_every`` steps is, and the
steps of a segment are recomputed from its checkpoint when the backward pass reaches it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn

from rayattr.config import RayattrError, RayattrWarning
from rayattr.data import TokenizedDocs
from rayattr.lds.recipe import (OptimizerState, Params, Recipe, batch_order, check_documents, document_losses,
                                document_weights, init_state, replay_numerics, step_gradient, take_step,
                                trainable_parameters, update)

State = tuple[Params, OptimizerState]


def metagradients(model: nn.Module, docs: TokenizedDocs, queries: TokenizedDocs, recipe: Recipe,
                  checkpoint_every: int = 16, query_batch: int = 8,
                  on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """``[Q, N]``: the derivative of query q's loss after ``train(model, docs, w, recipe)`` in document i's
    weight ``w_i``, at ``w = 1``; a document in several steps (epochs) sums its contributions.

    Positive means upweighting the document raises the query's loss; MAGIC's attribution score (higher:
    more helpful) is the negative, which callers take. Queries share a backward pass ``query_batch`` at a
    time (their adjoints batched), so each block recomputes the training states once. Memory: the
    checkpoints, ``checkpoint_every`` states of one segment, and per query of the block an adjoint of the
    parameters and optimizer state. ``on_step(done, total)`` reports the optimizer steps replayed
    (forward once, then backward once per query block).
    """
    if checkpoint_every < 1 or query_batch < 1:
        raise RayattrError(f"checkpoint_every {checkpoint_every} and query_batch {query_batch} must both be >= 1")
    for documents in (docs, queries):  # refused before the long replay, not in its middle
        check_documents(documents)
    start = trainable_parameters(model)
    weights = document_weights(None, len(docs), start)
    order = batch_order(len(docs), recipe)
    blocks = [slice(first, first + query_batch) for first in range(0, len(queries), query_batch)]
    progress = _Progress(on_step, len(order) * (1 + len(blocks)))
    pullbacks = _BatchedPullback()
    result = torch.zeros(len(queries), len(docs), dtype=weights.dtype, device=weights.device)
    with replay_numerics():
        checkpoints, final = _forward(model, docs, weights, order, start, recipe, checkpoint_every, progress)
        replay = _Replay(model, docs, weights, order, recipe, checkpoint_every)
        for block in blocks:
            result[block] = replay.backward(checkpoints, final, queries.take(block), pullbacks, progress)
    return result


def _forward(model: nn.Module, docs: TokenizedDocs, weights: torch.Tensor, order: list[np.ndarray], start: Params,
             recipe: Recipe, every: int, progress: _Progress) -> tuple[dict[int, State], Params]:
    """The training run, keeping the state before every ``every``-th step; also the final parameters."""
    params, state = start, init_state(start, recipe)
    checkpoints = {}
    for step_index, positions in enumerate(order):
        if step_index % every == 0:
            checkpoints[step_index] = (params, state)
        params, state = take_step(model, docs, weights, positions, step_index, params, state, recipe)
        progress.step()
    return checkpoints, params


class _Replay:
    """The backward pass of one block of queries through the training run."""

    def __init__(self, model: nn.Module, docs: TokenizedDocs, weights: torch.Tensor, order: list[np.ndarray],
                 recipe: Recipe, every: int) -> None:
        self.model, self.docs, self.weights, self.order = model, docs, weights, order
        self.recipe, self.every = recipe, every

    def backward(self, checkpoints: dict[int, State], final: Params, queries: TokenizedDocs,
                 pullbacks: _BatchedPullback, progress: _Progress) -> torch.Tensor:
        """``[len(queries), N]`` metagradients of these queries."""
        count = len(queries)
        _, pullback = torch.func.vjp(lambda p: document_losses(self.model, p, queries), final)
        (adjoint_params,) = pullbacks(pullback, torch.eye(count, dtype=self.weights.dtype, device=self.weights.device))
        adjoint_state = pytree.tree_map(lambda t: t.new_zeros((count, *t.shape)), checkpoints[0][1])
        grads = torch.zeros(count, len(self.docs), dtype=self.weights.dtype, device=self.weights.device)
        for first in sorted(checkpoints, reverse=True):
            states = self._segment(first, checkpoints[first])
            for step_index in reversed(range(first, first + len(states))):
                params, state = states.pop()
                positions = torch.from_numpy(self.order[step_index]).to(grads.device)
                adjoint_params, adjoint_state, adjoint_weights = self._pull_back(
                    step_index, params, state, (adjoint_params, adjoint_state), pullbacks)
                grads[:, positions] += adjoint_weights
                progress.step()
        return grads

    def _segment(self, first: int, checkpoint: State) -> list[State]:
        """The states before steps ``first, first + 1, ...`` up to the next checkpoint, recomputed."""
        states = [checkpoint]
        for step_index in range(first, min(first + self.every, len(self.order)) - 1):
            states.append(take_step(self.model, self.docs, self.weights, self.order[step_index], step_index,
                                    *states[-1], self.recipe))
        return states

    def _pull_back(self, step_index: int, params: Params, state: OptimizerState, adjoint: tuple[Params, Any],
                   pullbacks: _BatchedPullback) -> tuple[Params, OptimizerState, torch.Tensor]:
        """The adjoints before step ``step_index`` (parameters, optimizer state) and of the step's weights."""
        positions = self.order[step_index]
        batch = self.docs.take(positions)

        def step(p: Params, s: OptimizerState, w: torch.Tensor) -> State:
            return update(p, s, step_gradient(self.model, p, batch, w, self.recipe), step_index, self.recipe)

        weights = self.weights[torch.from_numpy(positions).to(self.weights.device)]
        _, pullback = torch.func.vjp(step, params, state, weights)
        return pullbacks(pullback, adjoint)


class _BatchedPullback:
    """Applies a pullback to a batch of cotangents (leading dimension: the queries) at once with vmap;
    should vmap fail on a model's ops, it warns once and loops over the queries from then on."""

    def __init__(self) -> None:
        self.vectorized = True

    def __call__(self, pullback: Callable[..., Any], cotangents: Any) -> Any:
        if self.vectorized:
            try:
                return torch.func.vmap(pullback)(cotangents)
            except (RuntimeError, NotImplementedError) as exc:
                self.vectorized = False
                warnings.warn(f"metagradients: vmap cannot batch this model's backward pass ({exc}); looping over "
                              "the queries instead (slower)", RayattrWarning, stacklevel=2)
        count = pytree.tree_leaves(cotangents)[0].shape[0]
        rows = [pullback(pytree.tree_map(lambda t: t[row], cotangents)) for row in range(count)]
        return pytree.tree_map(lambda *parts: torch.stack(parts), *rows)


class _Progress:
    """Counts replayed optimizer steps for the caller's callback."""

    def __init__(self, on_step: Callable[[int, int], None] | None, total: int) -> None:
        self.on_step, self.total, self.done = on_step, total, 0

    def step(self) -> None:
        self.done += 1
        if self.on_step is not None:
            self.on_step(self.done, self.total)
