"""`rayattr retrain`, `magic` and `validate` from the command line, and a saved retrain config replayed by `run`."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from rayattr.cli import app
from rayattr.lds.bank import Bank
from rayattr.store import TOPK, connect

runner = CliRunner()
RECIPE = ["--optimizer", "sgd", "--learning-rate", "0.05", "--batch-size", "4"]


def inputs(fixture) -> list[str]:
    return ["--model", str(fixture.neox), "--dataset", str(fixture.train), "--split", "train[:12]",
            "--query-dataset", str(fixture.queries), "--query-split", "train[:3]", *RECIPE]


def test_retrain_magic_and_validate_commands(ray_session, tmp_path, offline_fixture):
    bank, scores = str(tmp_path / "bank"), str(tmp_path / "magic")
    done = runner.invoke(app, ["retrain", bank, *inputs(offline_fixture), "--runs", "3"])
    assert done.exit_code == 0, done.output
    assert "run 2 recorded" in done.output and "3 runs of 3 query losses" in done.output
    done = runner.invoke(app, ["magic", scores, *inputs(offline_fixture), "--checkpoint-every", "2", "--top-k", "5"])
    assert done.exit_code == 0, done.output
    assert connect(scores).open_table(TOPK).count_rows() == 3 * 5
    out = tmp_path / "lds.json"
    done = runner.invoke(app, ["validate", scores, "--bank", bank, "--bootstrap", "100", "--out", str(out)])
    assert done.exit_code == 0, done.output
    result = json.loads(out.read_text())
    assert "LDS" in done.output and result["lds"]["subsets"] == 3 and result["lds"]["queries"] == 3
    assert -1 <= result["lds"]["lds"] <= 1 and result["lds"]["low"] <= result["lds"]["lds"] <= result["lds"]["high"]


def test_a_saved_retrain_config_resumes_the_bank_it_names(ray_session, tmp_path, offline_fixture):
    bank, config = str(tmp_path / "bank"), str(tmp_path / "retrain.yaml")
    assert runner.invoke(app, ["retrain", bank, *inputs(offline_fixture), "--runs", "3"]).exit_code == 0
    saved = runner.invoke(app, ["retrain", bank, *inputs(offline_fixture), "--runs", "4", "--save-config", config])
    assert saved.exit_code == 0, saved.output
    done = runner.invoke(app, ["run", config])
    assert done.exit_code == 0, done.output
    assert "run 3 recorded (4/4" in done.output and "run 0 recorded" not in done.output
    assert sorted(Bank.open(bank).finished()) == [0, 1, 2, 3]
    other = runner.invoke(app, ["retrain", bank, *inputs(offline_fixture), "--runs", "4", "--learning-rate", "0.1"])
    assert other.exit_code == 1 and "made with other settings (settings)" in other.output
