"""Exact top-k search equals brute force, also with second-moment statistics fitted on the session's Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import search_run, search_spec, search_stored  # noqa: F401 - the fixtures run, spec and stored

from rayattr.hessian.precondition import Preconditioner
from rayattr.ray.entry import fit
from rayattr.search import Index


@pytest.fixture(scope="module")
def stats(ray_session, tmp_path_factory, spec) -> str:
    out = str(tmp_path_factory.mktemp("stats") / "stats")
    fit(out, spec, "second-moment", workers=1)
    return out


def _brute_force(vectors: np.ndarray, queries: np.ndarray, unit_normalize: bool, hessian: str | None) -> np.ndarray:
    """Reference ``[Q, N]`` scores in float64: H^-1 on the query, or H^-1/2 on both sides before unit norms."""
    x, q = torch.from_numpy(vectors).double(), torch.from_numpy(queries).double()
    if hessian:
        pre = Preconditioner.load(hessian, power=-0.5 if unit_normalize else -1.0)
        q, x = pre.apply(q), (pre.apply(x) if unit_normalize else x)
    if unit_normalize:
        q, x = F.normalize(q, dim=1), F.normalize(x, dim=1)
    return (q @ x.T).numpy()


@pytest.mark.parametrize(("unit_normalize", "with_hessian"), [(False, False), (True, False), (False, True), (True, True)])
def test_exact_search_equals_brute_force(request, run, stored, unit_normalize, with_hessian):
    hessian = request.getfixturevalue("stats") if with_hessian else None
    ids, vectors = stored
    queries = np.random.default_rng(0).standard_normal((3, vectors.shape[1])).astype(np.float32)
    queries[0] = vectors[5]
    found = Index.open(run).search(queries, k=6, unit_normalize=unit_normalize, hessian=hessian, batch_size=7)
    reference = _brute_force(vectors, queries, unit_normalize, hessian)
    best = -np.sort(-reference, axis=1)[:, :6]
    tolerance = {"rtol": 1e-4, "atol": 1e-6 * np.abs(best).max()}
    # The k best scores, each the true score of the id returned (near-ties may swap ids of equal score).
    np.testing.assert_allclose(found.scores, best, **tolerance)
    np.testing.assert_allclose(np.take_along_axis(reference, np.searchsorted(ids, found.ids), 1), best, **tolerance)
    assert found.ids.dtype == np.int64 and found.scores.dtype == np.float32
    if unit_normalize and not with_hessian:
        assert found.ids[0, 0] == ids[5] and found.scores[0, 0] == pytest.approx(1.0, abs=1e-5)
