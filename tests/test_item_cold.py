"""``bahe-data movielens --split item_cold`` (ctr_data/movielens.py) on the real MovieLens-100K: no cold
item's row reaches train, the cold share is the one asked for, each cold item lies whole in valid or test,
no label of a held-out row reaches any feature (flipping every cold rating changes nothing but those rows'
labels), a cold item's prior falls back to the global rate of the earlier warm ratings, cold titles are in
item_text (what bahe-encode reads) and in no sequence, the same seed gives the same split, and the command."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pytest

from bahe.ctr_data import cli as data_cli
from bahe.ctr_data.movielens import MovieLensConfig, build_samples, cold_items, read_raw, wheel_source
from bahe.ctr_data.parquet_io import SampleReader
from bahe.ctr_data.schema import SampleSchema
from bahe.embeddings.vocabulary import count_texts

SPLITS = ("train", "valid", "test")


def items_of(table: pa.Table) -> set[int]:
    return set(table.column("item_id").to_pylist())


def cold_set(splits: dict[str, pa.Table]) -> tuple[set[int], set[int]]:
    """Items absent from train, per held-out split, that are NOT merely new (first rated after train's last
    timestamp, as the time split has them too): the cold items, found from the output alone."""
    train_end = max(splits["train"].column("timestamp").to_pylist())
    found = []
    for split in ("valid", "test"):
        table = splits[split]
        first = {}
        for item, ts in zip(table.column("item_id").to_pylist(), table.column("timestamp").to_pylist()):
            first[item] = min(ts, first.get(item, ts))
        found.append({i for i in items_of(table) - items_of(splits["train"]) if first[i] <= train_end})
    return found[0], found[1]


@pytest.fixture(scope="module")
def cold():
    return build_samples(MovieLensConfig(max_history=5, protocol="item_cold", cold_share=0.2, seed=0))


@pytest.fixture(scope="module")
def drawn():
    """The cold items the split drew (to valid, to test), as the module draws them."""
    config = MovieLensConfig(protocol="item_cold", cold_share=0.2, seed=0)
    return cold_items(config, {r[2] for r in read_raw(None).ratings})


def test_no_cold_row_reaches_train_and_the_share_is_as_asked(cold, drawn):
    extra = SampleSchema.from_arrow(cold["train"].schema).extra
    assert extra["split"] == "item_cold" and extra["cold_share"] == 0.2 and extra["seed"] == 0
    to_valid, to_test = drawn
    assert len(to_valid) == len(to_test) == 168 and extra["cold_items"] == round(0.2 * 1682) == 336
    assert not items_of(cold["train"]) & (to_valid | to_test)  # no row of a cold item in train
    assert to_valid <= items_of(cold["valid"]) and not to_valid & items_of(cold["test"])  # whole in valid
    assert to_test <= items_of(cold["test"]) and not to_test & items_of(cold["valid"])  # whole in test
    in_valid, in_test = cold_set(cold)  # from the output alone: items missing from train but rated during it
    assert in_valid <= to_valid and in_test <= to_test and len(in_valid) > 150 and len(in_test) > 150
    assert sum(t.num_rows for t in cold.values()) == 100_000
    warm_rows = cold["train"].num_rows  # the warm items' ratings are cut 8:1:1 by time
    for split in ("valid", "test"):
        table = cold[split]
        timestamps = table.column("timestamp").to_pylist()
        assert timestamps == sorted(timestamps)
        warm = ~np.isin(table.column("item_id").to_numpy(), list(to_valid | to_test))
        assert abs(int(warm.sum()) - warm_rows / 8) < warm_rows / 80


def test_another_share_and_seed(cold):
    other = build_samples(MovieLensConfig(max_history=2, protocol="item_cold", cold_share=0.3, seed=5))
    assert SampleSchema.from_arrow(other["train"].schema).extra["cold_items"] == round(0.3 * 1682)
    assert cold_set(other) != cold_set(cold)
    again = build_samples(MovieLensConfig(max_history=5, protocol="item_cold", cold_share=0.2, seed=0))
    assert all(again[s].equals(cold[s], check_metadata=True) for s in SPLITS)  # seeded: reproducible


def flipped_source(tmp_path, items: set[int]):
    """A copy of the wheel's MovieLens-100K with every rating of ``items`` flipped across the label's cut
    (> 3 becomes 1, <= 3 becomes 5)."""
    source = tmp_path / "ml-100k"
    shutil.copytree(wheel_source(), source)
    lines = (source / "ml-100k.inter").read_text().splitlines()
    out = [lines[0]]
    for line in lines[1:]:
        user, item, rating, ts = line.split("\t")
        if int(item) in items:
            rating = "1" if int(float(rating)) > 3 else "5"
        out.append("\t".join((user, item, rating, ts)))
    (source / "ml-100k.inter").write_text("\n".join(out) + "\n")
    return source


def test_no_label_of_a_held_out_row_reaches_any_feature(cold, drawn, tmp_path):
    """Flip every rating of the cold items: the same items are cold (the draw does not see ratings) and every
    column of every row is unchanged but the cold rows' labels. The control: flipping one warm item's
    ratings does change other rows' features (the check would see a leak)."""
    held = drawn[0] | drawn[1]
    config = MovieLensConfig(max_history=5, protocol="item_cold", cold_share=0.2, seed=0,
                             source=flipped_source(tmp_path / "cold", held))
    flipped = build_samples(config)
    features = [c for c in cold["train"].column_names if c != "label"]
    for split in SPLITS:
        assert flipped[split].select(features).equals(cold[split].select(features)), split
        is_cold = np.isin(cold[split].column("item_id").to_numpy(), list(held))
        before, after = cold[split].column("label").to_numpy(), flipped[split].column("label").to_numpy()
        assert np.all(before[~is_cold] == after[~is_cold]) and np.all(before[is_cold] != after[is_cold])
    warm_item = max(items_of(cold["train"]), key=lambda i: cold["train"].column("item_id").to_pylist().count(i))
    control = build_samples(MovieLensConfig(max_history=5, protocol="item_cold", cold_share=0.2, seed=0,
                                            source=flipped_source(tmp_path / "warm", {warm_item})))
    assert not control["test"].select(features).equals(cold["test"].select(features))


def test_a_cold_items_features_are_never_seen_and_its_prior_is_the_global_rate(cold, drawn):
    """Cold rows: item history 0 and the item prior equal to the positive rate (smoothed by 5 ratings at 0.5)
    of the warm ratings strictly earlier -- recomputed here from the raw file; genres and decade present."""
    held = drawn[0] | drawn[1]
    ratings = []
    for line in (wheel_source() / "ml-100k.inter").read_text().splitlines()[1:]:
        _, item, rating, ts = (int(float(x)) for x in line.split("\t"))
        if item not in held:
            ratings.append((ts, int(rating > 3)))
    ratings.sort()
    times = np.array([t for t, _ in ratings])
    positives = np.concatenate([[0], np.cumsum([p for _, p in ratings])])
    table = cold["test"]
    rows = table.filter(pa.array(np.isin(table.column("item_id").to_numpy(), list(held)))).to_pylist()
    for row in rows[::97]:
        earlier = int(np.searchsorted(times, row["timestamp"], side="left"))
        expected = (positives[earlier] + 2.5) / (earlier + 5.0)
        assert row["dense_item_history"] == 0.0
        assert row["dense_item_prior_positive_rate"] == pytest.approx(expected, abs=1e-6)
        assert row["cat_genres"]
    assert len(rows) > 5000


def test_cold_titles_are_encoded_but_never_in_a_sequence(cold, drawn, tmp_path):
    from bahe.ctr_data.movielens import write_movielens

    paths = write_movielens(MovieLensConfig(max_history=5, protocol="item_cold", seed=0), tmp_path)
    held = drawn[0] | drawn[1]
    titles = {row["item_id"]: row["item_text"] for split in ("valid", "test") for row in
              cold[split].select(["item_id", "item_text"]).to_pylist() if row["item_id"] in held}
    in_sequences = set()
    for path in paths.values():
        table = SampleReader(path).read_all()
        for column in ("seq_liked", "seq_disliked"):
            in_sequences |= {t for titles_ in table.column(column).to_pylist() for t in titles_}
    warm_titles = {t for split in SPLITS for i, t in zip(cold[split].column("item_id").to_pylist(),
                                                        cold[split].column("item_text").to_pylist()) if i not in held}
    only_cold = set(titles.values()) - warm_titles  # (two items may share a title)
    assert only_cold and not only_cold & in_sequences
    assert only_cold <= set(count_texts(paths.values()))  # what bahe-encode build encodes


def test_the_command(tmp_path, capsys):
    out = tmp_path / "ml"
    assert data_cli.main(["movielens", "--out", str(out), "--max-history", "2", "--split", "item_cold",
                          "--cold-share", "0.1", "--seed", "3"]) == 0
    extra = SampleReader(out / "test.parquet").schema.extra
    assert (extra["split"], extra["cold_share"], extra["seed"], extra["cold_items"]) == ("item_cold", 0.1, 3, 168)
    capsys.readouterr()
    assert data_cli.main(["movielens", "--out", str(tmp_path / "bad"), "--split", "item_cold", "--cold-share",
                          "1.5"]) == 2
    assert "cold_share must be a share of the items in (0, 1) (--cold-share), got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert data_cli.main(["movielens", "--out", str(tmp_path / "bad"), "--split", "item_cold", "--cold-share",
                          "0.0001"]) == 2
    assert "--cold-share 0.0001 of 1682 items holds out 0: choose a share" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_the_floor_reads_no_held_out_label_and_scores_rows_in_file_order(drawn, tmp_path):
    """The non-learned floor (training/baselines.py) on the item-cold split: flipping every cold rating changes
    no candidate's score of any row (a cold label feeds no user history, as in the split's own features), and
    the scores are in the files' row order (the item candidate recomputed row by row from the files)."""
    from bahe.ctr_data.movielens import write_movielens
    from bahe.training.baselines import ITEM_PRIOR_WEIGHT, candidate_scores

    held = drawn[0] | drawn[1]
    plain, flipped = tmp_path / "plain", tmp_path / "flipped"
    write_movielens(MovieLensConfig(max_history=2, protocol="item_cold", seed=0), plain)
    write_movielens(MovieLensConfig(max_history=2, protocol="item_cold", seed=0,
                                    source=flipped_source(tmp_path / "cold", held)), flipped)
    scores, labels, splits = candidate_scores(plain)
    again, flipped_labels, _ = candidate_scores(flipped)
    assert all(np.array_equal(scores[name], again[name]) for name in scores)
    assert not np.array_equal(labels, flipped_labels)  # the flip did reach the labels
    tables = {s: SampleReader(plain / f"{s}.parquet").read_all() for s in SPLITS}
    train_items, train_labels = (tables["train"].column(c).to_numpy() for c in ("item_id", "label"))
    prior = train_labels.mean()
    for split in ("valid", "test"):
        items = tables[split].column("item_id").to_numpy()
        want = [(train_labels[train_items == i].sum() + ITEM_PRIOR_WEIGHT * prior)
                / ((train_items == i).sum() + ITEM_PRIOR_WEIGHT) for i in items[:300]]
        assert np.allclose(scores["item"][splits == split][:300], want)
        assert np.array_equal(labels[splits == split], tables[split].column("label").to_numpy())
