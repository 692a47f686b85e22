"""Eigendecompositions, damped inversion, preconditioning, TrackStar mixing, save/load.

Conventions: a module gradient is ``G[O, I]`` and its
flattened vector is row-major ``G.reshape(-1)``. A dense second moment ``H``
acts on those vectors; a Kronecker-factored one ``S kron A`` acts as
``vec(G) -> vec(S G A)``. All linear algebra runs in float64 so that
``H^-1/2`` applied twice equals ``H^-1`` to round-off, whatever the storage dtype.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from rayattr import storage
from rayattr.config import RayattrError, RayattrWarning, stable_hash

InversionMode = Literal["damped_inverse", "pseudoinverse", "tikhonov_filtered"]
INVERSION_MODES: tuple[str, ...] = get_args(InversionMode)
POWERS: tuple[float, ...] = (-1.0, -0.5)

# Damping is relative to the mean eigenvalue mu. When c*mu is 0 (an all-zero
# matrix, or damping=0) it would divide by zero, so this absolute floor takes
# its place and every multiplier stays finite.
ABSOLUTE_DAMPING = 1e-12

# Bergson's mixing coefficient when both pooled spectra are 0 at the chosen rank.
MIXING_FALLBACK = 0.99

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATS_SUBDIR = "stats"
# TrackStar's crossing rank: measured best of 1000/300/100/30 on the hard fixture over three
# projection seeds (benchmarks/trackstar_sweep.py); 1000 saturates lambda with few queries.
TARGET_DOWNWEIGHT_COMPONENTS = 100  # where `rayattr hessian RUN_PATH` writes its statistics
_RESERVED_MANIFEST_KEYS = ("files", "format_version")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")


@dataclass(frozen=True)
class Eigen:
    """Eigendecomposition of a symmetric PSD matrix (float64)."""

    values: torch.Tensor  # [d], ascending, clamped >= 0
    vectors: torch.Tensor  # [d, d], columns are eigenvectors


Eigh = Callable[[dict[str, torch.Tensor]], dict[str, Eigen]]  # many symmetric matrices -> eigendecompositions


def eigh_each(matrices: dict[str, torch.Tensor]) -> dict[str, Eigen]:
    """``eigh_psd`` of each matrix in turn, in this process (the Ray layer has a parallel ``Eigh``)."""
    return {name: eigh_psd(matrix) for name, matrix in matrices.items()}


def eigh_psd(matrix: torch.Tensor) -> Eigen:
    """Symmetrised float64 ``eigh``; negative round-off eigenvalues are clamped to 0.

    Second moments are PSD in exact arithmetic; accumulation in low precision
    leaves tiny asymmetries and negative eigenvalues that would make ``H^-1/2``
    undefined, so both are removed here once.
    """
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise RayattrError(f"eigh_psd needs a square 2-D matrix, got shape {list(matrix.shape)}")
    if not torch.isfinite(matrix).all():
        raise RayattrError(
            f"eigh_psd got a {list(matrix.shape)} matrix with NaN/inf entries; "
            "the statistics overflowed or saw non-finite gradients: re-run the fit (e.g. in fp32)"
        )
    m = matrix.detach().to(torch.float64)
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return Eigen(values=values.clamp_min(0.0), vectors=vectors)


def inverse_multiplier(
    values: torch.Tensor,
    mode: InversionMode = "damped_inverse",
    damping: float = 0.1,
    power: float = -1.0,
    mean: float | None = None,
) -> torch.Tensor:
    """Per-eigenvalue multiplier ``m(l)`` such that ``V diag(m) V^T`` approximates ``H^power``.

    With ``mu = mean`` (default: mean of the clamped ``values``) and ``c = damping``:
    ``damped_inverse`` 1/(l + c mu); ``pseudoinverse`` 1/l where l > c mu, else 0;
    ``tikhonov_filtered`` l / (l^2 + (c mu)^2). ``power=-0.5`` is the square root
    of the ``power=-1`` multiplier, so ``H^-1/2 H^-1/2 == H^-1`` for every mode.
    If ``c mu == 0`` the absolute ``ABSOLUTE_DAMPING`` replaces it (no division by 0).
    Returns float64.
    """
    if mode not in INVERSION_MODES:
        raise RayattrError(f"unknown inversion mode {mode!r}; valid modes are {list(INVERSION_MODES)}")
    if power not in POWERS:
        raise RayattrError(f"unsupported power {power!r}; valid powers are {list(POWERS)}")
    if damping < 0:
        raise RayattrError(f"damping must be >= 0, got {damping}")
    lam = values.detach().to(torch.float64).clamp_min(0.0)
    mu = float(lam.mean()) if mean is None else float(mean)
    if not mu >= 0:  # also catches NaN
        raise RayattrError(f"mean eigenvalue must be finite and >= 0, got {mu}")
    floor = damping * mu
    if floor <= 0:
        floor = ABSOLUTE_DAMPING
    if mode == "damped_inverse":
        mult = 1.0 / (lam + floor)
    elif mode == "pseudoinverse":
        mult = torch.where(lam > floor, lam.reciprocal(), 0.0)
    else:
        mult = lam / (lam.square() + floor**2)
    return mult.sqrt() if power == -0.5 else mult


def apply_dense(vectors: torch.Tensor, eigen: Eigen, multiplier: torch.Tensor) -> torch.Tensor:
    """``x -> V diag(m) V^T x`` for each row of ``vectors`` [N, d]; float64 inside, input dtype out."""
    d = eigen.vectors.shape[0]
    if vectors.shape[-1] != d or multiplier.shape != (d,):
        raise RayattrError(
            f"apply_dense: vectors {list(vectors.shape)} and multiplier {list(multiplier.shape)} "
            f"do not match a {d}x{d} eigenbasis"
        )
    v = eigen.vectors.to(vectors.device)
    x = vectors.to(torch.float64)
    out = ((x @ v) * multiplier.to(device=vectors.device, dtype=torch.float64)) @ v.T
    return out.to(vectors.dtype)


def _check_factored(grads: torch.Tensor, q_out: torch.Tensor, q_in: torch.Tensor) -> None:
    """Shapes must be grads [N, O, I], q_out [O, O], q_in [I, I]."""
    if grads.ndim != 3 or q_out.shape != (grads.shape[1],) * 2 or q_in.shape != (grads.shape[2],) * 2:
        raise RayattrError(
            f"factored shapes disagree: grads {list(grads.shape)} (want [N, O, I]), "
            f"q_out {list(q_out.shape)} (want [O, O]), q_in {list(q_in.shape)} (want [I, I])"
        )


def _bases(grads: torch.Tensor, q_out: torch.Tensor, q_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigenbases in the gradients' precision (at least float32) on their device.

    Rotations by orthonormal bases are well conditioned: float32 rows keep float32
    matmuls (relative error ~1e-7, half the time of float64 and less memory), while
    float64 rows, and the multipliers, stay float64.
    """
    dtype = torch.promote_types(grads.dtype, torch.float32)
    return q_out.to(grads.device, dtype), q_in.to(grads.device, dtype)


def _rotate(grads: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left^T G_n right`` for every ``G_n`` of ``grads [N, O, I]``: one GEMM per side over the
    whole batch (a broadcast ``[O, O] @ [N, O, I]`` runs N small products instead)."""
    n, o, i = grads.shape
    turned = (left.T @ grads.transpose(0, 1).reshape(o, n * i)).reshape(left.shape[1], n, i).transpose(0, 1)
    return turned @ right


def apply_factored(
    grads: torch.Tensor, q_out: torch.Tensor, q_in: torch.Tensor, multiplier: torch.Tensor
) -> torch.Tensor:
    """``G_n -> Q_S (m * (Q_S^T G_n Q_A)) Q_A^T`` for grads [N, O, I] and a multiplier grid [O, I].

    This applies ``(Q_S kron Q_A) diag(vec m) (Q_S kron Q_A)^T`` without ever
    forming the [O*I, O*I] matrix, in the gradients' precision (``_bases``); input dtype out.
    """
    _check_factored(grads, q_out, q_in)
    if multiplier.shape != grads.shape[1:]:
        raise RayattrError(
            f"apply_factored: multiplier grid {list(multiplier.shape)} must be [O, I] = {list(grads.shape[1:])}"
        )
    q_s, q_a = _bases(grads, q_out, q_in)
    g = grads.to(q_s.dtype)
    scaled = _rotate(g, q_s, q_a) * multiplier.to(device=grads.device, dtype=q_s.dtype)
    return _rotate(scaled, q_s.T, q_a.T).to(grads.dtype)


def kfac_grid(s_values: torch.Tensor, a_values: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of ``S kron A`` as an [O, I] grid: ``lambda_S[o] * lambda_A[i]``."""
    return torch.outer(s_values.to(torch.float64), a_values.to(torch.float64))


def ekfac_lambda(grads: torch.Tensor, q_out: torch.Tensor, q_in: torch.Tensor) -> torch.Tensor:
    """EK-FAC eigenvalue correction as a SUM over n of ``(Q_S^T G_n Q_A)^2`` [O, I].

    A sum (not a mean) so partial results from workers add up; divide by the
    example count once at the end.
    """
    _check_factored(grads, q_out, q_in)
    q_s, q_a = _bases(grads, q_out, q_in)
    return _rotate(grads.to(q_s.dtype), q_s, q_a).double().square().sum(dim=0)


def mixing_lambda(
    index_values: list[torch.Tensor],
    query_values: list[torch.Tensor],
    target_downweight_components: int = TARGET_DOWNWEIGHT_COMPONENTS,
) -> tuple[float, int]:
    """TrackStar mixing coefficient ``lam = s_i[k] / (s_q[k] + s_i[k])`` and the ``k`` used.

    ``s_i``/``s_q`` are the clamped eigenvalues of all modules pooled and sorted
    descending; ``k = target_downweight_components - 1``, clamped (with a
    warning) to the last component both sides have. ``lam`` is clipped to
    [0, 1]; if ``s_q[k] + s_i[k] == 0`` it is Bergson's fallback 0.99.
    """
    if target_downweight_components < 1:
        raise RayattrError(f"target_downweight_components must be >= 1, got {target_downweight_components}")
    s_i, s_q = (_pooled_descending(v) for v in (index_values, query_values))
    available = min(len(s_i), len(s_q))
    if available == 0:
        raise RayattrError("mixing needs eigenvalues for both index and query statistics; got an empty side")
    k = target_downweight_components - 1
    if k >= available:
        warnings.warn(
            f"target_downweight_components={target_downweight_components} exceeds the {available} "
            f"eigenvalues available; using component {available} (k={available - 1}) instead",
            RayattrWarning,
            stacklevel=2,
        )
        k = available - 1
    denominator = float(s_q[k] + s_i[k])
    if denominator == 0:
        return MIXING_FALLBACK, k
    lam = min(max(float(s_i[k]) / denominator, 0.0), 1.0)
    if lam == 1.0:
        rank = int((s_q > s_q[0] * 1e-10).sum()) if float(s_q[0]) > 0 else 0
        warnings.warn(
            f"TrackStar lambda saturated at 1.0: the query statistics have {rank} nonzero eigenvalues, fewer than "
            f"target_downweight_components={target_downweight_components}, so the mixed Hessian is the query "
            f"moment alone; pass --target-downweight-components below {max(rank, 1)}",
            RayattrWarning,
            stacklevel=2,
        )
    return lam, k


def _pooled_descending(values: list[torch.Tensor]) -> torch.Tensor:
    """All modules' eigenvalues, clamped at 0, in one descending float64 vector."""
    if not values:
        return torch.zeros(0, dtype=torch.float64)
    pooled = torch.cat([v.detach().reshape(-1).to(device="cpu", dtype=torch.float64) for v in values])
    return pooled.clamp_min(0.0).sort(descending=True).values


def mix(query: torch.Tensor, index: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * H_query + (1 - lam) * H_index`` for one module."""
    if query.shape != index.shape:
        raise RayattrError(
            f"cannot mix statistics of shapes {list(query.shape)} (query) and {list(index.shape)} (index); "
            "fit both with the same modules and projection"
        )
    if not 0.0 <= lam <= 1.0:
        raise RayattrError(f"mixing coefficient must lie in [0, 1], got {lam}")
    return lam * query + (1.0 - lam) * index


def module_filename(module: str) -> str:
    """Safe file name for a module: the name itself when plainly safe, else a hash of it."""
    if _SAFE_NAME.fullmatch(module):
        return f"{module}.safetensors"
    return f"module-{stable_hash(module, length=32)}.safetensors"


def save_stats(directory: str | Path, tensors: dict[str, dict[str, torch.Tensor]], manifest: dict) -> None:
    """Save per-module statistics as one safetensors file each plus ``manifest.json``.

    The old manifest is removed first and the new one written last, each file
    via temp-and-rename: after a crash the directory has either no manifest or
    a manifest whose files all exist (load still checks their checksums).
    """
    reserved = [key for key in _RESERVED_MANIFEST_KEYS if key in manifest]
    if reserved:
        raise RayattrError(f"manifest keys {reserved} are reserved by save_stats; rename them")
    root = str(directory)
    storage.remove(storage.join(root, MANIFEST))
    files: dict[str, dict[str, Any]] = {}
    used: dict[str, str] = {}
    for module, named in tensors.items():
        name = module_filename(module)
        if name in used:
            raise RayattrError(f"modules {used[name]!r} and {module!r} map to the same file {name}")
        used[name] = module
        # clone: safetensors refuses tensors that share storage (e.g. views of one buffer)
        cpu = {key: t.detach().to("cpu").contiguous().clone() for key, t in named.items()}
        payload = save_safetensors(cpu)
        storage.write_bytes(storage.join(root, name), payload)
        files[module] = {
            "file": name,
            "sha256": hashlib.sha256(payload).hexdigest(),
            "tensors": {key: list(t.shape) for key, t in cpu.items()},
        }
    body = {**manifest, "files": files, "format_version": FORMAT_VERSION}
    storage.write_bytes(storage.join(root, MANIFEST), json.dumps(body, indent=2, sort_keys=True).encode())


def stats_directory(path: str) -> str:
    """The statistics directory a user means by ``path``: itself, or the ``stats/``
    inside the RUN_PATH that `rayattr hessian` was given."""
    if storage.exists(storage.join(path, MANIFEST)):
        return path
    nested = storage.join(path, STATS_SUBDIR)
    if storage.exists(storage.join(nested, MANIFEST)):
        return nested
    raise RayattrError(
        f"no statistics at {path} (no {MANIFEST} there or in {STATS_SUBDIR}/): pass the RUN_PATH given to "
        "`rayattr hessian`, its stats/ directory, or the output of `rayattr mix`"
    )


def load_stats(directory: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Load statistics saved by :func:`save_stats`, verifying checksums and shapes.

    Uses safetensors only (never pickle). Returns ``(tensors, manifest)`` where
    ``manifest`` is the stored JSON, including ``files`` and ``format_version``.
    """
    root = stats_directory(str(directory))
    manifest_path = storage.join(root, MANIFEST)
    refit = "re-run the fit to regenerate the statistics"
    try:
        manifest = json.loads(storage.read_bytes(manifest_path))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (ValueError, KeyError, TypeError) as exc:
        raise RayattrError(f"unreadable statistics manifest {manifest_path} ({exc!r}); {refit}") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise RayattrError(
            f"statistics manifest {manifest_path} has format_version {manifest.get('format_version')!r}, "
            f"this rayattr reads {FORMAT_VERSION}; {refit}"
        )
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for module, entry in files.items():
        tensors[module] = _load_module_file(root, module, entry, refit)
    return tensors, manifest


def _load_module_file(root: str, module: str, entry: dict, refit: str) -> dict[str, torch.Tensor]:
    """One module's tensors, checked against its manifest entry."""
    try:
        name, checksum, expected = entry["file"], entry["sha256"], entry["tensors"]
    except (KeyError, TypeError) as exc:
        raise RayattrError(f"malformed manifest entry for module {module!r} in {storage.join(root, MANIFEST)}; {refit}") from exc
    if not isinstance(name, str) or Path(name).name != name:
        raise RayattrError(f"manifest entry for module {module!r} names a path outside {root}: {name!r}; {refit}")
    path = storage.join(root, name)
    if not storage.exists(path):
        raise RayattrError(f"missing statistics file {path} (module {module!r}); {refit}")
    payload = storage.read_bytes(path)
    digest = hashlib.sha256(payload).hexdigest()
    if digest != checksum:
        raise RayattrError(
            f"checksum mismatch in statistics file {path} (module {module!r}): the file is corrupt "
            f"or from another fit; {refit}"
        )
    loaded = load_safetensors(payload)
    if sorted(loaded) != sorted(expected):
        raise RayattrError(
            f"statistics file {path} holds tensors {sorted(loaded)} but the manifest lists {sorted(expected)}; {refit}"
        )
    for key, t in loaded.items():
        if list(t.shape) != list(expected[key]):
            raise RayattrError(
                f"shape mismatch in statistics file {path}: tensor {key!r} has shape {list(t.shape)}, "
                f"manifest says {list(expected[key])}; {refit}"
            )
    return loaded
