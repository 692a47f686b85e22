"""The CLI's shared vocabulary: choice types, option types, the RunSpec they build, the
streaming-options decorator, ``--save-config`` and the one-line error wrapper."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from rayattr import config
from rayattr.cli.render import console
from rayattr.config import DataSpec, GradSpec, ModelSpec, RayattrError, RunSpec
from rayattr.hessian.methods import HessianMethod
from rayattr.score import AGGREGATIONS, SCORE_MODES


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A CLI choice type over ``values`` (members named like the values, ``-`` as ``_``)."""
    return Enum(name, {value.replace("-", "_"): value for value in values}, type=str)


# Choice types, from the same tuples the library validates against.
Precision = _choices("Precision", typing.get_args(config.Precision))
ProjectionKind = _choices("ProjectionKind", typing.get_args(config.ProjectionType))
VectorDtype = _choices("VectorDtype", typing.get_args(config.VectorDtype))
NormalizerKind = _choices("NormalizerKind", ("adafactor", "adam"))
TrackstarNormalizer = _choices("TrackstarNormalizer", ("auto", "adafactor", "adam", "none"))
Method = _choices("Method", tuple(name for name, method in HessianMethod.registry.items() if method.preconditions))
AggregationKind = _choices("AggregationKind", AGGREGATIONS)
ScoreKind = _choices("ScoreKind", SCORE_MODES)
AnnMetric = _choices("AnnMetric", ("cosine", "dot"))
LossReduction = _choices("LossReduction", typing.get_args(config.LossReduction))
LossFn = _choices("LossFn", typing.get_args(config.LossFn))
Labels = _choices("Labels", typing.get_args(config.Labels))


def user_errors(command: Callable) -> Callable:
    """Print a RayattrError as one line and exit 1 instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except RayattrError as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


# Options shared by every command that streams a dataset through the model.
RunPathArg = Annotated[str, typer.Argument(help="Run directory / LanceDB database (local path or URI)")]
ModelOpt = Annotated[str, typer.Option(help="Local model directory, PEFT adapter directory, or hub name")]
BaseModelOpt = Annotated[Optional[str], typer.Option(
    help="Base model of a PEFT adapter --model (default: the one its adapter_config.json names)")]
ForceMathSdpOpt = Annotated[bool, typer.Option(help="Attention through the plain math kernel (no fused SDPA kernels; see `rayattr doctor`)")]
Tf32Opt = Annotated[bool, typer.Option(help="TF32 matmuls on GPUs that have them (faster fp32, less exact; see `rayattr doctor`)")]
LabelsOpt = Annotated[Labels, typer.Option(
    help="data: the documents' tokens are the targets (empirical Fisher); sampled: targets drawn from the model (true Fisher)")]
LossFnOpt = Annotated[LossFn, typer.Option(
    help="ce: cross-entropy on the label tokens; kl: KL(adapted || base) per label token (a PEFT adapter --model)")]
DatasetOpt = Annotated[str, typer.Option(help="parquet file/dir, save_to_disk dir, .json/.jsonl/.csv, or hub name")]
SplitOpt = Annotated[str, typer.Option(help="Split, optionally sliced: train[:1000]")]
SubsetOpt = Annotated[Optional[str], typer.Option(help="Hub dataset configuration")]
TextColumnOpt = Annotated[str, typer.Option(help="Column of plain documents")]
PromptColumnOpt = Annotated[Optional[str], typer.Option(help="Prompt column (with --completion-column)")]
CompletionColumnOpt = Annotated[Optional[str], typer.Option(help="Completion column: loss on the completion only")]
ConversationColumnOpt = Annotated[Optional[str], typer.Option(
    help="Column of {role, content} message lists, rendered by the chat template; loss on assistant turns only")]
RewardColumnOpt = Annotated[Optional[str], typer.Option(
    help="Reward column: each document's loss times its advantage, reward - mean reward of its prompt (Dr. GRPO)")]
SkipNanRewardsOpt = Annotated[bool, typer.Option(help="Leave out documents with a NaN reward (counted as skipped) instead of failing")]
MaxLengthOpt = Annotated[Optional[int], typer.Option(help="Longest document in tokens (default: the model's)")]
TruncationOpt = Annotated[bool, typer.Option(help="Cut documents longer than --max-length instead of failing")]
ProjectionDimOpt = Annotated[int, typer.Option(
    help="Kronecker types: per-side p (p*p per module); sketch types: total dimension D of each row; 0 keeps full gradients")]
ProjectionTypeOpt = Annotated[ProjectionKind, typer.Option(
    help="rademacher/normal (= kronecker-*): per-module L G R^T; afjl, affd, qk, fjl, dense: one sketch of the concatenated gradient")]
RankTotalOpt = Annotated[Optional[int], typer.Option(
    help="Kronecker: per-module budget p_out*p_in, split by module shape (replaces p x p)")]
RankMinOpt = Annotated[int, typer.Option(help="Smallest p_out and p_in --proj-rank-total gives a module")]
RowOrthonormalOpt = Annotated[bool, typer.Option(help="Kronecker factors with orthogonal rows (QR of the random draw)")]
SeedOpt = Annotated[int, typer.Option(help="Projection seed")]
DtypeOpt = Annotated[VectorDtype, typer.Option(
    help="Stored vector dtype; int4: 4-bit codes with one step per module (scores are computed from rows in it)")]
IncludeBiasOpt = Annotated[bool, typer.Option(
    help="Also attribute through biases: a biased module's gradient is [G | g_b] (kronfluence's convention)")]
LossReductionOpt = Annotated[LossReduction, typer.Option(
    help="Each document's loss: sum over its label tokens (Bergson's and kronfluence's convention), or mean")]
SplitAttentionOpt = Annotated[Optional[list[str]], typer.Option(
    help="Glob of attention projections whose gradient is cut into one block per head (repeatable)")]
NumHeadsOpt = Annotated[Optional[int], typer.Option(help="Heads of --split-attention (default: the model config's)")]
ModulesOpt = Annotated[Optional[list[str]], typer.Option(help="Glob of module names to include (repeatable)")]
ExcludeOpt = Annotated[Optional[list[str]], typer.Option(help="Glob of module names to exclude (repeatable)")]
TokenBatchOpt = Annotated[int, typer.Option(help="Padded tokens per forward/backward batch")]
WorkersOpt = Annotated[int, typer.Option(help="Worker actors, each with a model replica (one GPU each when there are GPUs)")]
ZeroStageOpt = Annotated[int, typer.Option(
    help="3: partition the model over the --workers with DeepSpeed ZeRO-3 (models too large for one device); 0: a replica each")]
PrecisionOpt = Annotated[Precision, typer.Option(help="Model weights dtype")]
NormalizerOpt = Annotated[Optional[str], typer.Option(help="Normalizer directory from `rayattr normalizer`")]
RayAddressOpt = Annotated[Optional[str], typer.Option(help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")]
SaveConfigOpt = Annotated[Optional[Path], typer.Option(
    help="Write this command's YAML config (for `rayattr run` / `ray job submit ... jobs/`) and exit")]
# Options of the commands that precondition and score queries (reduce, score, trackstar).
UnitNormalizeOpt = Annotated[bool, typer.Option(help="Cosine: unit-normalize query and index rows (after H^-1/2)")]
HessianPathOpt = Annotated[Optional[str], typer.Option(help="Statistics directory (`rayattr hessian`/`mix`) to precondition with")]
TopKOpt = Annotated[int, typer.Option(help="Training rows kept per query in the topk table")]
QueryBatchOpt = Annotated[int, typer.Option(help="Queries multiplied at once (bounds the score block in memory)")]
PerTokenScoresOpt = Annotated[bool, typer.Option(help="Also write a score per training token (token_scores table)")]
KeepGradientsOpt = Annotated[bool, typer.Option(help="Also store the training gradients computed on the fly (gradients table)")]


def run_spec(
    model: str, dataset: str, split: str = "train", subset: str | None = None, text_column: str = "text",
    prompt_column: str | None = None, completion_column: str | None = None, max_length: int | None = None,
    truncation: bool = False, precision: Precision = Precision.fp32, conversation_column: str | None = None,
    reward_column: str | None = None, skip_nan_rewards: bool = False, base_model: str | None = None,
    force_math_sdp: bool = False, use_tf32_matmuls: bool = False, **grads,
) -> RunSpec:
    """The RunSpec every streaming command builds from its shared options."""
    grads["modules"] = tuple(grads.get("modules") or ("*",))
    grads["exclude_modules"] = tuple(grads.get("exclude_modules") or ())
    grads["split_attention"] = tuple(grads.get("split_attention") or ())
    for key, value in list(grads.items()):
        if isinstance(value, Enum):
            grads[key] = value.value
    return RunSpec(
        model=ModelSpec(model=model, precision=precision.value, base_model=base_model, force_math_sdp=force_math_sdp,
                        use_tf32_matmuls=use_tf32_matmuls),
        data=DataSpec(
            dataset=dataset, split=split, subset=subset, text_column=text_column, prompt_column=prompt_column,
            completion_column=completion_column, max_length=max_length, truncation=truncation,
            conversation_column=conversation_column, reward_column=reward_column, skip_nan_rewards=skip_nan_rewards,
        ),
        grads=GradSpec(**grads),
    )


def _stream_options(
    split: SplitOpt = "train",
    subset: SubsetOpt = None,
    text_column: TextColumnOpt = "text",
    prompt_column: PromptColumnOpt = None,
    completion_column: CompletionColumnOpt = None,
    conversation_column: ConversationColumnOpt = None,
    reward_column: RewardColumnOpt = None,
    skip_nan_rewards: SkipNanRewardsOpt = False,
    max_length: MaxLengthOpt = None,
    truncation: TruncationOpt = False,
    projection_dim: ProjectionDimOpt = 16,
    projection_type: ProjectionTypeOpt = ProjectionKind.rademacher,
    proj_rank_total: RankTotalOpt = None,
    proj_rank_min: RankMinOpt = 1,
    row_orthonormal: RowOrthonormalOpt = False,
    seed: SeedOpt = 0,
    include_bias: IncludeBiasOpt = False,
    loss_reduction: LossReductionOpt = LossReduction.sum,
    loss_fn: LossFnOpt = LossFn.ce,
    labels: LabelsOpt = Labels.data,
    modules: ModulesOpt = None,
    exclude_modules: ExcludeOpt = None,
    split_attention: SplitAttentionOpt = None,
    num_heads: NumHeadsOpt = None,
    token_batch_size: TokenBatchOpt = 2048,
    precision: PrecisionOpt = Precision.fp32,
    force_math_sdp: ForceMathSdpOpt = False,
    use_tf32_matmuls: Tf32Opt = False,
    base_model: BaseModelOpt = None,
    normalizer: NormalizerOpt = None,
) -> None:
    """The options of every command that streams a dataset through the model (a template: never called)."""


def streams_dataset(*without: str) -> Callable[[Callable], Callable]:
    """Append the shared data and gradient options (minus ``without``) to a command's CLI.

    The command receives them as one ``options`` dict. Typer reads a
    command's signature, so the wrapper advertises the command's own
    parameters followed by those of ``_stream_options``.
    """

    def decorate(command: Callable) -> Callable:
        shared = [p for name, p in inspect.signature(_stream_options, eval_str=True).parameters.items() if name not in without]
        own = [p for name, p in inspect.signature(command, eval_str=True).parameters.items() if name != "options"]

        @functools.wraps(command)
        def wrapper(**kwargs):
            options = {p.name: kwargs.pop(p.name) for p in shared}
            return command(**kwargs, options=options)

        wrapper.__signature__ = inspect.Signature(own + shared)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + shared}
        return wrapper

    return decorate


def saved(path: Path | None, config) -> bool:
    """With ``--save-config PATH``: write the command's YAML config instead of running it."""
    if path is None:
        return False
    from rayattr.configfile import command_of, save_config

    Console().print(f"wrote {save_config(path, config)}; run it with `rayattr run {path}` or "
                    f"`ray job submit --working-dir . -- python jobs/{command_of(config)}.py {path}`")
    return True
