"""``rayattr doctor``: batch invariance of per-example gradients and duplicated special tokens, on
the fixture GPT-NeoX, in process and through the CLI (no Ray)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from rayattr.cli import app
from rayattr.config import DataSpec, ModelSpec
from rayattr.doctor import diagnose


def test_fp32_passes_at_once_and_the_cli_exits_0(offline_fixture) -> None:
    verdicts, duplicated = diagnose(ModelSpec(str(offline_fixture.neox)), min_cosine=0.9999999)
    assert len(verdicts) == 1 and verdicts[0].passed and min(verdicts[0].equal_lengths, verdicts[0].mixed_lengths) > 1 - 1e-9
    assert duplicated == {"bos": 0, "eos": 0}
    result = CliRunner().invoke(app, ["doctor", "--model", str(offline_fixture.neox), "--trials", "1"])
    assert result.exit_code == 0, result.output
    assert "the given settings pass" in result.output


def test_bf16_fused_attention_fails_and_an_escalation_passes(offline_fixture) -> None:
    """bf16 rows of padded batches drift from the one-at-a-time rows under the fused attention kernel."""
    verdicts, _ = diagnose(ModelSpec(str(offline_fixture.neox), precision="bf16"), min_cosine=0.9999999)
    assert not verdicts[0].passed and verdicts[0].mixed_lengths < 0.9999999
    assert verdicts[-1].passed and verdicts[-1].attempt.model.force_math_sdp
    result = CliRunner().invoke(app, ["doctor", "--model", str(offline_fixture.neox), "--precision", "bf16",
                                      "--min-cosine", "0.9999999", "--trials", "1"])
    assert result.exit_code == 1 and f"pass {verdicts[-1].attempt.flags} to build" in result.output


def test_duplicated_bos_is_reported_and_fails_the_check(offline_fixture, tmp_path) -> None:
    texts = ["<|endoftext|><|endoftext|>Alna was born in Talburgh.", "Sana graduated from Kirridge College.<|endoftext|>"]
    pq.write_table(pa.table({"text": texts}), tmp_path / "bos.parquet")
    _, duplicated = diagnose(ModelSpec(str(offline_fixture.neox)), DataSpec(str(tmp_path / "bos.parquet")), trials=1)
    assert duplicated == {"bos": 1, "eos": 0}
    result = CliRunner().invoke(app, ["doctor", "--model", str(offline_fixture.neox), "--dataset",
                                      str(tmp_path / "bos.parquet"), "--trials", "1"])
    assert result.exit_code == 1 and "1 sample document(s) start with a duplicated BOS token" in result.output
