"""Hook-based capture of per-example (and per-token) gradients.

For a linear map ``y = W a`` (``nn.Linear``; HF ``Conv1D`` stores ``W``
transposed but computes the same map) the gradient of example ``n`` is
``G_n = sum_t g_{n,t} a_{n,t}^T`` where ``a`` are the module's inputs and ``g``
the gradients of the loss with respect to its outputs. A forward hook keeps
``a`` (already multiplied by ``R^T`` when projecting), a tensor hook on the
output receives ``g`` during the backward pass, and the two are contracted per
example into ``L G_n R^T`` without ever forming ``G_n``.

Every parameter is frozen and only the input embeddings' output requires
grad, so the backward pass computes activation gradients only: no weight
gradient is ever materialised. All gradients are stored in ``[out, in]``
layout for both module types.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from rayattr.config import GradSpec, RayattrError
from rayattr.grads.allocation import allocate_ranks
from rayattr.grads.heads import HeadSource, split_heads
from rayattr.grads.objective import TokenBatch, document_loss
from rayattr.grads.normalizer import Normalizer
from rayattr.grads.projection import KroneckerProjection, module_projection
from rayattr.grads.sketch import make_sketch
from rayattr.model import ADAPTER_MODULES, is_adapted


@dataclass(frozen=True)
class ModuleLayout:
    """Where one module's (projected) gradient sits in a row vector."""

    name: str
    out_features: int
    in_features: int
    p_out: int
    p_in: int
    offset: int
    bias: bool = False  # in_features counts a ones column appended to the inputs: [G | g_b]
    head: HeadSource | None = None  # a head block (rayattr.grads.heads): (module, axis, first index)

    @property
    def width(self) -> int:
        return self.p_out * self.p_in

    @property
    def module(self) -> str:
        """The model module whose gradient this block is (itself, or the module of a head block)."""
        return self.head[0] if self.head else self.name

    def to_meta(self) -> dict:
        """The layout as table metadata records it, JSON-shaped (``head`` only for head blocks)."""
        meta = {k: v for k, v in asdict(self).items() if k != "head"}
        return meta | ({"head": list(self.head)} if self.head else {}) | {"width": self.width}


@dataclass
class CollectedBatch:
    """Gradients of one batch: a row per document, or per token in per-token mode."""

    grads: torch.Tensor  # [rows, D] float32
    loss: torch.Tensor  # [B] float32 over each document's label tokens (GradSpec.loss_reduction), times its loss_weight
    row_example: torch.Tensor  # [rows] index of the document in the batch
    row_token_pos: torch.Tensor | None  # [rows] position in the document (per-token mode)


def _linear_shape(module: nn.Module, include_bias: bool) -> tuple[int, int] | None:
    """``(out, in)`` of a module whose gradient the collector understands; ``in + 1`` for its bias."""
    if isinstance(module, nn.Linear):
        out_features, in_features = module.out_features, module.in_features
    elif isinstance(module, Conv1D):
        # A ZeRO-3 partitioned weight is an empty placeholder that keeps its full shape in ``ds_shape``.
        in_features, out_features = getattr(module.weight, "ds_shape", module.weight.shape)
    else:
        return None
    return out_features, in_features + int(include_bias and has_bias(module))


def has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None


def select_modules(
    model: nn.Module, include: tuple[str, ...], exclude: tuple[str, ...], include_bias: bool = False
) -> dict[str, tuple[int, int]]:
    """Linear/Conv1D modules whose names match an include glob and no exclude glob.

    A model with PEFT adapters reads the default ``("*",)`` as its adapter modules
    (``lora_A``/``lora_B``), the only ones the fine-tune changed. Returns
    ``{name: (out, in)}`` in the model's module order, which fixes the layout of
    every gradient row. With ``include_bias`` a biased module's
    gradient is ``[G | g_b]``, the weight gradient of its inputs with a ones
    column appended.
    """
    if include == ("*",) and is_adapted(model):
        include = ADAPTER_MODULES
    candidates = {
        name: shape for name, m in model.named_modules() if (shape := _linear_shape(m, include_bias)) is not None
    }
    chosen = {
        name: shape
        for name, shape in candidates.items()
        if any(fnmatch.fnmatchcase(name, p) for p in include) and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    }
    if not chosen:
        sample = ", ".join(list(candidates)[:8])
        raise RayattrError(
            f"no Linear/Conv1D module matches --modules {list(include)} minus --exclude-modules {list(exclude)}; "
            f"the model has e.g. {sample}"
        )
    return chosen


def projection_sizes(shapes: dict[str, tuple[int, int]], spec: GradSpec) -> dict[str, tuple[int, int]]:
    """Each module's ``(p_out, p_in)``: full ``(O, I)`` without a Kronecker projection
    (``projection_dim=0`` or a sketch type, which sketches the full concatenation),
    the allocation of ``proj_rank_total`` when set, else ``p x p``."""
    if not spec.projection_dim or spec.sketched:
        return dict(shapes)
    if spec.proj_rank_total is not None:
        return allocate_ranks(shapes, spec.proj_rank_total, spec.proj_rank_min)
    return {name: (spec.projection_dim, spec.projection_dim) for name in shapes}


def plan_layout(
    shapes: dict[str, tuple[int, int]], spec: GradSpec, biased: frozenset[str] = frozenset(),
    heads: dict[str, HeadSource] | None = None,
) -> list[ModuleLayout]:
    """Assign each module its ``p_out x p_in`` slice of the row vector (before any sketch);
    ``biased`` names the modules whose ``in`` counts a bias column, ``heads`` the head blocks' sources."""
    layouts, offset = [], 0
    heads = heads or {}
    for name, (p_out, p_in) in projection_sizes(shapes, spec).items():
        out_features, in_features = shapes[name]
        layouts.append(ModuleLayout(name, out_features, in_features, p_out, p_in, offset, name in biased,
                                    heads.get(name)))
        offset += p_out * p_in
    return layouts


class GradientCollector:
    """Turns one forward+backward pass into per-example gradient rows.

    Hooks stay registered for the collector's lifetime (``close`` removes
    them); projection matrices are built once, on the model's device. With a
    sketch type the hooks write full gradients into a ``width``-long row and the
    sketch maps each finished row to ``dim`` numbers: one sketch over the whole
    concatenation, so modules share the budget and a single seeded map fixes the
    space (a per-module sketch would need a budget split like the Kronecker one).
    """

    def __init__(self, model: nn.Module, spec: GradSpec, normalizer: Normalizer | None = None, live: bool = False) -> None:
        """``live``: hooks on a model that trains (``rayattr.grads.live``): its parameters keep
        ``requires_grad`` and the caller runs forward and backward between ``begin_batch`` and ``end_batch``."""
        self.model = model
        self.spec = spec
        if spec.loss_fn == "kl" and not is_adapted(model):
            raise RayattrError("--loss-fn kl compares the model with its PEFT adapters disabled: pass a PEFT "
                               "adapter directory as --model, or use --loss-fn ce")
        shapes = select_modules(model, spec.modules, spec.exclude_modules, spec.include_bias)
        modules = dict(model.named_modules())
        biased = frozenset(name for name in shapes if spec.include_bias and has_bias(modules[name]))
        self.shapes, heads = split_heads(model, shapes, spec)
        self.layouts = plan_layout(self.shapes, spec, biased, heads)
        self.width = sum(layout.width for layout in self.layouts)  # the hooks' row, before any sketch
        self.device = device = next(model.parameters()).device
        self.sketch = None
        if spec.sketched:
            self.sketch = make_sketch(spec.projection_type, self.width, spec.projection_dim, spec.seed).to(device)
        self.dim = spec.projection_dim if spec.sketched else self.width
        self.seeded: dict[str, KroneckerProjection] = {}  # the projections before a normalizer folds into them
        if spec.projection_dim and not spec.sketched:
            for layout in self.layouts:
                proj = module_projection(
                    layout.name, layout.out_features, layout.in_features, (layout.p_out, layout.p_in),
                    spec.projection_type, spec.seed, spec.row_orthonormal,
                )
                self.seeded[layout.name] = KroneckerProjection(proj.left.to(device), proj.right.to(device))
        self.use_normalizer(normalizer)
        if not live:
            model.requires_grad_(False)
        self._handles = [
            modules[layout.module].register_forward_hook(partial(self._on_forward, layout)) for layout in self.layouts
        ]
        if not live:
            self._handles.append(model.get_input_embeddings().register_forward_hook(_require_grad))
        # Optional per-token observer ``tap(module, a[n, p_in], g[n, p_out])`` of the valid
        # tokens' normalized and projected activations and output gradients: K-FAC uses it.
        # Projected factors are exact: with a' = R a and g' = L g, E[a'a'^T] = R A R^T.
        self.tap: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None
        self._acts: dict[str, torch.Tensor] = {}
        self._seen: set[str] = set()  # modules whose forward (outside a backward) ran since the last reset
        self._out: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None
        self._token_rows: torch.Tensor | None = None
        self._examples: torch.Tensor | None = None  # [E, L] flat token index of each example's tokens (begin_batch)
        self._summed = False  # between begin_sum and end_sum

    def use_normalizer(self, normalizer: Normalizer | None) -> None:
        """Normalize the rows of later batches by ``normalizer`` (None: not at all). A training run
        swaps in its optimizer's moments before each step (``rayattr.grads.live``).

        Adafactor: (row scale of g, col scale of a); Adam: elementwise 1/(sqrt(v)+eps) on the full G.
        """
        self.normalizer = normalizer
        self.scales: dict[str, tuple[torch.Tensor, torch.Tensor] | torch.Tensor] = {}
        self.projections = dict(self.seeded)
        if normalizer is None:
            return
        normalizer.check_shapes(self.shapes)
        for layout in self.layouts:
            scale, seeded = normalizer.factors(layout.name, self.device), self.seeded.get(layout.name)
            if isinstance(scale, tuple) and seeded is not None:
                # Adafactor scales rows of g and columns of a: L diag(s) g = (L diag(s)) g, so
                # folding them into the factors saves two full-width multiplies per module.
                self.projections[layout.name] = KroneckerProjection(seeded.left * scale[0], seeded.right * scale[1])
            else:
                self.scales[layout.name] = scale

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def collect(self, batch: TokenBatch, emit_rows: bool = True) -> CollectedBatch:
        """Per-example gradients of the causal-LM loss of ``batch`` (``spec.loss_reduction`` per document).

        ``emit_rows=False`` runs the hooks for the ``tap`` alone and returns no
        rows: K-FAC needs per-token factors, not per-example gradients.
        """
        valid = batch.attention_mask
        rows = batch.input_ids.shape[0]
        row_example = torch.arange(rows, device=valid.device)
        row_token_pos = None
        if self.spec.per_token:
            # Every real position but the last: the last one's output feeds no
            # loss term, so its gradient is zero, and token rows sum to the
            # document row exactly.
            lengths = valid.sum(1, keepdim=True)
            doc_pos = (batch.position_ids * valid).long()
            self._token_rows = valid & (doc_pos < lengths - 1)
            row_example, token_index = self._token_rows.nonzero(as_tuple=True)
            row_token_pos = doc_pos[row_example, token_index]
            rows = row_example.numel()
        self._valid = valid.unsqueeze(-1)
        self._out = torch.zeros(rows, self.width if emit_rows else 0, device=valid.device, dtype=torch.float32)
        try:
            loss = document_loss(self.model, batch, self.spec)
            loss.sum().backward()
            missing = [name for name in self._acts]
            if missing:
                raise RuntimeError(f"modules ran forward but got no gradient: {missing[:4]}")
            grads = self._out if self.sketch is None or not emit_rows else self.sketch(self._out)
            return CollectedBatch(grads, loss.detach(), row_example, row_token_pos)
        finally:
            self._reset()

    def begin_sum(self) -> None:
        """Sum the gradient of every loss the caller backpropagates from now on into one row.

        For callers that run their own forward and backward (``Attributor.trace``):
        batch and token dimensions are flattened into one sequence, so the row is
        the gradient of the caller's whole loss. No padding mask is applied: the
        caller's loss decides which positions count.
        """
        self._summed = True
        self._out = torch.zeros(1, self.width, device=self.device, dtype=torch.float32)

    def end_sum(self) -> torch.Tensor:
        """The ``[D]`` row summed since ``begin_sum``; every forward must have had its backward."""
        try:
            if self._acts:
                raise RayattrError(
                    f"modules {list(self._acts)[:4]} ran forward but got no gradient; "
                    "call loss.backward() inside the trace block"
                )
            return self._out[0] if self.sketch is None else self.sketch(self._out)[0]
        finally:
            self._reset()

    def begin_batch(self, valid: torch.Tensor, examples: torch.Tensor | None = None) -> None:
        """Rows of a forward and backward the caller runs (a training step's): one per batch row, or,
        with ``examples`` (``[E, L]`` positions of each example's tokens in the flattened batch, -1
        past its end: a padding-free batch), one per example. ``valid`` (``[B, T]``) masks padding."""
        self._valid = valid.unsqueeze(-1)
        if examples is not None:  # -1 points at a zero row appended to the flattened tokens
            examples = examples.masked_fill(examples < 0, valid.numel())
        self._examples = examples
        rows = valid.shape[0] if examples is None else examples.shape[0]
        self._out = torch.zeros(rows, self.width, device=valid.device, dtype=torch.float32)

    def end_batch(self) -> torch.Tensor:
        """``[rows, D]`` of the batch since ``begin_batch``: the gradient of whatever loss the caller
        backpropagated, per row or example (its scale is the caller's to undo)."""
        try:
            if self._acts:
                raise RayattrError(f"modules {list(self._acts)[:4]} ran forward but got no gradient before the "
                                   "batch ended; run the backward of every forward that requires grad")
            return self._out if self.sketch is None else self.sketch(self._out)
        finally:
            self._reset()

    def _reset(self) -> None:
        self._acts.clear()
        self._seen.clear()
        self._out = self._valid = self._token_rows = self._examples = None
        self._summed = False

    def _on_forward(self, layout: ModuleLayout, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not output.requires_grad or self._out is None:
            return
        recomputing = torch._C._current_graph_task_id() != -1  # inside a backward: gradient checkpointing
        if recomputing and layout.name in self._seen:
            return  # non-reentrant: the gradient reaches the first forward's output, whose inputs are kept
        if not recomputing:  # (reentrant: the first forward ran without grad, so the recompute's output is the one)
            if layout.name in self._acts:
                raise RayattrError(f"module {layout.name} ran twice in one forward pass (a shared module); exclude "
                                   "it with --exclude-modules")
            self._seen.add(layout.name)
        with torch.autocast(output.device.type, enabled=False):  # fp32 under a mixed-precision forward too
            self._keep_activations(layout, inputs[0].detach().float())  # detached: out of the autograd graph
        output.register_hook(partial(self._on_backward, layout))

    def _keep_activations(self, layout: ModuleLayout, acts: torch.Tensor) -> None:
        """Store the module's (scaled, projected) input activations until its output gradient arrives."""
        if layout.head and layout.head[1] == "in":
            acts = acts[..., layout.head[2] : layout.head[2] + layout.in_features]
        if layout.bias:
            acts = torch.cat([acts, acts.new_ones(*acts.shape[:-1], 1)], dim=-1)
        if self._summed:
            acts = acts.reshape(1, -1, acts.shape[-1])
        scale = self.scales.get(layout.name)
        if isinstance(scale, tuple):
            acts = acts * scale[1]
        projection = self.projections.get(layout.name)
        if projection is not None and not isinstance(scale, torch.Tensor):
            acts = acts @ projection.right.T
        self._acts[layout.name] = acts

    def _on_backward(self, layout: ModuleLayout, grad: torch.Tensor) -> None:
        acts = self._acts.pop(layout.name)
        grad = grad.float()
        if layout.head and layout.head[1] == "out":
            grad = grad[..., layout.head[2] : layout.head[2] + layout.out_features]
        scale = self.scales.get(layout.name)
        projection = self.projections.get(layout.name)
        target = self._out[:, layout.offset : layout.offset + layout.width]
        if isinstance(scale, torch.Tensor):  # Adam: form G, normalize it, then project
            full = self._outer(self._mask(grad), acts) * scale
            if projection is not None:
                full = projection.left @ full @ projection.right.T
            target.add_(full.flatten(1))
            return
        if isinstance(scale, tuple):
            grad = grad * scale[0]
        if projection is not None:
            grad = grad @ projection.left.T
        grad = self._mask(grad)  # after projecting: p columns to mask instead of O
        if self.tap is not None:
            valid = self._valid.squeeze(-1)
            self.tap(layout.name, acts[valid], grad[valid])
        if target.shape[1]:
            target.add_(self._outer(grad, acts).flatten(1))

    def _mask(self, grad: torch.Tensor) -> torch.Tensor:
        """Zero the padding positions' output gradients (summed mode: flatten to one sequence)."""
        return grad.reshape(1, -1, grad.shape[-1]) if self._summed else grad.masked_fill(~self._valid, 0.0)

    def _outer(self, grad: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        """Per-row ``sum_t g_t a_t^T``: ``[B, O, I]`` per document, ``[tokens, O, I]`` per token."""
        if self._examples is not None:
            grad, acts = _by_example(grad, self._examples), _by_example(acts, self._examples)
        if self._token_rows is None:
            return torch.bmm(grad.transpose(1, 2), acts)
        mask = self._token_rows
        return grad[mask].unsqueeze(2) * acts[mask].unsqueeze(1)


def _by_example(values: torch.Tensor, examples: torch.Tensor) -> torch.Tensor:
    """``[E, L, d]``: each example's tokens of a flattened ``[B, T, d]`` batch (index past the end: zeros)."""
    flat = values.reshape(-1, values.shape[-1])
    return torch.cat([flat, flat.new_zeros(1, flat.shape[1])])[examples]


def _require_grad(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    """Make the embeddings' output a leaf of the backward graph (params stay frozen)."""
    output.requires_grad_(True)
