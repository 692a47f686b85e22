"""Typed specs for every run, their YAML form and their fingerprints.

A spec is the complete, serialisable description of one side of a computation.
Two tables are comparable only when the specs that shaped their vectors agree,
so every spec can produce a short stable fingerprint of exactly those fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

Precision = Literal["fp32", "bf16", "fp16"]
KroneckerType = Literal["rademacher", "normal"]
SketchType = Literal["fjl", "afjl", "affd", "qk", "dense"]
# Kronecker types also go by their explicit names; specs store the short ones, so
# tables built before the sketches existed keep their projection fingerprints.
ProjectionType = Literal[
    "rademacher", "normal", "kronecker-rademacher", "kronecker-normal", "fjl", "afjl", "affd", "qk", "dense"
]
KRONECKER_ALIASES = {"kronecker-rademacher": "rademacher", "kronecker-normal": "normal"}
VectorDtype = Literal["float16", "float32", "int4"]  # int4: rayattr.codec
LossReduction = Literal["sum", "mean"]
LossFn = Literal["ce", "kl"]
Labels = Literal["data", "sampled"]


ZERO_STAGES = (0, 3)  # 0: a model replica per worker; 3: parameters partitioned over the workers


VERBOSE_ENV = "RAYATTR_VERBOSE"  # set by ``rayattr --verbose``; Ray workers and job drivers inherit it


def verbose() -> bool:
    """Whether third-party logs and progress bars (Ray, transformers) are shown; rayattr's own output always is."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class RayattrError(Exception):
    """An error caused by user input or state, with a message that names the fix.

    Raised anywhere (also inside Ray workers); the CLI prints it as one line
    and exits non-zero instead of showing a traceback.
    """


class RayattrWarning(UserWarning):
    """A result that is valid but probably not what the user meant; the message names the fix."""


def one_line_warnings() -> None:
    """Print rayattr's own warnings as one ``warning: ...`` line on stderr (not Python's
    ``path:line: UserWarning`` form); other warnings keep their format. The CLI and the
    job entry points call it; calling it again changes nothing."""
    plain = warnings.showwarning
    if getattr(plain, "rayattr", False):
        return

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, RayattrWarning):
            print(f"warning: {message}", file=file or sys.stderr, flush=True)
        else:
            plain(message, category, filename, lineno, file, line)

    show.rayattr = True
    warnings.showwarning = show


def stable_hash(payload: Any, length: int = 16) -> str:
    """Hex digest of a JSON-serialisable payload, independent of dict order."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def setting(default: Any = dataclasses.MISSING, help: str = "", *, flags: tuple[str, ...] = (),
            choices: tuple[str, ...] = ()) -> Any:
    """A user-settable field: its default and its help text, the one place the CLI and the YAML configs learn
    them (``rayattr.cli.options`` makes the command-line options from these). ``flags`` overrides the option
    names (``--score`` for ``mode``); ``choices`` lists the values of a string known only at run time."""
    metadata = {"help": help} | ({"flags": flags} if flags else {}) | ({"choices": choices} if choices else {})
    if isinstance(default, (list, dict, set)):
        raise TypeError("a mutable default: use a tuple")
    return field(default=default, metadata=metadata)


# Settings that several commands' configs carry, each defined here once: ``shared(name)`` makes the field.
SHARED_SETTINGS: dict[str, tuple[Any, str, tuple[str, ...]]] = {
    "workers": (1, "Worker actors, each with a model replica (one GPU each when there are GPUs)", ()),
    "optimizer_state": (None, "optimizer.pt of an HF Trainer checkpoint (AdamW or Adafactor): the normalizer's "
                              "moments, instead of fitting them from data", ()),
    "zero_stage": (0, "3: partition the model over the --workers with DeepSpeed ZeRO-3 (models too large for one "
                      "device); 0: a replica each", ()),
    "hessian": (None, "Statistics directory (`rayattr hessian`/`mix`) to precondition with", ("--hessian-path",)),
    "unit_normalize": (False, "Cosine: unit-normalize query and index rows (after H^-1/2)", ()),
    "top_k": (50, "Training rows kept per query in the topk table", ()),
    "query_batch_size": (1024, "Queries multiplied at once (bounds the score block in memory)", ()),
    "per_token_scores": (False, "Also write a score per training token (token_scores table)", ()),
    "keep_gradients": (False, "Also store the training gradients computed on the fly (gradients table)", ()),
    "cpus_per_task": (1.0, "CPUs of each training task (and one GPU each when the cluster has GPUs)", ()),
}


def shared(name: str) -> Any:
    """The field of a shared setting (``SHARED_SETTINGS``)."""
    default, help, flags = SHARED_SETTINGS[name]
    return setting(default, help, flags=flags)


def check_zero_stage(stage: int) -> None:
    """Refuse ZeRO stages other than 0 (replicas) and 3 before any worker starts."""
    if stage not in ZERO_STAGES:
        raise RayattrError(
            f"--zero-stage {stage} is not supported: use 3 to partition the model over the workers, or 0 for a "
            "replica per worker (stages 1 and 2 partition optimizer state and weight gradients, which attribution has none of)"
        )


@dataclass(frozen=True)
class ModelSpec:
    """Which causal LM to load and how (local path or hub name).

    ``model`` may be a PEFT adapter directory: the base model then comes from
    ``base_model``, or else from the adapter's own config.
    """

    model: str = setting(help="Local model directory, PEFT adapter directory, or hub name")
    revision: str | None = setting(None, "Hub revision (branch, tag or commit) of --model")
    precision: Precision = setting("fp32", "Model weights dtype")
    device: str = setting("auto", "auto: a GPU when the worker has one, else the CPU; or a torch device name")
    attn_implementation: str | None = setting(None, "transformers attention implementation (default: the model's)")
    base_model: str | None = setting(None, "Base model of a PEFT adapter --model (default: the one its "
                                           "adapter_config.json names)")
    force_math_sdp: bool = setting(False, "Attention through the plain math kernel (no fused SDPA kernels; see "
                                          "`rayattr doctor`)")
    use_tf32_matmuls: bool = setting(False, "TF32 matmuls on GPUs that have them (faster fp32, less exact; see "
                                            "`rayattr doctor`)")


@dataclass(frozen=True)
class DataSpec:
    """Where documents come from and how they become token sequences.

    Without ``completion_column`` the loss covers every token of
    ``text_column``. With it, the document is ``prompt_column`` followed by
    ``completion_column`` and the loss covers the completion only.
    ``split`` accepts slices (``train[:100]``, ``train[10:20]``); ids stay the
    row indices of the full split, so slices of one split never collide.
    """

    dataset: str = setting(help="parquet file/dir, save_to_disk dir, .json/.jsonl/.csv, or hub name")
    split: str = setting("train", "Split, optionally sliced: train[:1000]")
    subset: str | None = setting(None, "Hub dataset configuration")
    text_column: str = setting("text", "Column of plain documents")
    prompt_column: str | None = setting(None, "Prompt column (with --completion-column)")
    completion_column: str | None = setting(None, "Completion column: loss on the completion only")
    max_length: int | None = setting(None, "Longest document in tokens (default: the model's)")
    truncation: bool = setting(False, "Cut documents longer than --max-length instead of failing")
    conversation_column: str | None = setting(None, "Column of {role, content} message lists, rendered by the chat "
                                                    "template; loss on assistant turns only")
    reward_column: str | None = setting(None, "Reward column: each document's loss times its advantage, reward - "
                                              "mean reward of its prompt (Dr. GRPO)")
    skip_nan_rewards: bool = setting(False, "Leave out documents with a NaN reward (counted as skipped) instead "
                                            "of failing")

    def __post_init__(self) -> None:
        if self.prompt_column and not self.completion_column:
            raise RayattrError(
                "--prompt-column needs --completion-column: the prompt is only "
                "used to mask the loss to the completion; use --text-column for plain documents"
            )
        if self.conversation_column and self.completion_column:
            raise RayattrError(
                "--conversation-column and --completion-column are two document formats: pass one of them"
            )
        if self.reward_column and not (self.completion_column or self.conversation_column):
            raise RayattrError(
                "--reward-column needs --prompt-column/--completion-column or --conversation-column: "
                "advantages compare documents that share a prompt"
            )
        if self.skip_nan_rewards and not self.reward_column:
            raise RayattrError("--skip-nan-rewards needs --reward-column")

    @property
    def document_columns(self) -> list[str]:
        """The columns that make up a document's text."""
        if self.conversation_column:
            return [self.conversation_column]
        if self.completion_column:
            return [self.prompt_column or self.text_column, self.completion_column]
        return [self.text_column]

    @property
    def columns(self) -> list[str]:
        """The dataset columns a run reads."""
        return self.document_columns + ([self.reward_column] if self.reward_column else [])


@dataclass(frozen=True)
class GradSpec:
    """How per-example gradients are captured, compressed and stored.

    Kronecker types project each module to ``p_out x p_in``: ``projection_dim``
    on both sides, or per-module sizes allocated from ``proj_rank_total``
    (``rayattr.grads.allocation``). Sketch types (``afjl``, ``affd``, ``qk``,
    ``fjl``, ``dense``) sketch each example's concatenated full gradient to
    ``projection_dim`` numbers in one go (``rayattr.grads.sketch``).
    """

    projection_dim: int = setting(16, "Kronecker types: per-side p (p*p per module); sketch types: total dimension D "
                                      "of each row; 0 keeps full gradients")
    projection_type: ProjectionType = setting("rademacher", "rademacher/normal (= kronecker-*): per-module L G R^T; "
                                                            "afjl, affd, qk, fjl, dense: one sketch of the concatenated gradient")
    seed: int = setting(0, "Projection seed")
    modules: tuple[str, ...] = setting(("*",), "Glob of module names to include (repeatable)")
    exclude_modules: tuple[str, ...] = setting((), "Glob of module names to exclude (repeatable)")
    per_token: bool = setting(False, "One row per token instead of per document")
    token_batch_size: int = setting(2048, "Padded tokens per forward/backward batch")
    dtype: VectorDtype = setting("float32", "Stored vector dtype; int4: 4-bit codes with one step per module (scores "
                                            "are computed from rows in it)")
    normalizer: str | None = setting(None, "Normalizer directory from `rayattr normalizer`")
    proj_rank_total: int | None = setting(None, "Kronecker: per-module budget p_out*p_in, split by module shape "
                                                "(replaces p x p)")
    proj_rank_min: int = setting(1, "Smallest p_out and p_in --proj-rank-total gives a module")
    row_orthonormal: bool = setting(False, "Kronecker factors with orthogonal rows (QR of the random draw); no "
                                           "effect at projection 0")
    include_bias: bool = setting(False, "Also attribute through biases: a biased module's gradient is [G | g_b] "
                                        "(kronfluence's convention)")
    loss_reduction: LossReduction = setting("sum", "Each document's loss: sum over its label tokens (Bergson's and "
                                                   "kronfluence's convention), or mean")
    loss_fn: LossFn = setting("ce", "ce: cross-entropy on the label tokens; kl: KL(adapted || base) per label token "
                                    "(a PEFT adapter --model)")
    labels: Labels = setting("data", "data: the documents' tokens are the targets (empirical Fisher); sampled: "
                                     "targets drawn from the model, seeded per document and position (true Fisher)")
    split_attention: tuple[str, ...] = setting((), "Glob of attention projections whose gradient is cut into one "
                                                   "block per head (repeatable)")
    num_heads: int | None = setting(None, "Heads of --split-attention (default: the model config's)")

    def __post_init__(self) -> None:
        if self.projection_dim < 0:
            raise RayattrError(f"--projection-dim must be >= 0 (0 keeps full gradients), got {self.projection_dim}")
        kind = KRONECKER_ALIASES.get(self.projection_type, self.projection_type)
        if kind not in typing.get_args(ProjectionType):
            raise RayattrError(
                f"unknown projection type {kind!r}; use one of {', '.join(typing.get_args(ProjectionType))}"
            )
        object.__setattr__(self, "projection_type", kind)
        self._check_kronecker_options()
        if self.loss_reduction not in typing.get_args(LossReduction):
            raise RayattrError(f"--loss-reduction must be sum or mean, got {self.loss_reduction!r}")
        if self.loss_fn not in typing.get_args(LossFn):
            raise RayattrError(f"--loss-fn must be ce or kl, got {self.loss_fn!r}")
        if self.labels not in typing.get_args(Labels):
            raise RayattrError(f"--labels must be data or sampled, got {self.labels!r}")
        if self.labels == "sampled" and self.loss_fn != "ce":
            raise RayattrError("--labels sampled draws cross-entropy targets; it has no meaning with --loss-fn kl")
        if self.dtype not in typing.get_args(VectorDtype):
            raise RayattrError(f"--dtype must be one of {', '.join(typing.get_args(VectorDtype))}, got {self.dtype!r}")
        if self.dtype == "int4" and not self.projection_dim:
            raise RayattrError("--dtype int4 quantizes projected rows (one step per module or sketch): "
                               "use --projection-dim > 0, or --dtype float16 for full gradients")
        if self.token_batch_size < 2:
            raise RayattrError(f"--token-batch-size must be >= 2, got {self.token_batch_size}")
        if self.num_heads is not None and self.num_heads < 1:
            raise RayattrError(f"--num-heads must be >= 1, got {self.num_heads}")
        if self.split_attention and self.include_bias:
            raise RayattrError("--split-attention and --include-bias together are not supported: a bias belongs to "
                               "no single head of an output projection; drop one of them")
        # Lists from YAML/CLI become tuples so specs stay hashable.
        object.__setattr__(self, "modules", tuple(self.modules))
        object.__setattr__(self, "exclude_modules", tuple(self.exclude_modules))
        object.__setattr__(self, "split_attention", tuple(self.split_attention))

    def _check_kronecker_options(self) -> None:
        """Rank allocation and orthonormal rows shape Kronecker factors; refuse them elsewhere. Without any
        projection there are no factors, and orthonormal rows (a TrackStar default) have no effect."""
        if not self.projection_dim:
            object.__setattr__(self, "row_orthonormal", False)
        asked = [flag for flag, on in (("--proj-rank-total", self.proj_rank_total is not None),
                                       ("--row-orthonormal", self.row_orthonormal)) if on]
        if asked and (self.sketched or not self.projection_dim):
            raise RayattrError(
                f"{' and '.join(asked)} shape Kronecker projections: use --projection-type rademacher or normal "
                f"with --projection-dim > 0 (got {self.projection_type!r}, dim {self.projection_dim})"
            )
        if self.proj_rank_min < 1:
            raise RayattrError(f"--proj-rank-min must be >= 1, got {self.proj_rank_min}")
        if self.proj_rank_total is not None and self.proj_rank_total < self.proj_rank_min**2:
            raise RayattrError(
                f"--proj-rank-total {self.proj_rank_total} is below --proj-rank-min squared "
                f"({self.proj_rank_min}^2 = {self.proj_rank_min**2}): no module could get its minimum"
            )

    @property
    def sketched(self) -> bool:
        """Whether rows are one sketch of the concatenated gradient (not per-module blocks)."""
        return bool(self.projection_dim) and self.projection_type in typing.get_args(SketchType)

    def projection_fingerprint(self) -> str:
        """The fields that decide which space vectors live in: the random subspace,
        plus the bias columns and the loss scaling when they are not the defaults.

        Options at their defaults are left out, so specs that predate them keep
        their fingerprints.
        """
        fields = self.projection_fields()
        if self.split_attention:  # tables record head blocks in their module layout instead
            fields |= {"split_attention": list(self.split_attention), "num_heads": self.num_heads}
        return stable_hash(fields)

    def projection_fields(self) -> dict[str, Any]:
        """Type, dim and seed, and the options that change the space when they are not at their defaults."""
        fields: dict[str, Any] = {"dim": self.projection_dim, "type": self.projection_type, "seed": self.seed}
        if self.proj_rank_total is not None:
            fields |= {"rank_total": self.proj_rank_total, "rank_min": self.proj_rank_min}
        if self.row_orthonormal:
            fields["row_orthonormal"] = True
        if self.include_bias:
            fields["include_bias"] = True
        if self.loss_reduction != "sum":
            fields["loss_reduction"] = self.loss_reduction
        if self.loss_fn != "ce":
            fields["loss_fn"] = self.loss_fn
        return fields


# TrackStar's own projection: p = 45 per side with orthonormal factor rows, in 4-bit codes: 2,025 / 2 + 4 = 1,016.5
# bytes per module and example, under the 1,024 of Bergson's default p = 16 in float32 (9,149 against 9,216 bytes
# on the fixture). On the hard fact-tracing fixture recall@10 went from 0.359 (p = 16) to 0.605, against 0.613 for
# full gradients (3 seeds; benchmarks/trackstar_storage.py --sweep).
TRACKSTAR_GRADS = GradSpec(projection_dim=45, dtype="int4", row_orthonormal=True)


@dataclass(frozen=True)
class RunSpec:
    """One build: model, data and gradient settings together (the YAML a run saves)."""

    model: ModelSpec
    data: DataSpec
    grads: GradSpec = field(default_factory=GradSpec)


def to_dict(spec: Any) -> dict[str, Any]:
    """Plain-dict form of a spec (tuples become lists), ready for JSON/YAML."""
    return json.loads(json.dumps(dataclasses.asdict(spec)))


def from_dict(cls: type, payload: dict[str, Any], base: Any = None) -> Any:
    """Rebuild a spec from its dict form (nested specs too), rejecting unknown keys by name.

    Fields the payload leaves out come from ``base`` when given: a nested spec starts from
    its field's own default (TrackStar's projection, not GradSpec's), not from the class's.
    """
    if not isinstance(payload, dict):
        raise RayattrError(f"{cls.__name__} must be a mapping of fields, got {type(payload).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(payload) - set(known))
    if unknown:
        raise RayattrError(f"unknown {cls.__name__} field(s) {unknown}; known fields are {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls) if f.init} if base is not None else {}
    for name, value in payload.items():
        nested = _spec_type(hints.get(name))
        if nested is not None and isinstance(value, dict):
            value = from_dict(nested, value, _default(known[name]))
        kwargs[name] = value
    return cls(**kwargs)


def _default(spec_field: dataclasses.Field) -> Any:
    """A field's default value (calling its factory), or None when it has none."""
    if spec_field.default is not dataclasses.MISSING:
        return spec_field.default
    if spec_field.default_factory is not dataclasses.MISSING:
        return spec_field.default_factory()
    return None


def _spec_type(hint: Any) -> type | None:
    """The dataclass a field holds (also inside ``X | None``), if any."""
    if dataclasses.is_dataclass(hint):
        return hint
    return next((arg for arg in typing.get_args(hint) if dataclasses.is_dataclass(arg)), None)
