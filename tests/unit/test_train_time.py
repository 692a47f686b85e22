"""Train-time collection in an HF Trainer: rows equal build rows, training is unchanged, runs resume."""

from __future__ import annotations

import shutil

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import build_rows
from transformers import (AutoModelForCausalLM, DataCollatorForLanguageModeling, DataCollatorWithFlattening, Trainer,
                          TrainerCallback, TrainingArguments)

from rayattr.config import GradSpec, RayattrError
from rayattr.grads.live import IDS_KEY, LiveCapture
from rayattr.grads.normalizer import from_optimizer_state
from rayattr.store import GradientTable
from rayattr.train import ORDER, GradientCollectorCallback, prepare_trainer
from rayattr.verify import verify

datasets = pytest.importorskip("datasets")
FIRST_ID = 100  # ids that are not row numbers, so a mix-up shows


@pytest.fixture(scope="module")
def encoded(offline_fixture, fixture_tokenizer) -> list[list[int]]:
    texts = pq.read_table(offline_fixture.train, columns=["text"]).column("text").to_pylist()[:16]
    return fixture_tokenizer(texts)["input_ids"]


class Interrupt(TrainerCallback):
    """Stops training like a killed process once ``at`` optimizer steps are done."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if state.global_step == self.at:
            raise KeyboardInterrupt


def train(path, fixture, tokenizer, encoded, kind="neox", collect: dict | None = None, collator=None, extra=(),
          resume: bool = False, **arguments) -> torch.nn.Module:
    """Fine-tune a fresh fixture model on the 16 documents; with ``collect``, rows go to ``path / 'run'``."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained({"neox": fixture.neox, "gpt2": fixture.gpt2}[kind], dtype=torch.float32)
    dataset = datasets.Dataset.from_dict({"id": list(range(FIRST_ID, FIRST_ID + len(encoded))), "input_ids": encoded})
    settings = dict(per_device_train_batch_size=4, num_train_epochs=1, learning_rate=1e-3, report_to=[],
                    save_strategy="no", logging_strategy="no", use_cpu=True, seed=0, disable_tqdm=True) | arguments
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(path / "out"), **settings), train_dataset=dataset,
                      data_collator=collator or DataCollatorForLanguageModeling(tokenizer, mlm=False))
    if collect is not None:
        prepare_trainer(trainer)
        trainer.add_callback(GradientCollectorCallback(str(path / "run"), **collect))
    for callback in extra:
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=True if resume else None)
    return model


def read(run: str, table: str = "gradients") -> pa.Table:
    return lancedb.connect(run).open_table(table).to_arrow().sort_by([("step", "ascending"), ("id", "ascending")])


def vectors(table: pa.Table) -> np.ndarray:
    return np.stack(table.column("grad").to_numpy(zero_copy_only=False))


@pytest.fixture(scope="module")
def collected(tmp_path_factory, offline_fixture, fixture_tokenizer, encoded):
    """Two epochs with gradient accumulation, with and without the callback."""
    root = tmp_path_factory.mktemp("train-time")
    arguments = dict(gradient_accumulation_steps=2, num_train_epochs=2)
    spec = GradSpec(projection_dim=16)
    with_rows = train(root, offline_fixture, fixture_tokenizer, encoded, collect={"grads": spec}, **arguments)
    plain = train(root / "plain", offline_fixture, fixture_tokenizer, encoded, **arguments)
    return str(root / "run"), spec, with_rows, plain


def test_first_step_rows_equal_build_rows_at_the_initial_checkpoint(collected, offline_fixture, encoded):
    run, spec, _, _ = collected
    rows = read(run)
    first = rows.filter(pa.compute.equal(rows.column("step"), 0))
    assert first.num_rows == 8  # two micro-batches of 4
    initial = AutoModelForCausalLM.from_pretrained(offline_fixture.neox, dtype=torch.float32)
    expected = build_rows(initial, spec, encoded, first.column("id").to_numpy(), FIRST_ID)
    assert np.linalg.norm(vectors(first) - expected) <= 1e-5 * np.linalg.norm(expected)
    table = GradientTable.open(run)
    assert table.meta.train_time and table.meta.dim == expected.shape[1]
    assert sorted(set(rows.column("step").to_pylist())) == [0, 1, 2, 3]


def test_training_is_unchanged_by_the_callback(collected):
    _, _, with_rows, plain = collected
    assert all(torch.equal(a, b) for a, b in zip(with_rows.state_dict().values(), plain.state_dict().values()))


def test_order_holds_every_example_once_per_epoch(collected, encoded):
    run = collected[0]
    order = read(run, ORDER)
    for epoch in (0, 1):
        seen = order.filter(pa.compute.equal(order.column("epoch"), epoch)).column("id").to_numpy()
        assert sorted(seen) == list(range(FIRST_ID, FIRST_ID + len(encoded)))
    gradients = read(run)
    assert gradients.select(["step", "id"]).equals(order.select(["step", "id"]))


def test_verify_checks_a_training_run_by_step_and_id(collected, tmp_path):
    """An id once per step that saw it is a sound training run (each step commits whole: no completion record);
    a (step, id) written twice is not."""
    assert verify(collected[0]).problems == []
    run = str(tmp_path / "run")
    shutil.copytree(collected[0], run)
    gradients = lancedb.connect(run).open_table("gradients")
    gradients.add(gradients.to_arrow().slice(0, 2))  # rows 0 and 1 again
    order = lancedb.connect(run).open_table(ORDER)
    order.add(order.to_arrow().slice(0, 1))
    first_ids = ", ".join(map(str, sorted(gradients.to_arrow().slice(0, 2).column("id").to_pylist())))
    assert verify(run).problems == [
        f"{run} table 'gradients': 2 (step, id) held more than once (ids {first_ids}); rows were written outside "
        "rayattr: rebuild it",
        f"{run} table 'order': 1 (step, id) held more than once (ids {order.to_arrow().column('id')[0]}); rows were "
        "written outside rayattr: rebuild it"]


def test_padding_free_batches_give_the_padded_rows(tmp_path, offline_fixture, fixture_tokenizer, encoded):
    spec = {"grads": GradSpec(projection_dim=8)}
    train(tmp_path / "padded", offline_fixture, fixture_tokenizer, encoded, collect=spec)
    train(tmp_path / "flat", offline_fixture, fixture_tokenizer, encoded, collect=spec, collator=DataCollatorWithFlattening())
    padded, flat = read(str(tmp_path / "padded" / "run")), read(str(tmp_path / "flat" / "run"))
    assert padded.select(["step", "id", "num_tokens"]).equals(flat.select(["step", "id", "num_tokens"]))
    first = padded.column("step").to_numpy() == 0  # later steps differ by the float sums of a packed forward
    assert np.linalg.norm(vectors(flat)[first] - vectors(padded)[first]) <= 1e-5 * np.linalg.norm(vectors(padded)[first])


def test_a_killed_run_resumes_without_duplicates(tmp_path, offline_fixture, fixture_tokenizer, encoded):
    arguments = dict(kind="gpt2", collect={"grads": GradSpec(projection_dim=8)}, save_strategy="steps", save_steps=2)
    train(tmp_path / "whole", offline_fixture, fixture_tokenizer, encoded, **arguments)
    with pytest.raises(KeyboardInterrupt):  # after step 3: rows of steps 0-1 committed with checkpoint 2, step 2's not
        train(tmp_path, offline_fixture, fixture_tokenizer, encoded, extra=[Interrupt(3)], **arguments)
    assert sorted(set(read(str(tmp_path / "run")).column("step").to_pylist())) == [0, 1]
    train(tmp_path, offline_fixture, fixture_tokenizer, encoded, resume=True, **arguments)
    resumed, whole = read(str(tmp_path / "run")), read(str(tmp_path / "whole" / "run"))
    assert resumed.select(["step", "id"]).equals(whole.select(["step", "id"]))
    np.testing.assert_allclose(vectors(resumed), vectors(whole), rtol=1e-5, atol=1e-6)


def test_rows_normalized_by_the_live_optimizer_equal_a_build_with_its_saved_state(tmp_path, offline_fixture,
                                                                                  fixture_tokenizer, encoded):
    spec = GradSpec(projection_dim=8, exclude_modules=("lm_head",))  # a saved state names the tied head as the embedding
    train(tmp_path, offline_fixture, fixture_tokenizer, encoded, kind="gpt2",
          collect={"grads": spec, "normalize": "adafactor"}, save_strategy="steps", save_steps=1, max_steps=2)
    rows = read(str(tmp_path / "run"))
    assert set(rows.column("step").to_pylist()) == {1}  # step 0 starts before the optimizer holds a moment
    checkpoint = tmp_path / "out" / "checkpoint-1"
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    normalizer = from_optimizer_state(checkpoint / "optimizer.pt", model, "adafactor")
    expected = build_rows(model, spec, encoded, rows.column("id").to_numpy(), FIRST_ID, normalizer)
    assert np.linalg.norm(vectors(rows) - expected) <= 1e-5 * np.linalg.norm(expected)


def test_a_loss_that_is_not_the_summed_cross_entropy_is_refused(load_fixture_model, encoded):
    model = load_fixture_model("neox", trainable=True).train()
    LiveCapture(model, GradSpec(projection_dim=4))  # its hooks check the backward below
    batch = torch.tensor([encoded[0][:12], encoded[1][:12]])
    out = model(input_ids=batch, labels=batch, **{IDS_KEY: torch.tensor([0, 1])})
    with pytest.raises(RayattrError, match="not a multiple of the summed token cross-entropy"):
        (out.loss + out.logits.square().mean()).backward()  # a z-loss-like term beside the cross-entropy


def test_a_trainer_that_computes_the_loss_itself_is_refused(tmp_path, offline_fixture, fixture_tokenizer, encoded):
    with pytest.raises(RayattrError, match="has no labels"):  # label smoothing: the Trainer keeps the labels
        train(tmp_path, offline_fixture, fixture_tokenizer, encoded, collect={}, label_smoothing_factor=0.1, max_steps=1)


def test_batches_without_ids_are_refused(tmp_path, offline_fixture, fixture_tokenizer, encoded):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(offline_fixture.neox, dtype=torch.float32)
    dataset = datasets.Dataset.from_dict({"input_ids": encoded})
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[],
                                                          use_cpu=True, disable_tqdm=True), train_dataset=dataset,
                      data_collator=DataCollatorForLanguageModeling(fixture_tokenizer, mlm=False))
    trainer.add_callback(GradientCollectorCallback(str(tmp_path / "run")))
    with pytest.raises(RayattrError, match="prepare_trainer"):
        trainer.train()
