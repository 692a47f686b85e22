"""``rayattr doctor``: do this model's per-example gradients depend on how documents are batched?

Fused attention kernels, reduced precision and TF32 matmuls can make a document's
gradient change with its batch neighbours and their padding, which silently breaks
the promise that a row is the document's own. The doctor computes projected rows
of sample documents one at a time (no padding) and batched (equal lengths, then
mixed lengths with padding, in several shuffled trials), and compares each row by
cosine. It tries the given settings first, then escalates (math attention kernel,
fp32 with TF32 matmuls, full fp32) and names the cheapest settings that pass. It
also checks that gradients are finite and that tokenization does not duplicate a
BOS or EOS token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from rayattr.config import DataSpec, GradSpec, ModelSpec, RayattrError
from rayattr.data import TokenizedDocs, plan_shards, read_shard, tokenize
from rayattr.grads.engine import GradientEngine
from rayattr.model import load_config, load_model, max_positions, tokenizer_source
from rayattr.tokenizer import load_tokenizer

MIN_COSINE = 0.99
PROBE_TEXTS = tuple(  # documents of many lengths when no dataset is given
    " ".join(f"word{(7 * i + j) % 97}" for j in range(3 + 5 * i)) + "." for i in range(12)
)


@dataclass(frozen=True)
class Attempt:
    """One rung of the escalation ladder: the flags it adds and the model settings they mean."""

    flags: str
    model: ModelSpec


@dataclass(frozen=True)
class Verdict:
    """What one attempt measured: the worst row cosine per batching, and whether rows are finite."""

    attempt: Attempt
    equal_lengths: float
    mixed_lengths: float
    finite: bool
    min_cosine: float

    @property
    def passed(self) -> bool:
        return self.finite and min(self.equal_lengths, self.mixed_lengths) >= self.min_cosine


def ladder(model: ModelSpec) -> list[Attempt]:
    """The given settings, then each cheaper-to-more-exact escalation that changes something."""
    steps = [Attempt("(given)", model)]
    math = dataclasses.replace(model, force_math_sdp=True)
    for flags, spec in (
        ("--force-math-sdp", math),
        ("--force-math-sdp --precision fp32 --use-tf32-matmuls", dataclasses.replace(math, precision="fp32", use_tf32_matmuls=True)),
        ("--force-math-sdp --precision fp32", dataclasses.replace(math, precision="fp32", use_tf32_matmuls=False)),
    ):
        if all(spec != step.model for step in steps):
            steps.append(Attempt(flags, spec))
    return steps


def sample_documents(model: ModelSpec, data: DataSpec | None, count: int) -> TokenizedDocs:
    """The first ``count`` documents of ``data`` (or the probe texts), tokenized as a build would."""
    tokenizer = load_tokenizer(tokenizer_source(model), model.revision)
    limit = min(data.max_length if data and data.max_length else 512, max_positions(load_config(model)))
    if data is None:
        spec = DataSpec("probe texts", truncation=True)
        table = pa.table({"text": list(PROBE_TEXTS[:count]), "id": np.arange(min(count, len(PROBE_TEXTS)))})
    else:
        spec = dataclasses.replace(data, truncation=True, reward_column=None, skip_nan_rewards=False)
        table = next(read_shard(spec, plan_shards(spec)[0], batch_rows=count))
    docs = TokenizedDocs.from_arrow(tokenize(table, spec, tokenizer, limit))
    has_target = [len(t) > max(start, 1) + 1 and (docs.label_masks is None or docs.label_masks[i][1:].any())
                  for i, (t, start) in enumerate(zip(docs.tokens, docs.label_start))]
    kept = docs.take(np.flatnonzero(has_target))
    if len(kept) < 2:
        raise RayattrError("the doctor needs at least two sample documents with loss tokens; pass a --dataset with more rows")
    return kept


def duplicated_special_tokens(docs: TokenizedDocs, model: ModelSpec) -> dict[str, int]:
    """How many documents start with two BOS tokens or end with two EOS tokens."""
    tokenizer = load_tokenizer(tokenizer_source(model), model.revision)
    found = {"bos": 0, "eos": 0}
    for tokens in docs.tokens:
        if tokenizer.bos_token_id is not None and len(tokens) > 1 and tokens[0] == tokens[1] == tokenizer.bos_token_id:
            found["bos"] += 1
        if tokenizer.eos_token_id is not None and len(tokens) > 1 and tokens[-1] == tokens[-2] == tokenizer.eos_token_id:
            found["eos"] += 1
    return found


def examine(attempt: Attempt, docs: TokenizedDocs, grads: GradSpec, trials: int, min_cosine: float, seed: int = 0) -> Verdict:
    """Batched rows against one-at-a-time rows of ``docs`` under ``attempt``'s settings."""
    model = load_model(attempt.model)
    tokenizer = load_tokenizer(tokenizer_source(attempt.model), attempt.model.revision)
    longest = max(len(t) for t in docs.tokens)
    alone = _rows(model, grads, tokenizer.pad_token_id, docs, token_batch_size=2)  # one document per batch
    shortest = min(len(t) for t in docs.tokens)
    equal = dataclasses.replace(docs, tokens=[t[:shortest] for t in docs.tokens],
                                label_masks=None if docs.label_masks is None else [m[:shortest] for m in docs.label_masks])
    equal_alone = _rows(model, grads, tokenizer.pad_token_id, equal, token_batch_size=2)
    rng = np.random.default_rng(seed)
    worst = {"equal": 1.0, "mixed": 1.0}
    finite = bool(np.isfinite(alone).all())
    for _ in range(trials):
        order = rng.permutation(len(docs))
        for kind, subject, reference in (("equal", equal, equal_alone), ("mixed", docs, alone)):
            batched = _rows(model, grads, tokenizer.pad_token_id, subject.take(order), longest * len(docs))
            finite &= bool(np.isfinite(batched).all())
            worst[kind] = min(worst[kind], float(_cosines(batched, reference[order]).min()))
    return Verdict(attempt, worst["equal"], worst["mixed"], finite, min_cosine)


def _rows(model, grads: GradSpec, pad_token_id: int, docs: TokenizedDocs, token_batch_size: int) -> np.ndarray:
    """Rows of ``docs`` in their order (every sample document has a loss token)."""
    engine = GradientEngine(model, dataclasses.replace(grads, token_batch_size=max(token_batch_size, 2)), pad_token_id)
    try:
        return engine.rows(docs).grads
    finally:
        engine.close()


def _cosines(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    left, right = left.astype(np.float64), right.astype(np.float64)
    norms = np.linalg.norm(left, axis=1) * np.linalg.norm(right, axis=1)
    return np.where(norms > 0, (left * right).sum(1) / np.maximum(norms, 1e-300), 1.0)


def diagnose(model: ModelSpec, data: DataSpec | None = None, grads: GradSpec | None = None, docs: int = 8,
             trials: int = 3, min_cosine: float = MIN_COSINE) -> tuple[list[Verdict], dict[str, int]]:
    """Every rung of the ladder up to the first that passes, and the duplicated special tokens."""
    grads = grads or GradSpec(projection_dim=16)
    sample = sample_documents(model, data, docs)
    verdicts = []
    for attempt in ladder(model):
        verdicts.append(examine(attempt, sample, grads, trials, min_cosine))
        if verdicts[-1].passed:
            break
    return verdicts, duplicated_special_tokens(sample, model)
