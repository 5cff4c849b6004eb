"""Issue 27: a serving export with bad contents that still "verifies" (its checksums and digest recomputed) is
refused when it is opened, in one line naming the file and the first bad row, by every reader (bahe-predict
--features, a bahe-export refresh, ExportVersion.open): non-finite features, user ids unsorted or duplicated,
items short or out of order, shapes that disagree with the manifest. A scoring run never writes a NaN or
infinite score with exit 0. A refresh reuses the parent's predictor only as the parent's manifest signed it.

One real export of a tiny real run is built per module; each case corrupts a copy of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bahe.embeddings.store import MANIFEST_DIGEST, file_sha256, manifest_digest
from bahe.serving.export_store import ITEMS, MANIFEST, USERS, ExportError, ExportVersion, fixed_lists
from tests.test_export import export
from tests.test_predict import process_group
from tests.test_predict import setup as setup  # noqa: F401 -- the module's trained run (BEST: step 3, latest: 6)


@pytest.fixture(scope="module")
def exported(setup):  # noqa: F811
    """One export of the test split's users, from the checkpoint bahe-predict selects."""
    _, data, run, root = setup
    out = root / "export-faults"
    export(run, data, out, [data / "test.parquet"])
    return out


def corrupt(source: Path, target: Path, *, items=None, users=None, manifest=None) -> Path:
    """A copy of the export ``source`` whose items / users tables and manifest are changed by the given functions,
    with every checksum and the manifest's digest recomputed, so that the files "verify"."""
    shutil.copytree(source, target)
    version = target / "v000001"
    body = json.loads((version / MANIFEST).read_text())
    for name, change in ((ITEMS, items), (USERS, users)):
        if change is not None:
            pq.write_table(change(pq.read_table(version / name)), version / name)
            body["files"][name] = {"sha256": file_sha256(version / name), "bytes": (version / name).stat().st_size}
    if manifest is not None:
        manifest(body)
    body[MANIFEST_DIGEST] = manifest_digest(body)
    (version / MANIFEST).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    return target


def with_column(table: pa.Table, name: str, column) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, column)


def set_features(table: pa.Table, name: str, row: int, value: float) -> pa.Table:
    """``table`` with every float of row ``row`` of the fixed-size list column ``name`` set to ``value``."""
    column = table.column(name).combine_chunks()
    values = column.flatten().to_numpy().reshape(table.num_rows, -1).copy()
    values[row] = value
    return with_column(table, name, fixed_lists(values))


def take(table: pa.Table, rows) -> pa.Table:
    return table.take(pa.array(np.asarray(rows, dtype=np.int64)))


def refused(argv: list, capsys) -> str:
    """bahe-predict exits 2 with one line; returns it."""
    from bahe.launchers.predict import main

    with process_group():
        assert main(["--quiet", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bahe-predict: error: ") and "\n" not in err, err
    return err


def predict_from(setup, features: Path, out: Path, capsys) -> str:  # noqa: F811
    _, data, run, _ = setup
    out.mkdir()
    err = refused(["--run", run, "--data", data / "test.parquet", "--data-dir", data, "--out", out / "s.parquet",
                   "--features", features], capsys)
    assert list(out.iterdir()) == []  # nothing written beside --out either
    return err


@pytest.mark.parametrize("table,value", [(ITEMS, float("nan")), (USERS, float("inf")), (USERS, float("nan"))])
def test_non_finite_features_are_refused_at_load_naming_the_file_and_row(setup, exported, tmp_path, capsys,  # noqa: F811
                                                                         table, value):
    """Before this change: every row scored NaN and bahe-predict exited 0."""
    column, key = ("feature", "store_id") if table == ITEMS else ("features", "user_id")
    ids = pq.read_table(exported / "v000001" / table).column(key).to_pylist()
    bad = corrupt(exported, tmp_path / "bad", **{table.split(".")[0]: lambda t: set_features(t, column, 5, value)})
    path = bad / "v000001" / table
    err = predict_from(setup, bad, tmp_path / "out", capsys)
    assert f"{path}: row 5 ({key} {ids[5]}): {column} holds {value}, not a finite number" in err
    with pytest.raises(ExportError, match="not a finite number"):
        ExportVersion.open(bad)


def test_a_refresh_of_an_export_with_non_finite_features_is_refused_and_writes_nothing(setup, exported, tmp_path,  # noqa: F811
                                                                                     capsys):
    _, data, run, _ = setup
    bad = corrupt(exported, tmp_path / "bad", users=lambda t: set_features(t, "features", 0, float("nan")))
    result = export(run, data, bad, [data / "test.parquet"], capsys=capsys)
    assert result["code"] == 2 and len(result["err"].strip().splitlines()) == 1
    assert f"{bad / 'v000001' / USERS}: row 0 (user_id " in result["err"] and "not a finite number" in result["err"]
    assert sorted(p.name for p in bad.iterdir() if not p.name.startswith(".")) == ["LATEST", "v000001"]


def test_a_scoring_run_never_writes_a_non_finite_score(setup, exported, tmp_path, capsys):  # noqa: F811
    """Finite but huge features (1e30: they pass the load checks) overflow the interaction: the logits of that
    user's rows are not finite. bahe-predict stops naming the input file and the first such row, exit 2, and
    writes nothing (before this change: NaN scores, exit 0)."""
    _, data, run, _ = setup
    users = pq.read_table(exported / "v000001" / USERS).column("user_id").to_pylist()
    test = pq.read_table(data / "test.parquet").column("user_id").to_pylist()
    victim = users[3]
    bad = corrupt(exported, tmp_path / "bad", users=lambda t: set_features(t, "features", 3, 1e30))
    ExportVersion.open(bad)  # finite: the export itself loads
    err = predict_from(setup, bad, tmp_path / "out", capsys)
    assert f"file {data / 'test.parquet'}, row {test.index(victim)}: the model's logit is " in err
    assert "not a finite number" in err and "nothing is written" in err


def test_unsorted_or_duplicate_user_ids_and_short_or_unordered_items_are_refused_naming_the_file(  # noqa: F811
        setup, exported, tmp_path, capsys):
    """Before this change each served wrong features with exit 0 (users are found by binary search, items by
    row = store id)."""
    users = pq.read_table(exported / "v000001" / USERS)
    items = pq.read_table(exported / "v000001" / ITEMS)
    ids = users.column("user_id").to_pylist()
    count, n = users.num_rows, items.num_rows
    cases = {
        "unsorted": ({"users": lambda t: take(t, [1, 0, *range(2, count)])}, USERS,
                     f"row 1: user_id {ids[0]} is after {ids[1]} (user ids must be sorted and unique"),
        "duplicate": ({"users": lambda t: take(t, [0, 0, *range(2, count)])}, USERS,
                      f"row 1: user_id {ids[0]} is a duplicate of the row before"),
        "short-items": ({"items": lambda t: t.slice(0, n - 1)}, ITEMS,
                        f"has {n - 1:,} rows, the manifest {n:,} (one per store row): the file is short or long"),
        "short-items-recounted": ({"items": lambda t: t.slice(0, n - 1),
                                   "manifest": lambda m: m["items"].update(total=n - 1)}, MANIFEST,
                                  f"items.total is {n - 1}, expected the store's rows ({n:,})"),
        "items-swapped": ({"items": lambda t: take(t, [0, 1, 3, 2, *range(4, n)])}, ITEMS,
                          "row 2: store_id 3, expected 2 (store ids must run 0, 1, 2, ..."),
        "short-users": ({"users": lambda t: t.slice(0, count - 1)}, USERS,
                        f"has {count - 1:,} rows, the manifest {count:,}"),
    }
    for name, (changes, file, message) in cases.items():
        bad = corrupt(exported, tmp_path / name, **changes)
        err = predict_from(setup, bad, tmp_path / f"out-{name}", capsys)
        assert f"{bad / 'v000001' / file}" in err and message in err, (name, err)


def test_shapes_that_disagree_with_the_manifest_are_one_line_naming_the_file(setup, exported, tmp_path,  # noqa: F811
                                                                             capsys):
    """Before this change: a reshape ValueError naming no file, or a torch traceback (per rank)."""
    manifest = json.loads((exported / "v000001" / MANIFEST).read_text())
    d, n = manifest["embedding_dim"], len(manifest["sequence_keys"])

    def as_lists(table: pa.Table) -> pa.Table:  # the same floats as variable-length lists
        column = table.column("feature").combine_chunks()
        return with_column(table, "feature", pa.ListArray.from_arrays(
            pa.array(np.arange(0, (table.num_rows + 1) * d, d, dtype=np.int32)), column.flatten()))

    cases = {
        "dim": ({"manifest": lambda m: m.update(embedding_dim=d + 1, empty_user_features=[0.0] * (n * (d + 1)))}, ITEMS,
                f"column 'feature' is fixed_size_list<element: float>[{d}], expected fixed_size_list<float>[{d + 1}]"),
        "lists": ({"items": as_lists}, ITEMS, "column 'feature' is list<"),
        "narrow-users": ({"users": lambda t: with_column(t, "features", fixed_lists(
            t.column("features").combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1)[:, :-1]))}, USERS,
            f"column 'features' is fixed_size_list<element: float>[{n * d - 1}]"),
        "empty-user": ({"manifest": lambda m: m.update(empty_user_features=m["empty_user_features"][:-1])}, MANIFEST,
                       f"empty_user_features is '{n * d - 1} numbers', expected N x D = {n} x {d}"),
        "table-rows": ({"manifest": lambda m: m.update(table_rows=m["table_rows"][:-1])}, MANIFEST,
                       "table_rows is ["),
        "sequence": ({"manifest": lambda m: m.update(sequence_keys=[*m["sequence_keys"], "seq_more"])}, MANIFEST,
                     "empty_user_features is"),
        "dim-text": ({"manifest": lambda m: m.update(embedding_dim="8")}, MANIFEST,
                     "embedding_dim is '8', expected an integer in [1, 16,384]"),
        "files": ({"manifest": lambda m: m["files"].update({"../v000001/items.parquet": m["files"][ITEMS]})}, MANIFEST,
                  "files is '../v000001/items.parquet', expected plain file names"),
    }
    for name, (changes, file, message) in cases.items():
        bad = corrupt(exported, tmp_path / name, **changes)
        err = predict_from(setup, bad, tmp_path / f"out-{name}", capsys)
        assert f"{bad / 'v000001' / file}" in err and message in err, (name, err)


def test_a_refresh_reuses_the_parent_predictor_only_as_its_manifest_signed_it(setup, exported, tmp_path, capsys,  # noqa: F811
                                                                             monkeypatch):
    """A refresh of the same checkpoint copies the parent's predictor.pt into the new version and signs it again.
    (a) predictor.pt replaced while the refresh computes (after the parent was opened): refused naming the file,
    before this change its bytes were read again and signed into v000002. (b) a predictor of another checkpoint
    put in with the manifest re-digested: refused, it does not carry the checkpoint's metadata. Nothing is
    written; LATEST stays v000001."""
    import bahe.serving.export as export_module

    _, data, run, root = setup
    folder = tmp_path / "swap"
    shutil.copytree(exported, folder)
    predictor = folder / "v000001" / "predictor.pt"
    computed = export_module._users

    def users_then_swap(*args, **kwargs):  # the refresh's user features are computed: the file is swapped now
        predictor.write_bytes(predictor.read_bytes() + b"planted")
        return computed(*args, **kwargs)

    monkeypatch.setattr(export_module, "_users", users_then_swap)
    result = export(run, data, folder, [data / "test.parquet"], capsys=capsys)
    assert result["code"] == 2 and len(result["err"].strip().splitlines()) == 1, result
    assert f"{predictor}: checksum" in result["err"] and "does not match the manifest's" in result["err"]
    assert (folder / "LATEST").read_text().strip() == "v000001" and not (folder / "v000002").exists()
    monkeypatch.setattr(export_module, "_users", computed)
    # (b) the predictor of the run's latest checkpoint, signed into the manifest of an export of its best
    other = root / "export-faults-latest"
    if not other.exists():
        export(run, data, other, [data / "test.parquet"], "--which", "latest")
    foreign = (other / "v000001" / "predictor.pt").read_bytes()

    def plant(body: dict) -> None:
        (tmp_path / "foreign" / "v000001" / "predictor.pt").write_bytes(foreign)
        body["files"]["predictor.pt"] = {"sha256": file_sha256(tmp_path / "foreign" / "v000001" / "predictor.pt"),
                                         "bytes": len(foreign)}

    bad = corrupt(exported, tmp_path / "foreign", manifest=plant)
    ExportVersion.open(bad)  # it verifies
    result = export(run, data, bad, [data / "test.parquet"], capsys=capsys)
    assert result["code"] == 2 and len(result["err"].strip().splitlines()) == 1, result
    assert f"{bad / 'v000001' / 'predictor.pt'} does not carry the metadata of the checkpoint its manifest" in \
        result["err"]
    assert not (bad / "v000002").exists()
    # the same refresh of an intact export reuses the predictor byte for byte
    good = tmp_path / "good"
    shutil.copytree(exported, good)
    manifest = export(run, data, good, [data / "test.parquet"])
    assert manifest["version"] == "v000002" and manifest["refresh"] == "incremental from v000001"
    assert (good / "v000002" / "predictor.pt").read_bytes() == (good / "v000001" / "predictor.pt").read_bytes()
