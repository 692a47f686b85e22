"""TrackStar's task-specific Hessian: mix query and index second moments, saved like any statistics."""

from __future__ import annotations

from rayattr.config import RayattrError, stable_hash
from rayattr.hessian.factors import (
    TARGET_DOWNWEIGHT_COMPONENTS, Eigh, eigh_each, load_stats, mix, mixing_lambda, save_stats,
)
from rayattr.hessian.methods import SecondMoment
from rayattr.space import require_same_space, space_of


def mix_stats(query_dir: str, index_dir: str, out_dir: str, target_downweight_components: int = TARGET_DOWNWEIGHT_COMPONENTS,
              eigh: Eigh = eigh_each) -> tuple[float, int]:
    """Write ``lam * H_query + (1 - lam) * H_index`` per module (with its eigendecomposition) to ``out_dir``."""
    query, query_manifest = load_stats(query_dir)
    index, index_manifest = load_stats(index_dir)
    for directory, manifest in ((query_dir, query_manifest), (index_dir, index_manifest)):
        if manifest.get("method") != SecondMoment.name:
            raise RayattrError(f"{directory} holds {manifest.get('method')} statistics; mixing needs second-moment ones")
    require_same_space(query_manifest, index_manifest, "query and index statistics",
                       "fit both with the same model, modules, --projection-dim/--seed and normalizer")
    lam, k = mixing_lambda(
        [index[name]["eigenvalues"] for name in sorted(index)],
        [query[name]["eigenvalues"] for name in sorted(query)],
        target_downweight_components,
    )
    matrices = {name: mix(query[name]["second_moment"], index[name]["second_moment"], lam) for name in index}
    tensors = {name: {"second_moment": matrices[name], "eigenvalues": eigen.values, "eigenvectors": eigen.vectors}
               for name, eigen in eigh(matrices).items()}
    identity = space_of(index_manifest)
    manifest = {
        "method": SecondMoment.name, **identity,
        "fingerprint": stable_hash(identity | {"method": SecondMoment.name, "lambda": lam}),
        "examples": index_manifest["examples"] + query_manifest["examples"],
        "tokens": index_manifest["tokens"] + query_manifest["tokens"],
        "mixed": {"lambda": lam, "k": k, "target_downweight_components": target_downweight_components,
                  "query": query_manifest["fingerprint"], "index": index_manifest["fingerprint"]},
        "data": {"query": query_manifest.get("data"), "index": index_manifest.get("data")},
    }
    save_stats(out_dir, tensors, manifest)
    return lam, k
