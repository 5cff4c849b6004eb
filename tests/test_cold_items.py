"""Cold-item simulation (training/cold_items.py, bahe-train --cold-item-dropout): a seeded share of the TRAINING
rows reaches the model as never-seen items -- their item ID bags empty, their item statistics reset to a new
item's values -- and nothing else of the batch changes."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from bahe.model.batch import SampleBatcher
from bahe.model.dense_features import DenseNormalizer, log1p_dense
from bahe.training.cold_items import ColdItemBatcher, ColdItemSimulation, empty_bags
from tests.conftest import tiny_rows


def test_empty_bags_empties_only_the_named_features_in_the_chosen_rows():
    """Reference: the same KJT built from per-row lists with the chosen rows' item bags left empty."""
    item = [[5], [6], [7], [8]]
    genres = [[1, 2], [], [3], [4, 5, 6]]
    rows = torch.tensor([False, True, False, True])

    def kjt(item_bags, genre_bags):
        bags = item_bags + genre_bags
        return KeyedJaggedTensor.from_lengths_sync(
            keys=["item_id", "cat_genres"], values=torch.tensor([v for bag in bags for v in bag], dtype=torch.int64),
            lengths=torch.tensor([len(bag) for bag in bags], dtype=torch.int64))

    got = empty_bags(kjt(item, genres), ("item_id",), rows).to_dict()
    want = kjt([[5], [], [7], []], genres).to_dict()
    for key in ("item_id", "cat_genres"):
        assert torch.equal(got[key].lengths(), want[key].lengths()), key
        assert torch.equal(got[key].values(), want[key].values()), key
    both = empty_bags(kjt(item, genres), ("item_id", "cat_genres"), rows).to_dict()
    assert both["cat_genres"].lengths().tolist() == [2, 0, 1, 0]
    assert both["cat_genres"].values().tolist() == [1, 2, 3]


@pytest.fixture
def batcher(tiny_schema):
    table = pa.table(tiny_rows(400))
    normalizer = DenseNormalizer(("dense_age",), (float(log1p_dense(table, ("dense_age",)).mean()),), (0.5,))
    return table, SampleBatcher(tiny_schema, {"user_id": 1000, "item_id": 1000, "cat_genre": 16},
                                dense_normalizer=normalizer)


def test_a_seeded_share_of_rows_becomes_never_seen_items_and_nothing_else_changes(batcher):
    table, plain = batcher
    simulation = ColdItemSimulation(0.3, ("item_id",), (("dense_age", 0.0),))
    cold = ColdItemBatcher(plain, simulation, seed=7, rank=0, first_step=0)
    reference, got = plain(table), cold(table)
    lengths = got.sparse_features.to_dict()["item_id"].lengths()
    dropped = lengths == 0
    assert 0.22 < float(dropped.float().mean()) < 0.38  # 400 draws at 0.3: 4.6 standard deviations each side
    # the dropped rows carry a never-seen item's age, z-scored like the data: (log1p(0) - mean) / std
    new_age = (math.log1p(0.0) - plain.dense_normalizer.mean[0]) / plain.dense_normalizer.std[0]
    assert torch.allclose(got.dense_features[dropped, 0], torch.full((int(dropped.sum()),), new_age))
    assert torch.equal(got.dense_features[~dropped], reference.dense_features[~dropped])
    kept = reference.sparse_features.to_dict()["item_id"].values()[~dropped]
    assert torch.equal(got.sparse_features.to_dict()["item_id"].values(), kept)
    for key in ("user_id", "cat_genre"):  # the user's and the item's other features are untouched
        assert torch.equal(got.sparse_features.to_dict()[key].values(), reference.sparse_features.to_dict()[key].values())
    assert torch.equal(got.labels, reference.labels)
    assert cold.counters is plain.counters  # the trainer logs the wrapped batcher's counters


def test_the_draw_follows_seed_rank_and_step_so_a_resume_draws_the_same(batcher):
    table, plain = batcher
    simulation = ColdItemSimulation(0.5)

    def dropped(seed, rank, first_step, calls=1):
        wrapper = ColdItemBatcher(plain, simulation, seed=seed, rank=rank, first_step=first_step)
        for _ in range(calls):
            batch = wrapper(table)
        return batch.sparse_features.to_dict()["item_id"].lengths() == 0

    resumed = dropped(0, 0, first_step=2)  # a run resumed after step 2 draws step 3 ...
    assert torch.equal(resumed, dropped(0, 0, first_step=0, calls=3))  # ... as the uninterrupted run did
    assert not torch.equal(resumed, dropped(0, 1, first_step=2))  # each rank its own rows
    assert not torch.equal(resumed, dropped(1, 0, first_step=2))
    assert not torch.equal(dropped(0, 0, 0), dropped(0, 0, 1))  # each step new rows


def test_mean_gives_the_train_mean_and_off_changes_nothing(batcher):
    table, plain = batcher
    got = ColdItemBatcher(plain, ColdItemSimulation(0.5, dense=(("dense_age", "mean"),)), seed=0, rank=0,
                          first_step=0)(table)
    dropped = got.sparse_features.to_dict()["item_id"].lengths() == 0
    assert dropped.any() and torch.all(got.dense_features[dropped, 0] == 0.0)  # z-score 0
    off = ColdItemBatcher(plain, ColdItemSimulation(0.0), seed=0, rank=0, first_step=0)(table)
    assert torch.equal(off.sparse_features.values(), plain(table).sparse_features.values())
    assert np.array_equal(off.dense_features.numpy(), plain(table).dense_features.numpy())


@pytest.mark.parametrize("share, features, dense, message", [
    (1.0, ["item_id"], [], "--cold-item-dropout"),
    (-0.1, ["item_id"], [], "in [0, 1)"),
    (0.3, [], [], "--cold-item-features"),
    (0.3, ["item_id"], ["dense_age"], "COLUMN=VALUE"),
    (0.3, ["item_id"], ["dense_age=often"], "a number or 'mean'"),
    (0.3, ["item_id"], ["dense_age=1", "dense_age=2"], "twice"),
])
def test_bad_settings_are_refused_naming_the_flag(share, features, dense, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        ColdItemSimulation.from_flags(share, features, dense)


def test_names_the_data_lacks_are_refused_before_training(batcher):
    _, plain = batcher
    with pytest.raises(ValueError, match="'dense_year', which is not a dense column"):
        ColdItemBatcher(plain, ColdItemSimulation(0.3, dense=(("dense_year", 0.0),)), seed=0, rank=0, first_step=0)
    with pytest.raises(ValueError, match=r"\['movie_id'\], which the model does not read"):
        ColdItemBatcher(plain, ColdItemSimulation(0.3, ("movie_id",)), seed=0, rank=0, first_step=0)


def test_the_trainer_refuses_it_for_data_without_sample_tables(tmp_path):
    from bahe.training.config import TrainConfig

    with pytest.raises(ValueError, match="Parquet data"):
        TrainConfig(data_dir=tmp_path, out_dir=tmp_path / "run", data="random",
                    cold_items=ColdItemSimulation(0.3))


@pytest.mark.integration
def test_bahe_train_takes_the_flags_and_records_them(tmp_path, capsys):
    """bahe-train --cold-item-dropout/--cold-item-features/--cold-item-dense on MovieLens-100K: the run trains and
    metrics.json records the simulation; a column the data lacks stops it in one line before any step."""
    import json

    from bahe.ctr_data.movielens import MovieLensConfig, write_movielens
    from bahe.launchers.train import main
    from tests.test_predict import process_group

    data = tmp_path / "data"
    write_movielens(MovieLensConfig(max_history=3, protocol="item_cold", seed=0), data)
    flags = ["--data-dir", str(data), "--arm", "dlrm", "--batch-size", "256", "--embedding-dim", "8", "--dense-arch",
             "16", "8", "--over-arch", "16", "1", "--table-rows", "2000", "--steps", "4", "--bootstrap", "0",
             "--cold-item-dropout", "0.5", "--cold-item-features", "item_id"]
    dense = ["--cold-item-dense", "dense_item_history=0", "dense_item_prior_positive_rate=0.55"]
    with process_group():
        assert main([*flags, "--out", str(tmp_path / "run"), *dense]) == 0
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["cold_items"]
    assert recorded == {"share": 0.5, "id_features": ["item_id"],
                        "dense": {"dense_item_history": 0.0, "dense_item_prior_positive_rate": 0.55}}
    capsys.readouterr()
    with process_group():
        assert main([*flags, "--out", str(tmp_path / "bad"), "--cold-item-dense", "dense_item_rating=0"]) == 2
    assert "'dense_item_rating', which is not a dense column" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "metrics.json").exists()
