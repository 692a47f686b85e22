"""`verify` on a path that holds no run (the damage found in a real run: ``tests/ray/test_verify_ray.py``)."""

from __future__ import annotations

import pytest

from rayattr.config import RayattrError
from rayattr.verify import verify


def test_nothing_to_verify(tmp_path):
    with pytest.raises(RayattrError, match="does not exist"):
        verify(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RayattrError, match="holds no rayattr tables"):
        verify(str(tmp_path / "empty"))
