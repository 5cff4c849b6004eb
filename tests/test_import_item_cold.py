"""bahe-data import --split item_cold (ctr_data/importer.py, ctr_data/item_cold.py): a seeded share of the items
has every row in valid or test, none in train; the other items' rows split by time (fractions of the warm rows,
or cuts); the same seed gives the same items, as bahe-data movielens --split item_cold draws them (one helper)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from bahe.ctr_data.cli import main as bahe_data
from bahe.ctr_data.import_mapping import MappingError, mapping_from_dict
from bahe.ctr_data.importer import import_logs
from bahe.ctr_data.item_cold import hold_out
from bahe.ctr_data.movielens import MovieLensConfig, cold_items
from tests.test_importer import SPLITS, write_table

ITEMS = 200


def log_rows(n: int = 3000) -> list[dict]:
    """n impressions in time order (three per timestamp) over ITEMS items, each item at many times."""
    return [{"ts": 1000 + i // 3, "user": i % 37, "item": 500 + (i * 7919) % ITEMS, "clicked": (i * 31) % 5 < 2,
             "title": f"Item {500 + (i * 7919) % ITEMS}"} for i in range(n)]


def mapping(path, batch_rows: int = 256, **split) -> dict:
    return {"input": {"files": [str(path)]}, "split": split, "batch_rows": batch_rows,
            "columns": {"user_id": "user", "item_id": "item", "label": "clicked", "timestamp": "ts", "item_text": "title"}}


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    return write_table(tmp_path_factory.mktemp("cold") / "log.parquet", [{**r, "clicked": int(r["clicked"])}
                                                                        for r in log_rows()])


def splits(out) -> dict[str, dict]:
    return {s: pq.read_table(out / f"{s}.parquet", columns=["item_id", "timestamp"]).to_pydict() for s in SPLITS}


def test_no_cold_items_row_reaches_train_and_the_share_is_as_asked(log, tmp_path):
    result = import_logs(mapping_from_dict(mapping(log, fractions=[0.8, 0.1, 0.1], cold_share=0.25, seed=3)),
                         tmp_path / "out")
    got = splits(tmp_path / "out")
    train = set(got["train"]["item_id"])
    cold = {s: set(got[s]["item_id"]) - train for s in ("valid", "test")}
    assert len(cold["valid"] | cold["test"]) == round(0.25 * ITEMS)  # the share, exactly (rounded)
    assert not cold["valid"] & cold["test"]  # each cold item whole in valid or in test
    assert (cold["valid"], cold["test"]) == hold_out(range(500, 500 + ITEMS), 0.25, 3, (0.1, 0.1))
    every = [r["item"] for r in log_rows()]
    for split in ("valid", "test"):  # every row of a cold item is there
        assert sum(i in cold[split] for i in got[split]["item_id"]) == sum(i in cold[split] for i in every)
    warm_rows = sum(i not in cold["valid"] | cold["test"] for i in every)
    assert result["rows"]["train"] == pytest.approx(0.8 * warm_rows, abs=3)  # fractions of the warm rows
    warm_valid = [t for i, t in zip(got["valid"]["item_id"], got["valid"]["timestamp"]) if i in train]
    assert max(got["train"]["timestamp"]) < min(warm_valid)  # the warm rows split by time
    extra = json.loads(pq.read_schema(tmp_path / "out" / "train.parquet").metadata[b"bahe.schema"])["extra"]
    assert extra["imported"]["item_cold"] == {"cold_share": 0.25, "seed": 3, "cold_items": 50}


def test_the_same_seed_gives_the_same_items_and_movielens_draws_them_the_same_way(log, tmp_path):
    def cold(seed, out, **kw):
        import_logs(mapping_from_dict(mapping(log, cold_share=0.1, seed=seed, **kw)), tmp_path / out)
        got = splits(tmp_path / out)
        return set(got["valid"]["item_id"] + got["test"]["item_id"]) - set(got["train"]["item_id"])

    first = cold(7, "a")
    assert cold(7, "b", batch_rows=7) == first != cold(8, "c")
    config = MovieLensConfig(protocol="item_cold", cold_share=0.1, seed=7)
    assert set().union(*cold_items(config, set(range(500, 500 + ITEMS)))) == first  # the one helper


def test_with_cuts_the_warm_rows_split_at_the_cuts(log, tmp_path):
    import_logs(mapping_from_dict(mapping(log, cuts=[1700, 1850], cold_share=0.2, seed=0)), tmp_path / "out")
    got = splits(tmp_path / "out")
    cold = set(got["valid"]["item_id"] + got["test"]["item_id"]) - set(got["train"]["item_id"])
    assert len(cold) == 40 and max(got["train"]["timestamp"]) < 1700
    warm = {s: [t for i, t in zip(got[s]["item_id"], got[s]["timestamp"]) if i not in cold] for s in SPLITS}
    assert min(warm["valid"]) >= 1700 and max(warm["valid"]) < 1850 <= min(warm["test"])
    assert any(t < 1700 for t in got["test"]["timestamp"])  # cold rows from any time


@pytest.mark.parametrize(("split", "expected"), [
    ({"column": "fold", "cold_share": 0.2}, "--split-column"),
    ({"cold_share": 1.5}, "cold_share (--cold-share) must be a share of the items in (0, 1)"),
    ({"cold_share": "many"}, "cold_share must be a number"),
], ids=["with-own-column", "share-above-1", "share-not-a-number"])
def test_a_bad_item_cold_split_is_refused(log, split, expected):
    with pytest.raises(MappingError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        mapping_from_dict(mapping(log, **split))


def test_the_command(log, tmp_path, capsys):
    flags = ["import", "--input", str(log), "--user-id", "user", "--item-id", "item", "--label", "clicked",
             "--timestamp", "ts", "--item-text", "title"]
    assert bahe_data([*flags, "--split", "item_cold", "--seed", "3", "--out", str(tmp_path / "a")]) == 0
    got = splits(tmp_path / "a")
    cold = set(got["valid"]["item_id"] + got["test"]["item_id"]) - set(got["train"]["item_id"])
    assert cold == set().union(*hold_out(range(500, 500 + ITEMS), 0.2, 3, (0.1, 0.1)))  # default share 0.2
    capsys.readouterr()
    assert bahe_data([*flags, "--cold-share", "0.3", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "bahe-data: error: --cold-share and --seed go with --split item_cold"
    assert bahe_data([*flags, "--split", "item_cold", "--cold-share", "0.999", "--out", str(tmp_path / "c")]) == 2
    assert "--cold-share 0.999 of 200 items holds out 200" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
