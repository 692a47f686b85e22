"""Conversations and rewards: assistant-only loss masks, Dr. GRPO advantages, and their bad inputs.

Brute force: the token mask is rebuilt turn by turn from the fixture template's
pieces; each row equals one backward per document of the masked loss (times the
document's advantage with a reward column).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from rayattr.api import collect_in_process
from rayattr.chat import tokenize_conversations
from rayattr.config import DataSpec, GradSpec, ModelSpec, RayattrError, RunSpec
from rayattr.data import plan_shards, read_shard, reward_baselines, tokenize

MODULES = ("gpt_neox.layers.0.attention.query_key_value", "gpt_neox.layers.1.mlp.dense_4h_to_h")  # model order


def _pieces_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Tokens and targets of the fixture template built turn by turn: header, then content + EOS."""
    ids, mask = [], []
    for message in messages:
        header = tokenizer(f"<|{message['role']}|>\n", add_special_tokens=False)["input_ids"]
        body = tokenizer(message["content"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        ids += header + body
        mask += [False] * len(header) + [message["role"] == "assistant"] * len(body)
    return ids, mask


def _rows(spec: RunSpec) -> dict[int, tuple[float, np.ndarray]]:
    return {int(i): (float(loss), grad) for _, rows in collect_in_process(spec)
            for i, loss, grad in zip(rows.ids, rows.loss, rows.grads)}


def _reference(model, tokens: list[int], mask: list[bool], weight: float = 1.0) -> tuple[float, np.ndarray]:
    """One backward of ``weight x`` the summed loss over the masked targets; ``MODULES``' gradients concatenated."""
    model.zero_grad(set_to_none=True)
    ids = torch.tensor(tokens).unsqueeze(0)
    token_loss = F.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="none")
    loss = weight * token_loss[torch.tensor(mask[1:])].sum()
    loss.backward()
    modules = dict(model.named_modules())
    return loss.item(), np.concatenate([modules[name].weight.grad.flatten().numpy() for name in MODULES])


@pytest.fixture(scope="module")
def chat(offline_fixture, tmp_path_factory):
    """The fixture's chat split plus a row with no assistant turn (id 48)."""
    table = pq.read_table(offline_fixture.conversations)
    lonely = pa.Table.from_pylist([{"query_id": "none", "messages": [{"role": "user", "content": "Anyone there?"}],
                                    "reward": 0.5}], schema=table.schema)
    path = tmp_path_factory.mktemp("chat") / "chat.parquet"
    pq.write_table(pa.concat_tables([table, lonely]), path)
    return path, pa.concat_tables([table, lonely]).to_pylist()


def _spec(offline_fixture, dataset, **data) -> RunSpec:
    return RunSpec(ModelSpec(str(offline_fixture.neox)), DataSpec(str(dataset), **data),
                   GradSpec(projection_dim=0, modules=MODULES))


def test_assistant_mask_covers_assistant_content_and_end_of_turn_only(offline_fixture, chat) -> None:
    tokenizer = AutoTokenizer.from_pretrained(offline_fixture.neox)
    conversations = [row["messages"] for row in chat[1]]
    ids, masks = tokenize_conversations(tokenizer, conversations)
    for messages, got_ids, got_mask in zip(conversations, ids, masks):
        want_ids, want_mask = _pieces_mask(tokenizer, messages)
        assert got_ids == want_ids
        assert got_mask.tolist() == want_mask
    assert masks[0].sum() > 0 and not masks[-1].any()


def test_conversation_rows_equal_one_backward_per_document(offline_fixture, chat, load_fixture_model) -> None:
    path, rows = chat
    model = load_fixture_model("neox", trainable=True)
    tokenizer = AutoTokenizer.from_pretrained(offline_fixture.neox)
    got = _rows(_spec(offline_fixture, path, conversation_column="messages"))
    assert sorted(got) == list(range(48))  # the conversation without an assistant turn has no row
    for doc in (0, 1, 5, 47):
        want_loss, want_grad = _reference(model, *_pieces_mask(tokenizer, rows[doc]["messages"]))
        loss, grad = got[doc]
        assert loss == pytest.approx(want_loss, rel=1e-5)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6 * np.abs(want_grad).max())


def test_reward_rows_are_the_advantage_times_the_plain_rows(offline_fixture, chat) -> None:
    path, rows = chat
    plain = _rows(_spec(offline_fixture, path, conversation_column="messages"))
    weighted = _rows(_spec(offline_fixture, path, conversation_column="messages", reward_column="reward"))
    groups: dict[str, list[float]] = {}
    for row in rows:  # the brute-force baseline: the mean reward of the conversations with the same prompt
        groups.setdefault(repr(row["messages"][:-1]), []).append(row["reward"])
    assert sorted(weighted) == sorted(plain)
    for doc, (loss, grad) in plain.items():
        advantage = rows[doc]["reward"] - np.mean(groups[repr(rows[doc]["messages"][:-1])])
        assert abs(advantage) == pytest.approx(0.5)  # one right (1) and one wrong (0) answer per prompt
        assert weighted[doc][0] == pytest.approx(advantage * loss, rel=1e-5)
        np.testing.assert_allclose(weighted[doc][1], advantage * grad, rtol=1e-5, atol=1e-7 * np.abs(grad).max())


def test_prompt_completion_rewards_group_by_prompt(offline_fixture, tmp_path) -> None:
    table = pa.table({"prompt": ["Who is", "Who is", "Who is", "Where is"], "completion": [" a", " b", " c", " d"],
                      "reward": [1.0, 2.0, 6.0, 4.0]})
    pq.write_table(table, tmp_path / "pc.parquet")
    data = DataSpec(str(tmp_path / "pc.parquet"), prompt_column="prompt", completion_column="completion",
                    reward_column="reward")
    baselines = reward_baselines(data)
    assert baselines == {"Who is": 3.0, "Where is": 4.0}
    tokenizer = AutoTokenizer.from_pretrained(offline_fixture.neox)
    tokens = tokenize(next(read_shard(data, plan_shards(data)[0])), data, tokenizer, 64, baselines)
    assert tokens.column("loss_weight").to_pylist() == [-2.0, -1.0, 3.0, 0.0]


def _nan_rewards(tmp_path) -> str:
    table = pa.table({"prompt": ["p", "p", "q"], "completion": [" a", " b", " c"], "reward": [1.0, None, float("nan")]})
    pq.write_table(table, tmp_path / "nan.parquet")
    return str(tmp_path / "nan.parquet")


def test_nan_rewards_fail_naming_the_row_or_are_skipped_and_counted(offline_fixture, tmp_path) -> None:
    path = _nan_rewards(tmp_path)
    data = dict(prompt_column="prompt", completion_column="completion", reward_column="reward")
    with pytest.raises(RayattrError, match=r"row 1 has a NaN reward in 'reward' \(2 such row\(s\).*--skip-nan-rewards"):
        reward_baselines(DataSpec(path, **data))
    chunks = [rows for _, rows in collect_in_process(_spec(offline_fixture, path, skip_nan_rewards=True, **data))]
    assert np.concatenate([c.ids for c in chunks]).tolist() == [0]
    assert sorted(np.concatenate([c.skipped for c in chunks]).tolist()) == [1, 2]
    assert chunks[0].loss[0] == 0.0  # reward 1 is its group's only finite reward: advantage 0


def test_conversation_bad_inputs_are_one_line_errors(offline_fixture, tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(offline_fixture.neox)
    bad = pa.table({"messages": ['[{"role": "user"}]'], "id": pa.array([7], pa.int64())})
    with pytest.raises(RayattrError, match=r"row 7 of --conversation-column 'messages' is not a list of \{role, content\}"):
        tokenize(bad, DataSpec("d", conversation_column="messages"), tokenizer, 64)
    plain = AutoTokenizer.from_pretrained(offline_fixture.neox)
    plain.chat_template = None
    good = pa.table({"messages": ['[{"role": "user", "content": "hi"}]'], "id": pa.array([0], pa.int64())})
    with pytest.raises(RayattrError, match="has no chat template: set `tokenizer.chat_template`"):
        tokenize(good, DataSpec("d", conversation_column="messages"), plain, 64)
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "text.parquet")
    with pytest.raises(RayattrError, match=r"has no column \['messages'\].*Pass --conversation-column"):
        plan_shards(DataSpec(str(tmp_path / "text.parquet"), conversation_column="messages"))
    with pytest.raises(RayattrError, match="--reward-column needs --prompt-column/--completion-column or --conversation-column"):
        DataSpec("d", reward_column="reward")
    with pytest.raises(RayattrError, match="two document formats"):
        DataSpec("d", conversation_column="messages", completion_column="c")
