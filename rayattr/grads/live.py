"""Per-example gradient rows of a training run's own forward and backward passes.

A training step already computes, for every selected module, the activations ``a`` and
the output gradients ``g`` that a build row contracts: the collector's hooks
(``GradientCollector(live=True)``) read them off the step's backward, so collection costs
no extra forward or backward. Two things differ from a build:

* The trainer backpropagates its own loss, e.g. the mean over the micro-batch's label
  tokens, divided by the accumulation steps, times a mixed-precision loss scale. Rows use
  the build's convention, the gradient of each example's *summed* loss, so the capture
  reads the scale ``c`` of the trainer's loss ``L = c * sum_t l_t`` off the gradient of the
  logits, which for cross-entropy is ``c * (softmax - onehot)`` at every label position and
  zero elsewhere. A loss of another shape (label smoothing, z-loss) fails that check and
  is refused instead of giving wrong rows.
* Example ids ride in the batch under ``IDS_KEY``; a forward pre-hook takes them out
  before the model sees its arguments. A padding-free batch (several examples per row,
  ``position_ids`` restarting at 0) gets one row per example.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from rayattr.config import GradSpec, RayattrError
from rayattr.grads.collector import GradientCollector

IDS_KEY = "rayattr_ids"  # the batch key that carries the examples' dataset ids to the model call
IGNORE_INDEX = -100  # label of a position that is no prediction target (HF's convention)
SCALE_CHUNK = 1024  # label positions per softmax of the scale check
SCALE_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}  # relative residual of G - c D; 3e-2 below fp32


@dataclass
class LiveRows:
    """Rows of the examples one or more micro-batches trained on."""

    ids: np.ndarray  # int64 [E]
    num_tokens: np.ndarray  # int32 [E]: the example's tokens
    loss: np.ndarray  # float32 [E]: its summed (or mean, ``loss_reduction``) label-token loss
    grads: torch.Tensor  # [E, D] float32: the gradient of that loss, projected

    @classmethod
    def concat(cls, parts: list[LiveRows], dim: int) -> LiveRows:
        if not parts:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), torch.zeros(0, dim))
        return cls(np.concatenate([p.ids for p in parts]), np.concatenate([p.num_tokens for p in parts]),
                   np.concatenate([p.loss for p in parts]), torch.cat([p.grads for p in parts]))


@dataclass
class _MicroBatch:
    """What one micro-batch's forward recorded, completed by its backward."""

    ids: np.ndarray
    labels: torch.Tensor  # [B, T] targets of each position (the label of the next token), IGNORE_INDEX where none
    example_of_token: torch.Tensor  # [B, T] the example a position belongs to (-1: padding)
    fused: bool = False  # a fused LM head (trl's): the model returns label log-probs, not logits
    logits: torch.Tensor | None = None  # detached logits (fused: label log-probs), whose gradient carries c
    scale: float | None = None  # c of the trainer's loss L = c * sum of label-token losses
    token_loss: torch.Tensor | None = None  # [N] loss of each label position
    rows: list[LiveRows] = field(default_factory=list)


class LiveCapture:
    """Hooks on a training model that turn each training micro-batch into per-example rows.

    ``enabled`` off: micro-batches are only counted (their ids kept in ``seen``), no row is made.
    """

    def __init__(self, model: nn.Module, spec: GradSpec) -> None:
        if spec.per_token or spec.loss_fn != "ce" or spec.labels != "data":
            raise RayattrError("train-time rows are per document, of the training loss itself: leave --per-token, "
                               "--loss-fn and --labels at their defaults")
        self.model = model
        self.collector = GradientCollector(model, spec, live=True)
        self.enabled = True
        self.seen: list[np.ndarray] = []  # ids of every training micro-batch since the last ``take``
        self._batch: _MicroBatch | None = None
        self._done: list[LiveRows] = []
        head = model.get_output_embeddings()
        head_name = next(name for name, module in model.named_modules() if module is head)
        self._head_collected = any(layout.module == head_name for layout in self.collector.layouts)
        self._handles = [model.register_forward_pre_hook(self._on_model_call, with_kwargs=True),
                         model.register_forward_hook(self._on_model_output),
                         head.register_forward_hook(self._on_logits)]

    @property
    def dim(self) -> int:
        return self.collector.dim

    def take(self) -> tuple[LiveRows, np.ndarray]:
        """The rows made since the last call and the ids of every micro-batch seen; call it after
        the last backward of a step."""
        self._finish()
        rows, seen = LiveRows.concat(self._done, self.dim), np.concatenate([np.zeros(0, np.int64), *self.seen])
        self._done, self.seen = [], []
        return rows, seen

    def close(self) -> None:
        self.collector.close()
        for handle in self._handles:
            handle.remove()

    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ids = kwargs.pop(IDS_KEY, None)
        if not (torch.is_grad_enabled() and module.training):
            return args, kwargs  # evaluation: ids dropped, nothing captured
        self._finish()  # the previous micro-batch's backward has run
        if ids is None:
            raise RayattrError(f"the training batch carries no example ids ({IDS_KEY!r}); call "
                               "rayattr.train.prepare_trainer(trainer) before training, or pass ids to the collector")
        ids = torch.as_tensor(ids).cpu().numpy().astype(np.int64)
        self.seen.append(ids)
        if not self.enabled:
            return args, kwargs
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        labels = kwargs.get("labels")
        if labels is None:
            raise RayattrError("the training batch has no labels: train-time rows need the model to compute its "
                               "loss from `labels` (a causal-LM collator sets them)")
        fused = bool(kwargs.get("fused_lm_head"))
        if fused and self._head_collected:
            raise RayattrError("a fused LM head (trl's SFTTrainer) computes the logits without calling the output "
                               "embedding module, so its gradient is never seen; exclude it, e.g. "
                               "GradSpec(exclude_modules=('lm_head',))")
        mask = kwargs.get("attention_mask")
        valid = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        if len(ids) == input_ids.shape[0]:
            example_of_token, examples = torch.arange(len(ids), device=valid.device)[:, None].expand_as(valid), None
        else:
            example_of_token, examples = packed_examples(kwargs.get("position_ids"), valid, len(ids))
        example_of_token = example_of_token.masked_fill(~valid, -1)
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]
        self.collector.begin_batch(valid, examples)
        self._batch = _MicroBatch(ids, targets, example_of_token, fused)
        return args, kwargs

    def _on_model_output(self, module: nn.Module, args: tuple, output) -> None:
        """Under a fused head, ``L = -c * sum of label log-probs``: c is read off their gradient."""
        batch = self._batch
        log_probs = getattr(output, "log_probs", None)
        if batch is None or not batch.fused or batch.logits is not None or log_probs is None \
                or not log_probs.requires_grad:
            return
        batch.logits = log_probs.detach()
        log_probs.register_hook(lambda grad: self._on_log_probs_grad(batch, grad))

    def _on_logits(self, module: nn.Module, inputs: tuple, logits: torch.Tensor) -> None:
        batch = self._batch
        if batch is None or batch.logits is not None or not logits.requires_grad:
            return
        batch.logits = logits.detach()
        logits.register_hook(lambda grad: self._on_logits_grad(batch, grad))

    def _on_logits_grad(self, batch: _MicroBatch, grad: torch.Tensor) -> None:
        """Read ``c`` off ``dL/dlogits = c (softmax - onehot)`` at the label positions, zero elsewhere."""
        with torch.no_grad():
            target = batch.labels != IGNORE_INDEX
            logits, observed, labels = batch.logits[target], grad[target], batch.labels[target]
            sums = torch.zeros(3, dtype=torch.float64, device=grad.device)  # <G, D>, <D, D>, <G, G> at label positions
            losses = []
            for start in range(0, labels.numel(), SCALE_CHUNK):  # bounded temporaries on large vocabularies
                part = slice(start, start + SCALE_CHUNK)
                probs = torch.softmax(logits[part].float(), dim=-1)
                rows = torch.arange(probs.shape[0], device=probs.device)
                losses.append(-probs[rows, labels[part]].clamp_min(torch.finfo(torch.float32).tiny).log())
                probs[rows, labels[part]] -= 1.0  # D: d(sum of token losses)/dlogits
                g = observed[part].float()
                sums += torch.stack([(g * probs).sum(), probs.square().sum(), g.square().sum()]).double()
            batch.token_loss = torch.cat(losses) if losses else torch.zeros(0, device=grad.device)
            scale = sums[0] / sums[1].clamp_min(torch.finfo(torch.float64).tiny)
            # |G - cD|^2 = |G|^2 - c <G, D> at the least-squares c; positions that are no target must have G = 0.
            off_target = grad[~target].float().square().sum().double()
            self._check_residual((sums[2] - scale * sums[0]).clamp_min(0) + off_target, sums[2] + off_target,
                                 grad.dtype)
            batch.scale = float(scale) if labels.numel() and float(scale) != 0.0 else None

    def _on_log_probs_grad(self, batch: _MicroBatch, grad: torch.Tensor) -> None:
        """``dL/dlog_probs = -c`` at every label position (``[B, T-1]``, of the next token)."""
        with torch.no_grad():
            target = batch.labels[:, :-1] != IGNORE_INDEX
            observed = grad[target].double()
            batch.token_loss = -batch.logits[target].float()
            scale = -observed.mean() if observed.numel() else observed.new_zeros(())
            self._check_residual((observed + scale).square().sum(), observed.square().sum(), grad.dtype)
            batch.scale = float(scale) if observed.numel() and float(scale) != 0.0 else None

    def _check_residual(self, residual: torch.Tensor, total: torch.Tensor, dtype: torch.dtype) -> None:
        tolerance = SCALE_TOLERANCE.get(dtype, 3e-2)
        if total > 0 and residual > tolerance**2 * total:
            raise RayattrError(
                "the training loss is not a multiple of the summed token cross-entropy of the labels "
                f"(relative residual {float((residual / total).sqrt()):.2e}); train-time rows support the "
                "causal-LM cross-entropy (no label smoothing or auxiliary loss terms)")

    def _finish(self) -> None:
        """Turn the pending micro-batch into rows (after its backward)."""
        batch, self._batch = self._batch, None
        if batch is None:
            return
        grads = self.collector.end_batch()
        if batch.logits is not None and batch.token_loss is None:
            raise RayattrError("a training micro-batch ran forward but its backward never reached the logits; "
                               "collect rows around complete training steps")
        examples = len(batch.ids)
        of_token = batch.example_of_token[batch.labels != IGNORE_INDEX]
        label_tokens = torch.bincount(of_token, minlength=examples).cpu()
        num_tokens = torch.bincount(batch.example_of_token[batch.example_of_token >= 0], minlength=examples).cpu()
        loss = torch.zeros(examples, dtype=torch.float64)
        if batch.token_loss is not None:
            loss.index_add_(0, of_token.cpu(), batch.token_loss.double().cpu())
        grads = grads.cpu()
        if batch.scale is not None:
            grads.div_(batch.scale)
        if self.collector.spec.loss_reduction == "mean":
            grads.div_(label_tokens.clamp(min=1)[:, None]), loss.div_(label_tokens.clamp(min=1))
        kept = (label_tokens > 0).numpy()  # an example without a label token has no loss, and no row (as in build)
        if not kept.all():
            grads = grads[torch.from_numpy(kept)]
        self._done.append(LiveRows(batch.ids[kept], num_tokens.numpy()[kept].astype(np.int32),
                                   loss.numpy()[kept].astype(np.float32), grads))


def packed_examples(position_ids: torch.Tensor | None, valid: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A padding-free batch's examples: each starts where ``position_ids`` is 0.

    Returns the example of every position (``[B, T]``, -1 for padding) and, per example, the
    flat positions of its tokens (``[E, L]``, -1 past its end) for ``GradientCollector.begin_batch``.
    """
    if position_ids is None:
        raise RayattrError(f"the batch packs {count} examples into {valid.shape[0]} rows but has no position_ids to "
                           "tell them apart; use a padding-free collator that returns position_ids")
    flat_valid = valid.reshape(-1)
    starts = (position_ids.reshape(-1) == 0) & flat_valid
    if int(starts.sum()) != count:
        raise RayattrError(f"the batch carries {count} example ids but its position_ids start {int(starts.sum())} "
                           "sequences; every example must start at position 0")
    example = (starts.long().cumsum(0) - 1).masked_fill(~flat_valid, -1)
    positions = torch.arange(example.numel(), device=example.device)
    lengths = torch.bincount(example[example >= 0], minlength=count)
    offsets = torch.zeros(count, dtype=torch.long, device=example.device)
    offsets[example[starts]] = positions[starts]
    steps = torch.arange(int(lengths.max()), device=example.device)
    index = torch.where(steps[None, :] < lengths[:, None], offsets[:, None] + steps[None, :], -1)
    return example.reshape(valid.shape), index
