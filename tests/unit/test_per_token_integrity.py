"""Per-token tables of a completion-only dataset: de-duplication and `verify` key rows by (id, token_pos).

A completion-only document has loss on its completion alone, yet a row for every input position but
the last (prompt positions carry gradient through attention), so the rows-per-id invariant is the
same as for plain text, and rows lost from inside a document are a problem `verify` must name.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from rayattr.api import collect_in_process
from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
from rayattr.space import TableMeta
from rayattr.store import Completion, GradientTable
from rayattr.verify import verify

DOCS = 6


@pytest.fixture(scope="module")
def rows(offline_fixture) -> tuple[TableMeta, pa.Table]:
    """``(meta, rows as a table)`` of six prompt/completion documents, one row per token."""
    data = DataSpec(str(offline_fixture.queries), split=f"train[:{DOCS}]", prompt_column="prompt",
                    completion_column="completion")
    spec = RunSpec(ModelSpec(str(offline_fixture.neox)), data, GradSpec(projection_dim=2, per_token=True))
    (meta, chunk), = collect_in_process(spec)
    return meta, chunk.to_arrow()


def _keys(table: GradientTable) -> list[tuple[int, int]]:
    arrow = table.table.to_arrow()
    return sorted(zip(arrow.column("id").to_pylist(), arrow.column("token_pos").to_pylist()))


def _finished_table(tmp_path, rows) -> tuple[str, GradientTable, pa.Table]:
    """The rows written as a finished pass leaves them (its completion record saved): run path, table, rows."""
    meta, arrow = rows
    run = str(tmp_path / "run")
    table = GradientTable.create(run, meta)
    table.append(arrow)
    Completion.of_shards("gradients", [(0, DOCS)], [], []).save(run)
    return run, table, arrow


def test_completion_only_rows_cover_every_position_but_the_last(rows):
    _, arrow = rows
    ids, positions, tokens = (arrow.column(c).to_numpy() for c in ("id", "token_pos", "num_tokens"))
    for doc in range(DOCS):
        mine = ids == doc
        np.testing.assert_array_equal(np.sort(positions[mine]), np.arange(tokens[mine][0] - 1))


def test_duplicated_token_rows_are_removed_and_verify_sees_them(tmp_path, rows):
    run, table, arrow = _finished_table(tmp_path, rows)
    clean = _keys(table)
    ids = arrow.column("id").to_numpy()
    table.append(arrow.filter(pa.array(np.isin(ids, [1, 4]))))  # a retried batch of documents 1 and 4
    report = verify(run)
    assert report.problems == ["%s table 'gradients': 2 id(s) stored more than once (1, 4); rerun the command that wrote "
                               "it (it de-duplicates when it finishes)" % run]
    assert table.deduplicate() == int(np.isin(ids, [1, 4]).sum())
    assert _keys(table) == clean  # one copy of every (id, token_pos)
    assert verify(run).ok


def test_verify_names_an_id_that_lost_token_rows(tmp_path, rows):
    run, table, arrow = _finished_table(tmp_path, rows)
    table.table.delete("id = 2 AND token_pos = 3")  # one token row of document 2 gone
    assert verify(run).problems == [f"{run} table 'gradients': 1 id(s) lack some of their token rows (2); rows were "
                                     "removed outside rayattr: rebuild it in a new RUN_PATH"]
