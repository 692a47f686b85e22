"""The retrain bank and MAGIC on Ray: what the tasks record equals the recipe run in this process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayattr.commands import MagicConfig, RetrainConfig
from rayattr.config import DataSpec, ModelSpec
from rayattr.lds.bank import Bank, subset_of
from rayattr.lds.inputs import read_docs
from rayattr.lds.magic import metagradients
from rayattr.lds.recipe import Recipe, query_losses, train
from rayattr.lds.validate import validate
from rayattr.model import load_model
from rayattr.ray.retrain import magic, retrain
from rayattr.store import ScoreTable

DOCS = 12
RECIPE = Recipe(optimizer="sgd", learning_rate=0.05, momentum=0.5, batch_size=4, epochs=1)


@pytest.fixture(scope="module")
def run_inputs(offline_fixture):
    model = ModelSpec(str(offline_fixture.neox))
    return {"model": model, "train": DataSpec(str(offline_fixture.train), split=f"train[:{DOCS}]"),
            "query": DataSpec(str(offline_fixture.queries), split="train[:3]"), "recipe": RECIPE}


def in_process(run_inputs):
    model = load_model(run_inputs["model"]).requires_grad_(True)
    return (model, read_docs(run_inputs["train"], run_inputs["model"], model.config),
            read_docs(run_inputs["query"], run_inputs["model"], model.config))


def test_a_bank_records_each_run_once_and_resumes_with_the_runs_it_lacks(ray_session, tmp_path, run_inputs):
    path = str(tmp_path / "bank")
    first = []
    retrain(RetrainConfig(bank_path=path, runs=3, **run_inputs), on_run=lambda done: first.append(done.run))
    losses_before = Bank.open(path).read()[2]
    later = []
    retrain(RetrainConfig(bank_path=path, runs=5, **run_inputs), on_run=lambda done: later.append(done.run))
    assert sorted(first) == [0, 1, 2] and sorted(later) == [3, 4]  # finished runs are not redone
    runs, subsets, losses = Bank.open(path).read()
    assert runs.tolist() == [0, 1, 2, 3, 4] and np.array_equal(losses[:3], losses_before)
    model, docs, queries = in_process(run_inputs)
    subset = subset_of(docs.ids, 0.5, 0, 4)
    assert np.array_equal(subsets[4], subset)
    expected = query_losses(model, train(model, docs, torch.from_numpy(np.isin(docs.ids, subset)).float(), RECIPE),
                            queries)
    np.testing.assert_allclose(losses[4], expected.double().numpy(), rtol=1e-6)


def test_magic_scores_on_ray_are_minus_the_metagradients_and_validate_on_a_bank(ray_session, tmp_path, run_inputs):
    config = MagicConfig(run_path=str(tmp_path / "magic"), workers=2, checkpoint_every=2, **run_inputs)
    top, query_ids = magic(config)  # two tasks: queries [0, 1] and [2]
    assert query_ids.tolist() == [0, 1, 2]
    model, docs, queries = in_process(run_inputs)
    expected = -metagradients(model, docs, queries, RECIPE, checkpoint_every=2).T.double().numpy()  # [N, Q]
    table = ScoreTable.open(str(tmp_path / "magic")).table.to_arrow().sort_by("id")
    assert table.column("id").to_numpy().tolist() == docs.ids.tolist()
    scores = np.stack(table.column("scores").to_numpy(zero_copy_only=False))
    assert np.linalg.norm(scores - expected) <= 1e-5 * np.linalg.norm(expected)
    assert top.ids[:, 0].tolist() == docs.ids[np.argmax(expected, 0)].tolist()
    retrain(RetrainConfig(bank_path=str(tmp_path / "bank"), runs=6, **run_inputs))
    result = validate(str(tmp_path / "magic"), str(tmp_path / "bank"))
    assert result.lds.subsets == 6 and result.lds.queries == 3 and np.isfinite(result.lds.lds)
