"""What a gradient row is the gradient of: a padded token batch and each document's loss.

``ce`` is the causal-LM cross-entropy over a document's label tokens; ``kl`` is
``KL(p_adapted || p_base)`` per label token (Bergson's ``--loss-fn kl``), where the
base distribution is the same model with its PEFT adapters disabled, computed
without gradients. With ``labels = "sampled"`` the cross-entropy's targets are drawn
from the model's own next-token distribution instead of read from the document
(``sample_labels``): statistics of those gradients estimate the true Fisher, those
of dataset labels the empirical one. Either is summed per document (or averaged, ``loss_reduction
= "mean"``) and scaled by the document's ``loss_weight`` when it has one (a
reward advantage).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rayattr.config import GradSpec, LossReduction
from rayattr.grads.projection import stable_seed


@dataclass
class TokenBatch:
    """A padded batch of documents, ready for the model."""

    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] bool
    label_mask: torch.Tensor  # [B, T] bool: token t is a prediction target
    position_ids: torch.Tensor  # [B, T] int64, 0 at each document's first token
    loss_weight: torch.Tensor | None = None  # [B] float32: each document's loss is scaled by it (rewards)
    doc_ids: torch.Tensor | None = None  # [B] int64 dataset ids: seeds of sampled labels

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(*(None if t is None else t.to(device, non_blocking=True) for t in vars(self).values()))


def document_loss(model: nn.Module, batch: TokenBatch, spec: GradSpec) -> torch.Tensor:
    """``[B]``: each document's loss under ``spec.loss_fn``, reduced and weighted; backpropagate its sum."""
    logits = _logits(model, batch)
    if spec.loss_fn == "kl":
        with torch.no_grad(), model.disable_adapter():
            reference = _logits(model, batch)
        loss = per_example_kl(logits, reference, batch.label_mask, spec.loss_reduction)
    else:
        targets = batch.input_ids
        if spec.labels == "sampled":
            targets = sample_labels(logits, batch.position_ids, batch.doc_ids, spec.seed)
        loss = per_example_loss(logits, targets, batch.label_mask, spec.loss_reduction)
    return loss if batch.loss_weight is None else loss * batch.loss_weight


def sample_labels(logits: torch.Tensor, position_ids: torch.Tensor, doc_ids: torch.Tensor | None, seed: int) -> torch.Tensor:
    """``[B, T]`` tokens drawn from the model's next-token distributions (position 0 unused).

    The uniform behind the draw for a document's position ``p`` comes from a CPU
    generator seeded by ``(seed, document id)``, indexed by ``p``: the labels of a
    document do not depend on its batch, its padding, the worker or the device.
    Drawn by inverting the cumulative distribution, one uniform per position.
    """
    if doc_ids is None:
        raise ValueError("sampled labels need the batch's document ids")
    with torch.no_grad():
        probs = torch.softmax(logits[:, :-1].float(), dim=-1)
        width = logits.shape[1]
        uniforms = torch.stack([
            torch.rand(width, generator=torch.Generator().manual_seed(stable_seed("labels", str(int(d)), seed)),
                       dtype=torch.float64)
            for d in doc_ids.cpu()
        ]).to(logits.device)
        drawn = uniforms.gather(1, position_ids[:, 1:].clamp(min=0))
        cdf = probs.double().cumsum(-1)
        tokens = torch.searchsorted(cdf, (drawn * cdf[..., -1]).unsqueeze(-1)).squeeze(-1)
        tokens = tokens.clamp(max=probs.shape[-1] - 1)
    return torch.cat([torch.zeros_like(tokens[:, :1]), tokens], dim=1)


def _logits(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                 position_ids=batch.position_ids, use_cache=False).logits


def _reduce(token_loss: torch.Tensor, targets: torch.Tensor, reduction: LossReduction) -> torch.Tensor:
    summed = token_loss.masked_fill(~targets, 0.0).sum(1)
    return summed / targets.sum(1).clamp(min=1) if reduction == "mean" else summed


def per_example_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, label_mask: torch.Tensor, reduction: LossReduction = "sum"
) -> torch.Tensor:
    """Causal-LM cross-entropy over each document's label tokens, ``[B]``: their sum, or
    (``"mean"``) their mean, which weighs every document alike whatever its length."""
    token_loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    return _reduce(token_loss, label_mask[:, 1:], reduction)


def per_example_kl(
    logits: torch.Tensor, reference: torch.Tensor, label_mask: torch.Tensor, reduction: LossReduction = "sum"
) -> torch.Tensor:
    """``sum_v p (log p - log q)`` at each label position (``p`` the model's next-token
    distribution, ``q`` the reference's), reduced per document like the cross-entropy."""
    log_p = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    log_q = torch.log_softmax(reference[:, :-1].float(), dim=-1)
    token_kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return _reduce(token_kl, label_mask[:, 1:], reduction)
