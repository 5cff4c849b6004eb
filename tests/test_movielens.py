"""MovieLens-100K from the installed wheel or a GroupLens folder: real counts, a strict time split,
and behaviour histories that match an independent recomputation from the raw ratings."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from bahe.ctr_data.movielens import MovieLensConfig, build_samples, wheel_source, write_movielens
from bahe.ctr_data.parquet_io import SampleReader
from bahe.ctr_data.schema import DataError


@pytest.fixture(scope="module")
def splits():
    return build_samples(MovieLensConfig(max_history=30))


def test_wheel_copy_has_the_known_counts(splits):
    rows = sum(t.num_rows for t in splits.values())
    users = {u for t in splits.values() for u in t.column("user_id").to_pylist()}
    items = {i for t in splits.values() for i in t.column("item_id").to_pylist()}
    positives = sum(sum(t.column("label").to_pylist()) for t in splits.values())
    assert (rows, len(users), len(items)) == (100_000, 943, 1_682)
    assert positives == 55_375  # rating > 3


def test_split_is_8_1_1_and_strictly_time_ordered(splits):
    train, valid, test = (splits[s].column("timestamp").to_pylist() for s in ("train", "valid", "test"))
    assert max(train) < min(valid) and max(valid) < min(test)
    assert abs(len(train) - 80_000) < 50 and abs(len(valid) - 10_000) < 50 and abs(len(test) - 10_000) < 50


def test_histories_match_a_recomputation_from_the_raw_file(splits):
    """liked / disliked = titles of the user's strictly earlier ratings, oldest first, capped."""
    folder = wheel_source()
    titles = {}
    for line in (folder / "ml-100k.item").read_text().splitlines()[1:]:
        item, title, year, _ = line.split("\t")
        titles[int(item)] = f"{title} ({year})" if year.isdigit() else title
    by_user = defaultdict(list)
    for line in (folder / "ml-100k.inter").read_text().splitlines()[1:]:
        user, item, rating, ts = (int(float(x)) for x in line.split("\t"))
        by_user[user].append((ts, item, rating))
    rows = splits["test"].to_pylist()
    for row in random.Random(0).sample(rows, 200):
        past = sorted(r for r in by_user[row["user_id"]] if r[0] < row["timestamp"])
        assert row["seq_liked"] == [titles[i] for _, i, r in past if r > 3][-30:]
        assert row["seq_disliked"] == [titles[i] for _, i, r in past if r <= 3][-30:]
        assert row["item_text"] == titles[row["item_id"]]


def test_files_are_written_and_read_back(tmp_path):
    paths = write_movielens(MovieLensConfig(max_history=5), tmp_path)
    reader = SampleReader(paths["valid"])
    assert reader.schema.sequences == ("liked", "disliked")
    assert max(len(s) for s in reader.read_all().column("seq_liked").to_pylist()) == 5


def _grouplens(folder, data_lines):
    folder.mkdir()
    (folder / "u.data").write_text("".join(data_lines))
    genres = ["0"] * 19
    genres[8] = "1"  # Drama
    items = [f"{i}|Film {i} (1990)|01-Jan-1990||http://x|{'|'.join(genres)}\n" for i in (1, 2, 3)]
    (folder / "u.item").write_text("".join(items), encoding="latin-1")
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    return folder


def test_user_grouplens_folder(tmp_path):
    lines = ["1\t1\t5\t100\n", "1\t2\t1\t200\n", "2\t1\t4\t150\n", "1\t3\t4\t300\n", "2\t3\t2\t300\n"] * 1
    folder = _grouplens(tmp_path / "ml-100k", lines)
    splits = build_samples(MovieLensConfig(source=folder, split=(0.6, 0.2, 0.2)))
    rows = [r for t in splits.values() for r in t.to_pylist()]
    last = [r for r in rows if r["user_id"] == 1 and r["item_id"] == 3][0]
    assert last["seq_liked"] == ["Film 1 (1990)"] and last["seq_disliked"] == ["Film 2 (1990)"]
    assert last["cat_genres"] == [9] and last["item_text"] == "Film 3 (1990)"


@pytest.mark.parametrize(
    ("line", "expect"),
    [("1\t2\n", r"u.data, row 2: expected 4"), ("1\tx\t3\t100\n", r"u.data, row 2, field 'item_id'"),
     ("1\t2\t9\t100\n", r"row 2, field 'rating': rating must be 1..5"),
     ("1\t77\t3\t100\n", r"u.data, row 2, field 'item_id': rating of item 77"),
     ("5\t1\t3\t100\n", r"u.data, row 2, field 'user_id': rating by user 5")],
)
def test_bad_rows_are_named(tmp_path, line, expect):
    folder = _grouplens(tmp_path / "ml", ["1\t1\t5\t100\n", line])
    with pytest.raises(DataError, match=expect):
        build_samples(MovieLensConfig(source=folder))


def test_config_is_validated(tmp_path):
    with pytest.raises(ValueError, match="max_history"):
        MovieLensConfig(max_history=-1)
    with pytest.raises(ValueError, match="split"):
        MovieLensConfig(split=(0.5, 0.5, 0.5))
    with pytest.raises(FileNotFoundError, match="u.data"):
        build_samples(MovieLensConfig(source=tmp_path))
