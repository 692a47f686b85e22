"""`rayattr verify` finds each kind of damage in a run built on the session's Ray, and passes a sound one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from rayattr.cli import app
from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
from rayattr.ray.entry import build, fit
from rayattr.store import META_KEY, Completion, GradientTable, connect, gradient_schema
from rayattr.verify import verify

DOCS = 24


@pytest.fixture(scope="module")
def sound_run(ray_session, tmp_path_factory, offline_fixture) -> Path:
    """A finished build of the first 24 training documents with second-moment statistics beside it."""
    run = tmp_path_factory.mktemp("verify") / "run"
    spec = RunSpec(ModelSpec(str(offline_fixture.neox)), DataSpec(str(offline_fixture.train), split=f"train[:{DOCS}]"),
                   GradSpec(projection_dim=4))
    build(str(run), spec)
    fit(str(run / "stats"), spec, "second-moment")
    return run


@pytest.fixture
def run(sound_run, tmp_path) -> Path:
    """A copy of the sound run to damage."""
    return Path(shutil.copytree(sound_run, tmp_path / "run"))


def _problems(run: Path) -> str:
    return "\n".join(verify(str(run)).problems)


def test_a_sound_run_has_no_problems(sound_run):
    report = verify(str(sound_run))
    assert report.ok, report.problems
    assert any("'gradients'" in item for item in report.checked) and any("stats" in item for item in report.checked)
    result = CliRunner().invoke(app, ["verify", str(sound_run)])
    assert result.exit_code == 0 and "no problems" in result.output


def test_duplicated_id(run):
    table = GradientTable.open(str(run))
    table.append(table.table.to_lance().to_table(filter="id = 7"))
    assert "1 id(s) stored more than once (7)" in _problems(run)


def test_missing_id(run):
    GradientTable.open(str(run)).table.delete("id = 3")
    assert "1 expected id(s) missing (3)" in _problems(run)


def test_nan_vector(run):
    table = GradientTable.open(str(run))
    row = table.table.to_lance().to_table(filter="id = 5")
    grad = np.full((1, table.meta.dim), np.nan, np.float32)
    table.table.delete("id = 5")
    row = row.set_column(row.schema.get_field_index("grad"), "grad",
                         pa.FixedSizeListArray.from_arrays(pa.array(grad.ravel()), table.meta.dim))
    lance.write_dataset(row, table.lance_uri, mode="append")  # a foreign writer: LanceDB's add refuses NaN
    assert "1 id(s) with NaN/Inf vectors (5)" in _problems(run)


def test_vector_width_other_than_the_metadata(run):
    meta = GradientTable.open(str(run)).meta
    schema = gradient_schema(meta)
    narrow = schema.set(schema.get_field_index("grad"), pa.field("grad", pa.list_(pa.float32(), meta.dim - 1)))
    connect(str(run)).create_table("gradients", schema=narrow.with_metadata({META_KEY: meta.to_json()}), mode="overwrite")
    assert f"metadata says fixed_size_list<item: float>[{meta.dim}]" in _problems(run)


def test_tampered_statistics_file(run):
    stats_file = next((run / "stats").glob("*.safetensors"))
    payload = bytearray(stats_file.read_bytes())
    payload[-1] ^= 0xFF
    stats_file.write_bytes(bytes(payload))
    assert "checksum mismatch" in _problems(run)


def test_statistics_from_another_projection(run):
    manifest_path = run / "stats" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["projection"] = manifest["projection"] | {"seed": 1}
    manifest_path.write_text(json.dumps(manifest))
    assert "disagree with" in _problems(run) and "on projection" in _problems(run)


def test_partial_table_and_cli_exit_code(run):
    Completion.clear(str(run), "gradients")
    assert "no completion record" in _problems(run)
    result = CliRunner().invoke(app, ["verify", str(run)])
    assert result.exit_code == 1 and "no completion record" in " ".join(result.output.split())
