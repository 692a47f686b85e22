"""The fine-tune that counterfactual validation replays: one recipe, one code path.

The retrain bank trains on many random subsets and MAGIC differentiates through the full run,
so both must run the very same steps. A subset is the full data stream with weight 0 on the
dropped documents: the batch order ignores the weights and each step's loss is linear in them,
which makes a metagradient the linearisation of exactly the retrains the bank runs.

Everything here is functional (parameters and optimizer state are dicts of tensors, updated
without in-place ops) so that ``rayattr.lds.magic`` can differentiate through it, and
deterministic: the same inputs give bitwise the same parameters.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from rayattr.config import RayattrError, setting
from rayattr.data import TokenizedDocs

Params = dict[str, torch.Tensor]
OptimizerState = dict[str, Params]  # "velocity" (SGD with momentum), or "m" and "v" (Adam); {} for plain SGD

QUERY_CHUNK = 64  # queries per forward pass in query_losses (bounds the logits in memory)


@dataclass(frozen=True)
class Recipe:
    """How the model is fine-tuned on the (weighted) training documents."""

    optimizer: Literal["sgd", "adam"] = setting("adam", "sgd or adam (AdamW-style decoupled weight decay)")
    learning_rate: float = setting(1e-3, "Step size")
    weight_decay: float = setting(0.0, "Decoupled weight decay: each step shrinks the parameters by lr * wd")
    momentum: float = setting(0.0, "SGD momentum (heavy ball)")
    beta1: float = setting(0.9, "Adam: decay of the first moment")
    beta2: float = setting(0.999, "Adam: decay of the second moment")
    eps: float = setting(1e-8, "Adam: added to the root of the second moment")
    epochs: int = setting(1, "Passes over the training documents")
    batch_size: int = setting(8, "Documents per optimizer step (the loss is divided by this nominal size)")
    seed: int = setting(0, "Seed of the data order")

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise RayattrError(f"unknown optimizer {self.optimizer!r}: use 'sgd' or 'adam'")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise RayattrError(f"learning_rate {self.learning_rate} must be a positive number")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise RayattrError(f"weight_decay {self.weight_decay} must be >= 0 (0 turns it off)")
        for name in ("momentum", "beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise RayattrError(f"{name} {getattr(self, name)} must be in [0, 1)")
        if not self.eps > 0:
            raise RayattrError(f"eps {self.eps} must be > 0 (it keeps Adam's step finite)")
        if self.epochs < 1:
            raise RayattrError(f"epochs {self.epochs} must be >= 1")
        if self.batch_size < 1:
            raise RayattrError(f"batch_size {self.batch_size} must be >= 1")


def batch_order(num_docs: int, recipe: Recipe) -> list[np.ndarray]:
    """Positions (0..num_docs-1) of each step's documents: a fresh permutation per epoch, cut into batches.

    It depends on the recipe and ``num_docs`` only, never on the weights, so every subset
    retrain (and MAGIC) sees the same stream.
    """
    order = []
    for epoch in range(recipe.epochs):
        permutation = np.random.default_rng([recipe.seed, epoch]).permutation(num_docs)
        order += [permutation[i : i + recipe.batch_size] for i in range(0, num_docs, recipe.batch_size)]
    return order


@contextlib.contextmanager
def replay_numerics() -> Iterator[None]:
    """Attention through SDPA's math kernel. Metagradients need a double backward, which the fused kernels
    lack (flash attention, the CPU default too, fails with "derivative ... is not implemented"); training
    uses the same kernel so that both run the same computation. Eager attention does not use SDPA at all.
    """
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def trainable_parameters(model: nn.Module) -> Params:
    """Detached copies of the parameters that require grad: the starting point (the model is never changed)."""
    if model.training:
        raise RayattrError("the model is in training mode (dropout makes replays differ): call model.eval() first")
    params = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise RayattrError("the model has no trainable parameters: call model.requires_grad_(True) first")
    return params


def document_losses(model: nn.Module, params: Params, docs: TokenizedDocs) -> torch.Tensor:
    """Each document's mean next-token cross-entropy over its label tokens ``[len(docs)]``, at ``params``.

    Documents are right-padded (pad id 0, masked): with causal attention a document's tokens never see
    the padding, so its loss does not depend on its batch beyond float rounding.
    """
    lengths = check_documents(docs)
    device = next(iter(params.values())).device
    width = int(lengths.max())
    ids = np.zeros((len(docs), width), np.int64)
    for row, tokens in enumerate(docs.tokens):
        ids[row, : len(tokens)] = tokens
    positions = np.arange(width)[None, :]
    present = positions < lengths[:, None]
    targets = present & (positions >= np.maximum(docs.label_start, 1)[:, None])
    input_ids = torch.from_numpy(ids).to(device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.from_numpy(present).long().to(device), "use_cache": False}
    logits = torch.func.functional_call(model, params, (), inputs).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    picked = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    is_target = torch.from_numpy(targets[:, 1:]).to(device)
    return -torch.where(is_target, picked, 0.0).sum(1) / is_target.sum(1)


def check_documents(docs: TokenizedDocs) -> np.ndarray:
    """The documents' lengths, after refusing what the recipe's plain loss cannot represent (before a long run)."""
    if docs.label_masks is not None or docs.loss_weights is not None:
        raise RayattrError("label masks and loss weights (conversations, rewards) are not supported by the "
                           "fine-tune recipe: use plain documents with a label_start")
    if len(docs) == 0:
        raise RayattrError("no documents to compute losses of")
    lengths = np.array([len(tokens) for tokens in docs.tokens], np.int64)
    empty = docs.ids[np.maximum(docs.label_start, 1) >= lengths]
    if empty.size:
        raise RayattrError(f"documents {empty[:5].tolist()} have no label token (label_start at or past their end, "
                           "or a single token): drop them or move their label_start")
    return lengths


def step_loss(model: nn.Module, params: Params, docs_of_step: TokenizedDocs, weights_of_step: torch.Tensor,
              recipe: Recipe) -> torch.Tensor:
    """``sum_i w_i * loss_i / batch_size``: divided by the nominal batch size, not the weights' sum, so
    the loss is linear in the weights (weight 0 is exactly leaving the document out)."""
    return (weights_of_step * document_losses(model, params, docs_of_step)).sum() / recipe.batch_size


def step_gradient(model: nn.Module, params: Params, docs_of_step: TokenizedDocs, weights_of_step: torch.Tensor,
                  recipe: Recipe) -> Params:
    """The gradient of ``step_loss`` in the parameters, as a function transform (so it can be differentiated)."""
    return torch.func.grad(lambda p: step_loss(model, p, docs_of_step, weights_of_step, recipe))(params)


def init_state(params: Params, recipe: Recipe) -> OptimizerState:
    """The optimizer's state before the first step: zero moments."""
    if recipe.optimizer == "adam":
        return {"m": {k: torch.zeros_like(p) for k, p in params.items()},
                "v": {k: torch.zeros_like(p) for k, p in params.items()}}
    if recipe.momentum:
        return {"velocity": {k: torch.zeros_like(p) for k, p in params.items()}}
    return {}


def update(params: Params, state: OptimizerState, grads: Params, step_index: int,
           recipe: Recipe) -> tuple[Params, OptimizerState]:
    """One optimizer step (``step_index`` from 0), with plain out-of-place ops so it can be differentiated.

    SGD: ``v <- momentum * v + g``, ``p <- p - lr * wd * p - lr * v``. Adam (AdamW): bias-corrected
    moments, ``p <- p - lr * wd * p - lr * mhat / (sqrt(vhat) + eps)``.
    """
    lr = recipe.learning_rate
    shrink = 1 - lr * recipe.weight_decay  # exactly 1 without weight decay
    if recipe.optimizer == "sgd":
        if not recipe.momentum:
            return {k: p * shrink - lr * grads[k] for k, p in params.items()}, {}
        velocity = {k: recipe.momentum * state["velocity"][k] + grads[k] for k in params}
        return {k: p * shrink - lr * velocity[k] for k, p in params.items()}, {"velocity": velocity}
    t = step_index + 1
    b1, b2 = recipe.beta1, recipe.beta2
    m = {k: b1 * state["m"][k] + (1 - b1) * grads[k] for k in params}
    v = {k: b2 * state["v"][k] + (1 - b2) * grads[k] * grads[k] for k in params}
    step_size, root_correction = lr / (1 - b1**t), math.sqrt(1 - b2**t)
    new = {k: p * shrink - step_size * m[k] / (_safe_sqrt(v[k]) / root_correction + recipe.eps)
           for k, p in params.items()}
    return new, {"m": m, "v": v}


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """``sqrt(v)`` whose derivative at ``v = 0`` is 0, not infinite.

    A second moment is exactly 0 where no gradient has reached yet (the embedding row of a token no
    batch contained); there the first moment is 0 too and the step is 0 whatever ``v``, so 0 is the
    right derivative, while sqrt's infinite one would turn the backward pass's ``0 * inf`` into NaN.
    """
    positive = v > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, v, 1.0)), 0.0)


def take_step(model: nn.Module, docs: TokenizedDocs, weights: torch.Tensor, positions: np.ndarray, step_index: int,
              params: Params, state: OptimizerState, recipe: Recipe) -> tuple[Params, OptimizerState]:
    """Optimizer step ``step_index`` on the documents at ``positions`` (of ``docs``, weighted by ``weights[N]``).

    Documents of weight 0 are left out of the forward pass: their term is exactly zero, and a subset
    retrain would otherwise spend its time on the documents it drops.
    """
    kept = positions[(weights[torch.from_numpy(positions).to(weights.device)] != 0).cpu().numpy()]
    if kept.size:
        index = torch.from_numpy(kept).to(weights.device)
        grads = step_gradient(model, params, docs.take(kept), weights[index], recipe)
    else:
        grads = {k: torch.zeros_like(p) for k, p in params.items()}
    return update(params, state, grads, step_index, recipe)


def train(model: nn.Module, docs: TokenizedDocs, weights: torch.Tensor | None, recipe: Recipe) -> Params:
    """The trainable parameters after fine-tuning from the model's current ones on ``docs`` weighted by
    ``weights[N]`` (None: all ones). The model is not modified; the result is deterministic."""
    params = trainable_parameters(model)
    weights = document_weights(weights, len(docs), params)
    state = init_state(params, recipe)
    with replay_numerics():
        for step_index, positions in enumerate(batch_order(len(docs), recipe)):
            params, state = take_step(model, docs, weights, positions, step_index, params, state, recipe)
    return params


def document_weights(weights: torch.Tensor | None, num_docs: int, params: Params) -> torch.Tensor:
    """The weights as a vector on the parameters' device and in their dtype (None: all ones)."""
    first = next(iter(params.values()))
    if weights is None:
        return torch.ones(num_docs, dtype=first.dtype, device=first.device)
    if weights.shape != (num_docs,):
        raise RayattrError(f"weights of shape {tuple(weights.shape)} for {num_docs} documents: pass one weight each")
    if not torch.isfinite(weights).all():
        raise RayattrError("weights must be finite numbers")
    return weights.to(dtype=first.dtype, device=first.device)


def query_losses(model: nn.Module, params: Params, queries: TokenizedDocs) -> torch.Tensor:
    """Each query's loss ``[Q]`` at ``params`` (e.g. what ``train`` returned), without gradients."""
    check_documents(queries)
    chunks = [slice(start, start + QUERY_CHUNK) for start in range(0, len(queries), QUERY_CHUNK)]
    with torch.no_grad(), replay_numerics():
        return torch.cat([document_losses(model, params, queries.take(chunk)) for chunk in chunks])
