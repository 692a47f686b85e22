"""Train-time collection in trl's SFTTrainer: its fused LM head, gradient checkpointing and padding-free batches."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset
from helpers import build_rows
from test_train_time import FIRST_ID, read, vectors
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from rayattr.config import GradSpec, RayattrError
from rayattr.train import GradientCollectorCallback, prepare_trainer

NO_HEAD = GradSpec(projection_dim=8, exclude_modules=("lm_head",))  # the fused head never calls the head module


def sft(path, fixture, tokenizer, spec: GradSpec, **arguments) -> SFTTrainer:
    """SFTTrainer at its defaults (fused LM head, gradient checkpointing) on 16 fixture texts, collecting rows."""
    texts = pq.read_table(fixture.train, columns=["text"]).column("text").to_pylist()[:16]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(fixture.neox, dtype=torch.float32)
    dataset = Dataset.from_dict({"id": list(range(FIRST_ID, FIRST_ID + len(texts))), "text": texts})
    settings = dict(per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, report_to=[], save_strategy="no",
                    logging_strategy="no", use_cpu=True, bf16=False, seed=0, disable_tqdm=True) | arguments
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=str(path / "out"), **settings), train_dataset=dataset,
                         processing_class=tokenizer)
    prepare_trainer(trainer)
    trainer.add_callback(GradientCollectorCallback(str(path / "run"), grads=spec))
    trainer.train()
    return trainer


@pytest.mark.parametrize("arguments", [{}, {"activation_checkpointing_kwargs": {"use_reentrant": True}},
                                       {"padding_free": True, "max_length": None}],
                         ids=["defaults", "reentrant-checkpointing", "padding-free"])
def test_sft_trainer_rows_equal_build_rows(tmp_path, offline_fixture, fixture_tokenizer, arguments):
    trainer = sft(tmp_path, offline_fixture, fixture_tokenizer, NO_HEAD, **arguments)
    assert trainer.args.gradient_checkpointing  # trl's default: modules are recomputed inside the backward
    rows = read(str(tmp_path / "run"))
    first = rows.filter(pa.compute.equal(rows.column("step"), 0))
    assert first.num_rows == 4 and sorted(set(rows.column("step").to_pylist())) == [0, 1]
    initial = AutoModelForCausalLM.from_pretrained(offline_fixture.neox, dtype=torch.float32)
    encoded = trainer.train_dataset["input_ids"]  # trl's own tokenization (it appends EOS)
    expected = build_rows(initial, NO_HEAD, encoded, first.column("id").to_numpy(), FIRST_ID)
    assert np.linalg.norm(vectors(first) - expected) <= 1e-5 * np.linalg.norm(expected)
    losses = first.column("loss").to_numpy()
    assert np.all(losses > 0) and np.all(np.isfinite(losses))


def test_a_fused_head_with_the_head_collected_is_refused(tmp_path, offline_fixture, fixture_tokenizer):
    with pytest.raises(RayattrError, match="fused LM head"):
        sft(tmp_path, offline_fixture, fixture_tokenizer, GradSpec(projection_dim=8), max_steps=1)
