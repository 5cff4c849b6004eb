"""The default (shuffled) training stream: each epoch is a permutation of the train file's rows -- every
row exactly once, never a row group read twice or left out -- and every row arrives intact, its label
still with its own features, through the batcher too. (The trainer's shuffled runs end to end:
tests/test_training_shuffled.py; why shuffled training needs more steps on the tiny synthetic set than
file order: docs/decisions.md, "Shuffled vs file-order training".)"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from bahe.ctr_data.parquet_io import SampleReader, SampleWriter
from bahe.model.batch import SampleBatcher
from bahe.training.data import rank_tables
from tests.conftest import tiny_rows

ROWS = 61  # a prime: epochs never line up with global batches, so batches straddle epoch boundaries


@pytest.fixture
def rows_file(tmp_path, tiny_schema):
    """61 rows in 5 row groups (4 x 13 + 9), each row's columns all derived from its own index ``i`` --
    user id 1000 + i, item id 5000 + i, age i, texts naming i -- with a label drawn at random, so a
    label that travels without its row shows up as a mismatch, not as a coincidence of parities."""
    rows = tiny_rows(ROWS)
    rows["label"] = np.random.default_rng(7).integers(0, 2, ROWS).tolist()
    rows["user_id"] = [1000 + i for i in range(ROWS)]
    rows["item_id"] = [5000 + i for i in range(ROWS)]
    rows["seq_liked"] = [[f"Movie {i} seen {j}" for j in range(i % 4)] for i in range(ROWS)]
    path = tmp_path / "train.parquet"
    with SampleWriter(path, tiny_schema, row_group_size=13) as writer:
        writer.write(rows)
    assert SampleReader(path).num_row_groups == 5
    return path


def by_user(table: pa.Table) -> dict[int, dict]:
    return {row["user_id"]: row for row in table.to_pylist()}


def stream(path, batch_size: int, world: int, steps: int, **kw) -> list[pa.Table]:
    """The global training stream as the ranks see it: step by step, rank 0's rows, then rank 1's, ..."""
    ranks = [rank_tables(path, batch_size, r, world, train=True, **kw) for r in range(world)]
    out = []
    for _ in range(steps):
        for it in ranks:
            table, real = next(it)
            assert table.num_rows == batch_size and real == batch_size  # training batches are never padded
            out.append(table)
    return out


@pytest.mark.parametrize(("batch_size", "world", "seed"), [(4, 2, 0), (5, 3, 11), (7, 1, 3)])
def test_each_epoch_is_a_permutation_of_the_file_with_every_row_intact(rows_file, batch_size, world, seed):
    original = by_user(SampleReader(rows_file).read_all())
    tables = stream(rows_file, batch_size, world, steps=-(-4 * ROWS // (batch_size * world)), seed=seed)
    seen = [row for table in tables for row in table.to_pylist()]
    for row in seen:  # intact: every column of the row is the file's row with that user id
        assert row == original[row["user_id"]]
    epochs = [[row["user_id"] for row in seen[e * ROWS:(e + 1) * ROWS]] for e in range(4)]
    for users in epochs:
        assert sorted(users) == sorted(original)  # every row exactly once per epoch
    assert epochs[0] != sorted(original)  # shuffled ...
    assert len({tuple(users) for users in epochs}) == 4  # ... in a new order each epoch


def test_row_groups_are_visited_whole_and_permuted_inside(rows_file):
    """The stream keeps one row group in memory at a time: a group's rows come together, in a random
    order (a shuffle of row groups alone would keep the file's time order inside each group), and the
    groups come in a seeded random order (not always the file's first group first)."""
    epoch = [row["user_id"] - 1000 for t in stream(rows_file, 4, 2, steps=8, seed=0) for row in t.to_pylist()][:ROWS]
    positions = [i for i, index in enumerate(epoch) if index < 13]  # the first row group's rows
    assert positions == list(range(positions[0], positions[0] + 13))
    inside = [index for index in epoch if index < 13]
    assert inside != sorted(inside)
    first_groups = {(next(rank_tables(rows_file, 4, 0, 2, train=True, seed=s))[0]["user_id"][0].as_py() - 1000) // 13
                    for s in range(8)}
    assert len(first_groups) > 1  # the groups' order is shuffled too, not the file's


def test_batched_labels_stay_with_their_rows_features(rows_file, tiny_schema):
    """Through the batcher: in every shuffled batch, label, user id, item id and dense value of a row are
    those of one and the same file row (a shuffle that permuted the label column on its own would pass
    the row counts but fail here)."""
    original = by_user(SampleReader(rows_file).read_all())
    batcher = SampleBatcher(tiny_schema, {"user_id": 10_000, "item_id": 10_000, "cat_genre": 100})
    for table in stream(rows_file, 8, 2, steps=12, seed=5):
        batch = batcher(table)
        ids = batch.sparse_features.to_dict()
        users, items = ids["user_id"].values().tolist(), ids["item_id"].values().tolist()
        assert [original[u]["label"] for u in users] == batch.labels.tolist()
        assert [u + 4000 for u in users] == items
        ages = torch.tensor([original[u]["dense_age"] for u in users]).log1p()
        torch.testing.assert_close(batch.dense_features[:, 0], ages)
