"""bahe-data import (ctr_data/importer.py, import_mapping.py, import_sources.py, import_cli.py): a team's own
logs -> train/valid/test.parquet. The mapping is checked when built, with errors that say what to change;
every bad row is refused naming its file, row and column; list-column and event-table sequences equal a
hand-computed reference; CSV, JSON lines and Parquet give the same samples; the three split modes; any
batch size gives the same files and the event join holds only the users inside its window; a failed import
leaves nothing behind. The guide's walkthrough (docs/byo_data.md) is run by tests/test_byo_data_guide.py."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from bahe.ctr_data.cli import main as bahe_data
from bahe.ctr_data.import_mapping import MappingError, load_mapping, mapping_from_dict
from bahe.ctr_data.import_sources import hash_text
from bahe.ctr_data.importer import import_logs
from bahe.ctr_data.parquet_io import SampleReader
from bahe.ctr_data.schema import DataError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "byo_data"
SPLITS = ("train", "valid", "test")


# ---------------------------------------------------------------------------------------------------------
# helpers: one table written as CSV, JSON lines or Parquet
# ---------------------------------------------------------------------------------------------------------

def write_table(path: Path, rows: list[dict], fmt: str | None = None) -> Path:
    """Rows (column -> Python value) as a file; lists become "a|b" texts in CSV, None an empty cell."""
    fmt = fmt or path.suffix.lstrip(".")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    if fmt == "csv":
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for row in rows:
                writer.writerow(["|".join(map(str, v)) if isinstance(v, list) else "" if v is None else v
                                 for v in (row.get(c) for c in columns)])
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def rows_of(path: Path) -> list[dict]:
    return SampleReader(path).read_all().to_pylist()


def impressions(n: int = 10) -> list[dict]:
    """n valid impressions, in time order, two per timestamp."""
    return [{"ts": 100 + i // 2, "user": i % 3, "item": 10 + i, "clicked": i % 2, "title": f"Item {i}",
             "price": 1.5 * i, "device": ["mobile", "desktop"][i % 2], "queries": [f"q{j}" for j in range(i % 4)],
             "fold": SPLITS[0 if i < 6 else 1 if i < 8 else 2]} for i in range(n)]


def base(path: Path, **changes) -> dict:
    """A mapping of ``impressions()`` (TOML's shape, file names resolved)."""
    raw = {"input": {"files": [str(path)]},
           "columns": {"user_id": "user", "item_id": "item", "label": "clicked", "timestamp": "ts", "item_text": "title"},
           "dense": {"price": "price"}, "categorical": {"device": "device"},
           "sequences": {"queries": {"column": "queries", "sep": "|"}}, "split": {"column": "fold"}}
    raw.update(changes)
    return raw


def run(raw: dict, out: Path) -> dict:
    return import_logs(mapping_from_dict(raw), out)


# ---------------------------------------------------------------------------------------------------------
# the mapping
# ---------------------------------------------------------------------------------------------------------

BAD_MAPPINGS = {
    "unknown-key": ({"columns": {"usr_id": "user", "item_id": "i", "label": "l", "timestamp": "t", "item_text": "x"}},
                    "[columns]: unknown key 'usr_id' (did you mean 'user_id'?)"),
    "missing-label": ({"columns": {"user_id": "u", "item_id": "i", "timestamp": "t", "item_text": "x"}},
                      "[columns]: label is missing: give label = <a text (a column name)>"),
    "label-not-a-name": ({"columns": {"user_id": "u", "item_id": "i", "label": 3, "timestamp": "t", "item_text": "x"}},
                         "[columns]: label must be a text (a column name), got 3"),
    "no-title": ({"columns": {"user_id": "u", "item_id": "i", "label": "l", "timestamp": "t"}},
                 "[columns]: no item title: give item_text"),
    "two-splits": ({"split": {"fractions": [0.8, 0.1, 0.1], "column": "fold"}},
                   "[split]: give one of fractions, cuts or column, not fractions and column"),
    "fractions-sum": ({"split": {"fractions": [0.8, 0.1, 0.2]}}, "fractions must be three positive numbers summing to 1"),
    "cuts-order": ({"split": {"cuts": [200, 100]}}, "cuts must be two timestamps T1 < T2"),
    "sequence-both": ({"sequences": {"q": {"column": "queries", "events": "e.csv"}}},
                      "[sequences.q]: give exactly one of column"),
    "event-text-and-item": ({"sequences": {"c": {"events": "e.csv", "user_id": "u", "timestamp": "t", "text": "x",
                                                 "item_id": "i"}}}, "give exactly one of text"),
    "event-item-without-items": ({"sequences": {"c": {"events": "e.csv", "user_id": "u", "timestamp": "t",
                                                      "item_id": "i"}}}, "which is missing: add [items]"),
    "csv-list-without-sep": ({"sequences": {"q": {"column": "queries"}}}, "a CSV cell is one text: give sep"),
    "bad-feature-name": ({"dense": {"Price": "price"}}, "[dense] Price: a feature name must be lower-case"),
    "window-negative": ({"sequences": {"c": {"events": "e.csv", "user_id": "u", "timestamp": "t", "text": "x",
                                             "window": -5}}}, "window must be a positive number"),
    "max-length-zero": ({"sequences": {"q": {"column": "queries", "sep": "|", "max_length": 0}}},
                        "max_length must be a positive integer"),
    "order-typo": ({"sequences": {"q": {"column": "queries", "sep": "|", "order": "latest_first"}}},
                   "order must be \"oldest_first\" or \"newest_first\""),
    "hash-ids": ({"hash_ids": ["user"]}, "hash_ids: ['user'] are not id columns"),
    "format": ({"input": {"files": ["log.xlsx"]}}, "cannot tell the format of log.xlsx"),
    "dense-fill-key": ({"dense": {"price": {"column": "price", "default": 0}}}, "unknown key 'default'"),
    "dense-not-a-table": ({"dense": "price"}, "[dense]: must be a table, got 'price'"),
    "batch-rows-zero": ({"batch_rows": 0}, "batch_rows: must be a positive integer, got 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_MAPPINGS))
def test_a_bad_mapping_is_refused_naming_the_key_and_what_to_change(tmp_path, case):
    changes, expected = BAD_MAPPINGS[case]
    with pytest.raises(MappingError) as err:
        mapping_from_dict(base(tmp_path / "log.csv", **changes))
    assert expected in str(err.value)


def test_a_toml_mapping_resolves_its_files_beside_it_and_flags_override_it(tmp_path):
    (tmp_path / "m.toml").write_text('[input]\nfiles = "log.csv"\n[columns]\nuser_id = "u"\nitem_id = "i"\n'
                                     'label = "l"\ntimestamp = "t"\nitem_text = "x"\n[split]\nfractions = [0.8, 0.1, 0.1]\n')
    mapping = load_mapping(tmp_path / "m.toml")
    assert mapping.input.paths == (tmp_path / "log.csv",) and mapping.split.by == "fractions"
    mapping = load_mapping(tmp_path / "m.toml", {"columns": {"label": "click"},
                                                 "split": {"fractions": None, "cuts": None, "column": "fold"}})
    assert mapping.label == "click" and mapping.user_id == "u" and mapping.split.by == "column"
    (tmp_path / "bad.toml").write_text("[input\n")
    with pytest.raises(MappingError, match="bad.toml: not valid TOML"):
        load_mapping(tmp_path / "bad.toml")


# ---------------------------------------------------------------------------------------------------------
# bad rows: file, row and column named
# ---------------------------------------------------------------------------------------------------------

BAD_CELLS = [  # (format, column, value written at row 3, expected message part)
    ("csv", "clicked", "2", "label must be 0 or 1 (or true / false), got '2'"),
    ("jsonl", "clicked", 2, "label must be 0 or 1 (or true / false), got 2"),
    ("csv", "clicked", "yes", "label must be 0 or 1"),
    ("parquet", "clicked", None, "missing label"),
    ("csv", "user", "-1", "ids must be >= 0, got -1"),
    ("jsonl", "user", "u7", "expected an integer, got 'u7'; list the column in hash_ids"),
    ("jsonl", "item", 1.5, "expected an integer, got 1.5"),
    ("csv", "user", "", "missing value: every row needs one"),
    ("jsonl", "ts", "yesterday", "expected an integer, got 'yesterday'"),
    ("csv", "ts", "100.5", "expected an integer, got '100.5'"),
    ("csv", "price", "abc", "expected a number, got 'abc'"),
    ("csv", "price", "nan", "dense value must be finite"),
    ("jsonl", "price", 1e39, "within float32's range"),
    ("jsonl", "price", None, "missing value: give the column a fill"),
    ("jsonl", "title", None, "missing text (null)"),
    ("jsonl", "title", 1984, "expected a text, got 1984"),
    ("jsonl", "device", -3, "an integer category must be in [0, 2**63)"),
    ("jsonl", "queries", ["q", 5], "element 1 of the list is 5, not a text"),
    ("jsonl", "queries", {"q": 1}, "expected a list of texts"),
    ("csv", "fold", "val", "the split must be one of ['train', 'valid', 'test'], got 'val'"),
]


@pytest.mark.parametrize("fmt,column,value,expected", BAD_CELLS, ids=[f"{c[0]}-{c[1]}-{c[2]!r}" for c in BAD_CELLS])
def test_a_bad_value_is_refused_naming_file_row_and_column(tmp_path, fmt, column, value, expected):
    rows = impressions()
    rows[3][column] = value
    path = write_table(tmp_path / f"log.{fmt}", rows) if fmt != "csv" else tmp_path / "log.csv"
    if fmt == "csv":  # raw texts, exactly as given
        good = write_table(tmp_path / "good.csv", impressions()).read_text().splitlines()
        header = good[0].split(",")
        cells = next(csv.reader([good[4]]))
        cells[header.index(column)] = value
        good[4] = ",".join(f'"{c}"' for c in cells)
        path.write_text("\n".join(good) + "\n")
    with pytest.raises(DataError) as err:
        run(base(path), tmp_path / "out")
    assert (err.value.path, err.value.row, err.value.field) == (path, 3, column), str(err.value)
    assert expected in str(err.value)
    assert str(err.value).startswith(f"file {path}, row 3, field {column!r}: ")
    assert not (tmp_path / "out").exists()


def test_malformed_files_are_named_by_file_and_line(tmp_path):
    good = write_table(tmp_path / "good.csv", impressions()).read_text().splitlines()
    cases = {
        "fields.csv": ("\n".join([*good[:5], "1,2,3", *good[5:]]), "line 6: expected 9 fields (as the header has), got 3"),
        "quote.csv": ("\n".join([*good[:4], good[4].replace(",Item", ',"Item'), *good[5:]]),
                      "line 5: expected 9 fields (as the header has), got 5: '101,0,13,1,\"Item 3,4.5"),
        "lines.csv": ("\n".join([*good[:4], good[4].replace(",Item 3,", ',"Item\n3",'), *good[5:]]),
                      "field runs over a line end ('Item\\n3'): an unterminated quote? A field may not span lines"),
        "bytes.csv": ("\n".join([*good[:4], good[4].replace("Item", "It\udcffem"), *good[5:]]), "field is not valid UTF-8"),
    }
    for name, (text, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(text.encode("utf-8", "surrogateescape") + b"\n")
        with pytest.raises(DataError) as err:
            run(base(path), tmp_path / "out")
        assert "quote opened there is never closed" in str(err.value) or name != "quote.csv"
        assert str(err.value).startswith(f"file {path}") and expected in str(err.value), str(err.value)
        if name in ("lines.csv", "bytes.csv"):  # a record: row and column named
            assert (err.value.row, err.value.field) == (3, "title"), str(err.value)
    lines = [json.dumps(r) for r in impressions()]
    for name, bad, expected in (("broken.jsonl", '{"ts": 1,', "not valid JSON"), ("array.jsonl", "[1, 2]",
                                                                                  "must be an object")):
        path = tmp_path / name
        path.write_text("\n".join([*lines[:4], bad, *lines[4:]]) + "\n")
        with pytest.raises(DataError) as err:
            run(base(path), tmp_path / "out")
        assert (err.value.path, err.value.row) == (path, 4) and expected in str(err.value)


def test_a_misspelt_column_is_named_with_the_columns_the_file_has(tmp_path):
    for fmt in ("csv", "jsonl", "parquet"):
        path = write_table(tmp_path / f"log.{fmt}", impressions())
        raw = base(path)
        raw["columns"]["label"] = "click"
        with pytest.raises(DataError) as err:
            run(raw, tmp_path / "out")
        assert err.value.field == "click" and "'clicked'" in str(err.value), str(err.value)


def test_a_missing_or_empty_file_is_named(tmp_path):
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "junk.parquet").write_bytes(b"junk")
    for path, expected in ((tmp_path / "nowhere.csv", "no such file"), (tmp_path / "empty.csv", "empty CSV file"),
                           (tmp_path / "junk.parquet", "not a readable Parquet file")):
        with pytest.raises(DataError) as err:
            run(base(path), tmp_path / "out")
        assert err.value.path == path and expected in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()


def test_rows_out_of_time_order_are_refused_when_the_split_or_a_join_needs_time_order(tmp_path):
    rows = impressions()
    rows[5]["ts"] = 90
    path = write_table(tmp_path / "log.csv", rows)
    with pytest.raises(DataError) as err:
        run(base(path, split={"fractions": [0.6, 0.2, 0.2]}), tmp_path / "out")
    assert (err.value.row, err.value.field) == (5, "ts") and "earlier than the row before it" in str(err.value)
    assert "give [split] cuts or column" in str(err.value)
    run(base(path), tmp_path / "out")  # the team's own split column takes any order
    assert [r["timestamp"] for r in rows_of(tmp_path / "out" / "train.parquet")] == [100, 100, 101, 101, 102, 90]


def test_bad_rows_of_the_item_and_event_tables_are_named(tmp_path):
    path = write_table(tmp_path / "log.csv", impressions())
    items = write_table(tmp_path / "items.csv", [{"item": 10 + i, "name": f"Item {i}"} for i in range(10)])
    events = [{"user": 0, "at": 90 + i, "item": 10 + i} for i in range(6)]
    seq = {"events": "", "user_id": "user", "timestamp": "at", "item_id": "item"}

    def refused(event_rows, item_rows=None):
        write_table(tmp_path / "events.csv", event_rows)
        if item_rows is not None:
            write_table(tmp_path / "items.csv", item_rows)
        raw = base(path, items={"files": [str(items)], "item_id": "item", "text": "name"},
                   sequences={"c": {**seq, "events": [str(tmp_path / "events.csv")]}})
        with pytest.raises(DataError) as err:
            run(raw, tmp_path / "out")
        return err.value

    err = refused([*events[:3], {**events[3], "at": 80}, *events[4:]])
    assert (err.path, err.row, err.field) == (tmp_path / "events.csv", 3, "at") and "must be sorted" in str(err)
    err = refused([*events[:2], {**events[2], "item": 99}, *events[3:]])
    assert (err.path, err.row, err.field) == (tmp_path / "events.csv", 2, "item")
    assert "item '99' is not in the items table" in str(err)
    err = refused(events, [{"item": 10, "name": "A"}, {"item": 11, "name": "B"}, {"item": 10, "name": "C"}])
    assert (err.path, err.row, err.field) == (items, 2, "item") and "listed again with another title" in str(err)


def test_a_parquet_text_that_is_not_utf8_is_named(tmp_path):
    table = pa.Table.from_pylist(impressions())
    titles = pa.array([t.encode() if i != 3 else b"bad \xff" for i, t in enumerate(table["title"].to_pylist())],
                      pa.binary()).view(pa.string())
    pq.write_table(table.set_column(table.schema.get_field_index("title"), "title", titles), tmp_path / "log.parquet")
    with pytest.raises(DataError) as err:
        run(base(tmp_path / "log.parquet"), tmp_path / "out")
    assert (err.value.row, err.value.field) == (3, "title") and "not valid UTF-8" in str(err.value)


# ---------------------------------------------------------------------------------------------------------
# values and joins against hand-computed references
# ---------------------------------------------------------------------------------------------------------

def test_values_become_sample_values(tmp_path):
    rows = [{"ts": 5, "user": "u1", "item": "7", "clicked": "true", "title": " Tent ", "price": "2.5", "device": "3|x|",
             "queries": "a| b ||c|d", "fold": "train"},
            {"ts": 6, "user": 7, "item": 8.0, "clicked": "0", "title": "", "price": "", "device": "", "queries": "",
             "fold": "valid"},
            {"ts": 7, "user": "7", "item": 9, "clicked": 1, "title": "x", "price": -1, "device": 4, "queries": "z",
             "fold": "test"}]
    path = write_table(tmp_path / "log.jsonl", rows)
    raw = base(path, hash_ids=["user_id"], dense={"price": {"column": "price", "fill": 0.5}},
               categorical={"device": {"column": "device", "sep": "|"}},
               sequences={"queries": {"column": "queries", "sep": "|", "max_length": 3},
                          "backwards": {"column": "queries", "sep": "|", "order": "newest_first"}})
    run(raw, tmp_path / "out")
    got = [rows_of(tmp_path / "out" / f"{s}.parquet")[0] for s in SPLITS]
    assert got[0] == {"label": 1, "timestamp": 5, "user_id": hash_text("u1"), "item_id": 7, "cat_device": [3, hash_text("x")],
                      "dense_price": 2.5, "item_text": "Tent", "seq_queries": ["b", "c", "d"],
                      "seq_backwards": ["d", "c", "b", "a"]}
    assert got[1]["user_id"] == got[2]["user_id"] == hash_text("7")  # 7 and "7": one user
    assert (got[1]["item_id"], got[1]["label"], got[1]["dense_price"], got[1]["cat_device"], got[1]["item_text"],
            got[1]["seq_queries"]) == (8, 0, 0.5, [], "", [])
    assert got[2]["cat_device"] == [4] and got[2]["dense_price"] == -1.0
    assert hash_text("u1") == 6154817874995026322  # BLAKE2b: the same on every machine, run and Python


def test_event_sequences_join_per_user_strictly_before_within_the_window_most_recent_last(tmp_path):
    events = [(1, 10, "a", "click"), (2, 11, "b", "click"), (1, 12, "c", "view"), (1, 15, "d", "click"),
              (1, 20, "e", "click"), (1, 21, "f", "click"), (3, 40, "g", "click")]
    write_table(tmp_path / "events.csv", [{"user": u, "ts": t, "text": x, "action": a} for u, t, x, a in events])
    shown = [(1, 5), (1, 15), (2, 15), (1, 21), (1, 30), (3, 40), (3, 41)]
    path = write_table(tmp_path / "log.csv", [{"ts": t, "user": u, "item": 1, "clicked": 0, "title": "t", "price": 0,
                                               "device": "", "queries": "", "fold": "train"} for u, t in shown])
    ev = {"events": [str(tmp_path / "events.csv")], "user_id": "user", "timestamp": "ts", "text": "text"}
    raw = base(path, sequences={"clicks": {**ev, "where": {"action": "click"}, "max_length": 2},
                                "recent": {**ev, "where": {"action": ["click"]}, "window": 5},
                                "views": {**ev, "where": {"action": "view"}},
                                "any": ev},
               split={"cuts": [0, 1]})  # everything in test
    with pytest.raises(ValueError, match="no row has a timestamp before 0"):
        run(raw, tmp_path / "out")
    raw["split"] = {"cuts": [40, 41]}
    run(raw, tmp_path / "out")
    got = [r for s in SPLITS for r in rows_of(tmp_path / "out" / f"{s}.parquet")]
    assert [r["seq_clicks"] for r in got] == [[], ["a"], ["b"], ["d", "e"], ["e", "f"], [], ["g"]]
    assert [r["seq_recent"] for r in got] == [[], ["a"], ["b"], ["e"], [], [], ["g"]]  # t - 5 <= event < t
    assert [r["seq_views"] for r in got] == [[], ["c"], [], ["c"], ["c"], [], []]
    assert [r["seq_any"] for r in got] == [[], ["a", "c"], ["b"], ["a", "c", "d", "e"], ["a", "c", "d", "e", "f"], [],
                                           ["g"]]


def test_the_event_join_holds_only_the_users_inside_its_window(tmp_path):
    """Memory: each user appears in a few minutes of a long log; with a window of 10 the join holds only the
    recent users (dropped as rows advance), without one every user seen."""
    n = 6000
    write_table(tmp_path / "events.csv", [{"user": i // 3, "ts": 3 * i, "text": f"t{i % 50}"} for i in range(n)])
    path = write_table(tmp_path / "log.csv", [{"ts": 3 * i + 1, "user": i // 3, "item": 1, "clicked": i % 2,
                                               "title": "t", "price": 0, "device": "", "queries": "",
                                               "fold": SPLITS[i % 3]} for i in range(n)])
    ev = {"events": [str(tmp_path / "events.csv")], "user_id": "user", "timestamp": "ts", "text": "text"}
    windowed = run(base(path, sequences={"s": {**ev, "window": 10}}, batch_rows=500), tmp_path / "a")
    unbounded = run(base(path, sequences={"s": ev}, batch_rows=500), tmp_path / "b")
    assert unbounded["peak_users"]["s"] == n // 3
    assert windowed["peak_users"]["s"] <= 1024 + 10, windowed  # swept once past 1024 users
    for split in SPLITS:
        assert rows_of(tmp_path / "a" / f"{split}.parquet") == rows_of(tmp_path / "b" / f"{split}.parquet")


# ---------------------------------------------------------------------------------------------------------
# formats, batches, splits
# ---------------------------------------------------------------------------------------------------------

def example_in(fmt: str, folder: Path) -> Path:
    """The example log (examples/byo_data) as `fmt`: JSON lines and Parquet with typed values and real lists."""
    folder.mkdir()
    for name in ("impressions", "events", "items"):
        table = pacsv.read_csv(EXAMPLE / f"{name}.csv")
        if name == "impressions":
            searches = [s.split("|") if s else [] for s in table["recent_searches"].fill_null("").to_pylist()]
            table = table.set_column(table.schema.get_field_index("recent_searches"), "recent_searches",
                                     pa.array(searches, pa.list_(pa.string())))
        if fmt == "parquet":
            pq.write_table(table, folder / f"{name}.parquet")
        else:
            write_table(folder / f"{name}.jsonl", table.to_pylist())
    text = (EXAMPLE / "mapping.toml").read_text().replace(".csv", f".{fmt}")
    (folder / "mapping.toml").write_text(text)
    return folder / "mapping.toml"


def test_csv_jsonl_and_parquet_give_the_same_samples(tmp_path):
    run_ = {}
    for fmt in ("csv", "jsonl", "parquet"):
        toml = EXAMPLE / "mapping.toml" if fmt == "csv" else example_in(fmt, tmp_path / fmt)
        import_logs(load_mapping(toml), tmp_path / f"out-{fmt}")
        run_[fmt] = {s: SampleReader(tmp_path / f"out-{fmt}" / f"{s}.parquet").read_all() for s in SPLITS}
    assert [run_["csv"][s].num_rows for s in SPLITS] == [240, 30, 30]
    for fmt in ("jsonl", "parquet"):
        for split in SPLITS:
            assert run_[fmt][split].equals(run_["csv"][split]), (fmt, split)
    clicked = run_["csv"]["train"]["seq_clicked"].to_pylist()
    assert sum(map(len, clicked)) > 100 and max(map(len, clicked)) <= 20


def test_any_batch_size_gives_the_same_files(tmp_path):
    """A log many times the batch size (7 rows a batch: 43 impression batches, event tables read alongside)
    gives exactly the files of one batch."""
    small = load_mapping(EXAMPLE / "mapping.toml", {"batch_rows": 7})
    whole = load_mapping(EXAMPLE / "mapping.toml", {"batch_rows": 1_000_000})
    import_logs(small, tmp_path / "small")
    import_logs(whole, tmp_path / "whole")
    for split in SPLITS:
        a, b = (SampleReader(tmp_path / d / f"{split}.parquet").read_all() for d in ("small", "whole"))
        assert a.equals(b) and a.num_rows > 0
    assert pq.ParquetFile(tmp_path / "small" / "train.parquet").metadata.num_row_groups > 1


def test_split_by_fractions_moves_cuts_past_equal_timestamps(tmp_path):
    path = write_table(tmp_path / "log.csv", impressions(10))  # timestamps 100 100 101 101 ... 104 104
    run(base(path, split={"fractions": [0.5, 0.3, 0.2]}), tmp_path / "out")
    got = {s: [r["item_id"] for r in rows_of(tmp_path / "out" / f"{s}.parquet")] for s in SPLITS}
    # nominal cuts after rows 5 and 8; row 5 shares ts 102 with row 4 (train), so it stays in train
    assert got == {"train": [10, 11, 12, 13, 14, 15], "valid": [16, 17], "test": [18, 19]}


def test_split_by_cuts_and_by_column(tmp_path):
    rows = impressions(10)
    rows[2], rows[7] = rows[7], rows[2]  # out of time order: cuts and the column take any order
    path = write_table(tmp_path / "log.csv", rows)
    run(base(path, split={"cuts": [102, 104]}), tmp_path / "cuts")
    got = {s: [r["timestamp"] for r in rows_of(tmp_path / "cuts" / f"{s}.parquet")] for s in SPLITS}
    assert got == {"train": [100, 100, 101, 101], "valid": [103, 102, 102, 103], "test": [104, 104]}
    run(base(path), tmp_path / "column")
    got = {s: [r["item_id"] for r in rows_of(tmp_path / "column" / f"{s}.parquet")] for s in SPLITS}
    assert got == {"train": [10, 11, 13, 14, 15, 12], "valid": [17, 16], "test": [18, 19]}  # input order


# ---------------------------------------------------------------------------------------------------------
# nothing left behind; the command
# ---------------------------------------------------------------------------------------------------------

def test_a_failed_import_leaves_no_partial_output(tmp_path):
    """A bad row after 3 batches were written, and an empty split: no file appears in a new folder (nor the
    folder), and the files of an earlier import stay byte for byte."""
    rows = impressions(40)
    rows[37]["clicked"] = 5
    path = write_table(tmp_path / "log.csv", rows)
    with pytest.raises(DataError, match="row 37"):
        run(base(path, batch_rows=4, split={"fractions": [0.8, 0.1, 0.1]}), tmp_path / "new")
    assert not (tmp_path / "new").exists()
    good = write_table(tmp_path / "good.csv", impressions(40))
    run(base(good), tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    with pytest.raises(DataError, match="row 37"):
        run(base(path, batch_rows=4), tmp_path / "old")
    with pytest.raises(ValueError, match="no row's 'fold' says 'test'"):
        run(base(write_table(tmp_path / "short.csv", impressions(8))), tmp_path / "old")
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before


def test_bahe_data_import_command(tmp_path, capsys):
    out = tmp_path / "out"
    assert bahe_data(["import", "--mapping", str(EXAMPLE / "mapping.toml"), "--out", str(out)]) == 0
    assert "imported 300 rows" in capsys.readouterr().err
    path = shutil.copy(EXAMPLE / "impressions.csv", tmp_path / "log.csv")
    flags = ["import", "--input", str(path), "--user-id", "user", "--item-id", "item", "--label", "clicked",
             "--timestamp", "ts", "--item-text", "device", "--dense", "price", "--categorical", "dev=device",
             "--sequence", "searched=recent_searches", "--sep", "|", "--hash-ids", "user_id", "--out",
             str(tmp_path / "flags")]
    assert bahe_data(flags) == 0
    got = rows_of(tmp_path / "flags" / "train.parquet")
    assert len(got) == 240 and got[1]["seq_searched"] == ["water filter", "cook set", "titanium mug"]
    assert got[1]["cat_dev"] == [hash_text("mobile")] and got[1]["item_text"] == "mobile"
    capsys.readouterr()
    assert bahe_data([*flags[:-1], str(tmp_path / "cuts"), "--split-cuts", "1767225600", "1767225601"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bahe-data: error: nothing written: no row has a timestamp before") and "\n" not in err
    path.write_text(path.read_text().replace("1767238522,u029,39,1", "1767238522,u029,39,maybe"))
    assert bahe_data(flags) == 2
    assert f"file {path}, row 1, field 'clicked': label must be 0 or 1" in capsys.readouterr().err
    assert bahe_data(["import", "--out", str(tmp_path / "x")]) == 2
    assert "needs --mapping TOML, or --input FILE" in capsys.readouterr().err
    assert bahe_data(["import", "--mapping", str(EXAMPLE / "mapping.toml"), "--out", str(path)]) == 2
    assert f"--out {path} is a file; import writes train/valid/test.parquet into a folder" in capsys.readouterr().err



def measure_import(n: int, folder: str) -> tuple[int, int]:
    """(peak bytes of Python objects, peak bytes of Arrow's pool) of an import of an n-row log with a list
    column and a windowed event join, 1000 rows a batch (CSV parsed 16 KiB at a time, not 1 MiB, so that a
    small log spans many blocks); run in a fresh process (Arrow's peak is per process)."""
    import tracemalloc

    from bahe.ctr_data import import_sources

    import_sources._CSV_BLOCK = 1 << 14

    folder = Path(folder)
    with open(folder / "log.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ts", "user", "item", "clicked", "title", "q"])
        writer.writerows([i, i // 5, i % 1000, i % 2, f"title {i % 3000}", "a|b|c"] for i in range(n))
    with open(folder / "events.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ts", "user", "text"])
        writer.writerows([i, i // 5, f"event {i % 500}"] for i in range(n))
    raw = {"input": {"files": [str(folder / "log.csv")]},
           "columns": {"user_id": "user", "item_id": "item", "label": "clicked", "timestamp": "ts", "item_text": "title"},
           "sequences": {"q": {"column": "q", "sep": "|"},
                         "e": {"events": [str(folder / "events.csv")], "user_id": "user", "timestamp": "ts",
                               "text": "text", "window": 100}}, "batch_rows": 1000}
    tracemalloc.start()
    run(raw, folder / "out")
    return tracemalloc.get_traced_memory()[1], pa.default_memory_pool().max_memory()


def test_memory_is_flat_in_the_file_size(tmp_path):
    """What an import holds at its peak (Python objects: converted rows, the event join's history; Arrow's
    buffers: batches read, rows waiting to be written) is the same for a log 4x as long."""
    import subprocess
    import sys

    peaks = {}
    for n in (16000, 64000):
        (tmp_path / str(n)).mkdir()
        code = f"from tests.test_importer import measure_import; print(*measure_import({n}, {str(tmp_path / str(n))!r}))"
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        peaks[n] = [int(x) for x in out.split()]
    (python_small, arrow_small), (python_large, arrow_large) = peaks[16000], peaks[64000]
    assert python_large < 1.2 * python_small and arrow_large < 1.5 * arrow_small, peaks
