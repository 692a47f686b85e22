"""The registry of statistics methods: each name maps to its passes, its finisher and its inversion.

A method registers itself by subclassing ``HessianMethod`` with a ``name``. Fitting runs the
method's passes through a ``RunPass`` (replica actors or a ZeRO-3 group: the caller's executor),
finishes the reduced sums with an ``Eigh`` (Ray tasks or in process) and saves them;
preconditioning asks the same method for its operator. Nothing here imports Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from rayattr.config import RayattrError, RunSpec, stable_hash
from rayattr.grads.engine import GradientEngine
from rayattr.grads.normalizer import Normalizer, NormalizerKind
from rayattr.hessian.factors import Eigen, Eigh, InversionMode, inverse_multiplier, kfac_grid, save_stats
from rayattr.hessian.stats import (
    EKFAC_PASS, KFAC_PASS, NORMALIZER_PASS, SECOND_MOMENT_PASS, RowAccumulator, Sums, TokenAccumulator,
)
from rayattr.space import TableMeta, space_of

RunPass = Callable[[str, Sums | None], tuple[Sums, TableMeta]]  # (pass kind, eigenbases) -> reduced sums, meta


@dataclass
class FitSummary:
    method: str
    examples: int
    tokens: int
    seconds: float
    modules: dict[str, dict] = field(default_factory=dict)  # per module: shape, top eigenvalue, condition
    worker_compute_seconds: float = 0.0  # the busiest actor's time in forward/backward/accumulation
    worker_peak_rss_mb: float = 0.0
    resumed_examples: int = 0  # documents whose sums were restored from an interrupted run's checkpoints


class StatsPass:
    """One statistics pass on one engine: the ``kfac`` pass taps per-token factors, the other
    passes (``second-moment``, ``ekfac``, ``normalizer``) add finished rows."""

    def __init__(self, engine: GradientEngine, kind: str, eigenbases: Sums | None = None) -> None:
        self.engine = engine
        self.kind = kind
        if kind == KFAC_PASS:
            self.accumulator = engine.collector.tap = TokenAccumulator(engine.layouts)
        else:
            self.accumulator = RowAccumulator(kind, engine.layouts, eigenbases)

    def __call__(self, docs) -> None:
        if self.kind == KFAC_PASS:
            self.engine.observe(docs)
        else:
            rows = self.engine.rows(docs)
            self.accumulator.update(torch.from_numpy(rows.grads), int(rows.num_tokens.sum()))

    def close(self) -> Sums:
        """Detach from the engine and return the partial sums."""
        self.engine.collector.tap = None
        return self.accumulator.sums


class HessianMethod:
    """A statistics method: subclasses set ``name`` and register themselves."""

    registry: ClassVar[dict[str, HessianMethod]] = {}
    name: ClassVar[str]
    first_pass: ClassVar[str]  # the StatsPass kind of the first pass
    per_module: ClassVar[bool] = True  # per-module statistics: refused on sketches that mix the modules
    preconditions: ClassVar[bool] = True  # whether ``operator`` gives an ``H^power``

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        HessianMethod.registry[cls.name] = cls()

    @classmethod
    def get(cls, name: str) -> HessianMethod:
        if name not in cls.registry:
            raise RayattrError(f"unknown --method {name!r}; choose one of {', '.join(cls.registry)}")
        return cls.registry[name]

    def finish(self, sums: Sums, eigh: Eigh) -> tuple[dict, dict]:
        """Reduced sums of the first pass -> (tensors per module, summary)."""
        raise NotImplementedError

    def refine(self, tensors: dict, summary: dict, run_pass: RunPass) -> None:
        """Passes after the first (EK-FAC's eigenvalue correction); none by default."""

    def operator(self, tensors: dict[str, torch.Tensor], mode: InversionMode, damping: float, power: float) -> tuple:
        """``H^power`` of one module: dense ``(Eigen, multiplier)`` or factored ``(q_out, q_in, grid)``."""
        raise NotImplementedError


class SecondMoment(HessianMethod):
    name, first_pass = SECOND_MOMENT_PASS, SECOND_MOMENT_PASS

    def finish(self, sums: Sums, eigh: Eigh) -> tuple[dict, dict]:
        matrices = {name: s["xx"] / s["count"] for name, s in sums.items()}
        eigens = eigh(matrices)
        tensors = {name: {"second_moment": matrices[name], "eigenvalues": eigens[name].values,
                          "eigenvectors": eigens[name].vectors} for name in sums}
        first = next(iter(sums.values()))
        return tensors, {"examples": int(first["count"]), "tokens": int(first["tokens"]), "modules": spectrum_summary({n: e.values for n, e in eigens.items()})}

    def operator(self, tensors: dict[str, torch.Tensor], mode: InversionMode, damping: float, power: float) -> tuple:
        eigen = Eigen(tensors["eigenvalues"], tensors["eigenvectors"])
        return eigen, inverse_multiplier(eigen.values, mode, damping, power)


class KFAC(HessianMethod):
    name, first_pass = KFAC_PASS, KFAC_PASS

    def finish(self, sums: Sums, eigh: Eigh) -> tuple[dict, dict]:
        matrices = {}
        for name, s in sums.items():
            matrices[f"{name}|A"] = s["A"] / s["tokens"]
            matrices[f"{name}|S"] = s["S"] / s["tokens"]
        eigens = eigh(matrices)
        tensors = {
            name: {"A": matrices[f"{name}|A"], "S": matrices[f"{name}|S"],
                   "q_in": eigens[f"{name}|A"].vectors, "a_values": eigens[f"{name}|A"].values,
                   "q_out": eigens[f"{name}|S"].vectors, "s_values": eigens[f"{name}|S"].values}
            for name in sums
        }
        tokens = int(next(iter(sums.values()))["tokens"])
        grid = {name: torch.outer(t["s_values"], t["a_values"]).flatten() for name, t in tensors.items()}
        return tensors, {"examples": 0, "tokens": tokens, "modules": spectrum_summary(grid)}

    def grid(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The eigenvalues of ``S kron A`` in the Kronecker eigenbasis, ``[p_out, p_in]``."""
        return kfac_grid(tensors["s_values"], tensors["a_values"])

    def operator(self, tensors: dict[str, torch.Tensor], mode: InversionMode, damping: float, power: float) -> tuple:
        grid = self.grid(tensors)
        return tensors["q_out"], tensors["q_in"], inverse_multiplier(grid.flatten(), mode, damping, power).view_as(grid)


class EKFAC(KFAC):
    name = EKFAC_PASS

    def refine(self, tensors: dict, summary: dict, run_pass: RunPass) -> None:
        """Second pass: per-example gradients in the K-FAC eigenbases give the corrected eigenvalues."""
        bases = {name: {"q_out": t["q_out"], "q_in": t["q_in"]} for name, t in tensors.items()}
        corrections, _ = run_pass(EKFAC_PASS, bases)
        for name, sums in corrections.items():
            tensors[name]["lambda"] = sums["lambda_sum"] / sums["count"]
            summary["examples"] = int(sums["count"])

    def grid(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return tensors["lambda"]


class NormalizerFit(HessianMethod):
    """Not curvature: Adam/Adafactor second moments of full per-example gradients, saved as a normalizer."""

    name, first_pass, per_module, preconditions = NORMALIZER_PASS, NORMALIZER_PASS, False, False


def check_method(method: str, spec: RunSpec) -> None:
    """Refuse an unknown method, or per-module statistics of a sketch, before any worker starts."""
    plan = HessianMethod.get(method)
    if spec.grads.sketched and plan.per_module:
        raise RayattrError(
            f"{method} statistics are per module, but a {spec.grads.projection_type} sketch mixes all modules "
            "into one vector; fit them with a Kronecker projection (--projection-type rademacher or normal)"
        )


def fit_statistics(out_dir: str, spec: RunSpec, method: str, run_pass: RunPass, eigh: Eigh,
                   normalizer_kind: NormalizerKind) -> FitSummary:
    """Run the passes ``method`` needs through ``run_pass``, finish and save the result.

    Everything after the reduction, shared by replica actors and ZeRO worker groups;
    the caller fills in the timings.
    """
    plan = HessianMethod.get(method)
    sums, meta = run_pass(plan.first_pass, None)
    if isinstance(plan, NormalizerFit):
        normalizer = fitted_normalizer(sums, normalizer_kind, source=f"fitted on {spec.data.dataset} [{spec.data.split}]")
        normalizer.save(out_dir)
        first = next(iter(sums.values()))
        return FitSummary(method, int(first["count"]), int(first["tokens"]), 0.0)
    tensors, summary = plan.finish(sums, eigh)
    plan.refine(tensors, summary, run_pass)
    for module in meta.modules:
        summary["modules"][module["name"]]["shape"] = f"{module['p_out']}x{module['p_in']}"
    save_stats(out_dir, tensors, stats_manifest(method, meta, summary, spec.grads.labels))
    return FitSummary(method, summary["examples"], summary["tokens"], 0.0, summary["modules"])


def stats_manifest(method: str, meta: TableMeta, summary: dict, labels: str = "data") -> dict:
    """What a statistics directory records: method, counts and the fingerprints it must match.

    Sampled labels (the true Fisher) fit the same space as dataset labels (the empirical
    Fisher), so they precondition the same rows; the fingerprint tells the two apart.
    """
    identity = space_of(meta)
    estimate = {"labels": labels} if labels != "data" else {}
    return {"method": method, **identity, "fingerprint": stable_hash(identity | {"method": method} | estimate),
            "examples": summary["examples"], "tokens": summary["tokens"], "data": meta.data, "spec_version": 1} | estimate


def spectrum_summary(values: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Top eigenvalue and condition number (over the positive eigenvalues) per module."""
    out = {}
    for name, v in values.items():
        top, positive = float(v.max()), v[v > 0]
        out[name] = {"top_eigenvalue": top, "condition": top / float(positive.min()) if positive.numel() else float("inf")}
    return out


def fitted_normalizer(sums: Sums, kind: NormalizerKind, source: str) -> Normalizer:
    """Mean squared per-example gradients (Adam), or their row/column means (Adafactor)."""
    moments = {name: {"v": (s["sq"] / s["count"]).float()} for name, s in sums.items()}
    normalizer = Normalizer("adam", moments, source)
    return normalizer.to_adafactor() if kind == "adafactor" else normalizer
