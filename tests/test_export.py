"""bahe-export (serving/): a trained run's item and user text features equal the model's own, as of the
cut-off; a refresh recomputes only users whose behaviours changed and texts new to the store, copying every
other row byte for byte; another checkpoint recomputes everything; the exported predictor reproduces
bahe-predict's logits; damaged or busy export folders stop with one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from bahe.ctr_data.parquet_io import SampleReader, SampleWriter
from bahe.serving.export_store import ITEMS, USERS, ExportVersion
from bahe.training.selection import Selection
from tests.model_fixtures import make_tiny_pipeline, split_by_time
from tests.test_predict import predict, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny synthetic splits, a store from a tiny Llama, a 4-step BAHE run; BEST.json names step 2 (latest: 4)."""
    root = tmp_path_factory.mktemp("export")
    pipeline = make_tiny_pipeline(root / "pipeline", samples=400)
    data = split_by_time(pipeline, root / "data")
    run = train(root / "bahe", data, pipeline, "--steps", "4", "--eval-every", "2")
    Selection(metric="auc", step=2, value=0.5).save(run / "checkpoints")
    return pipeline, data, run, root


def export(run: Path, data: Path, out: Path, files, *extra: str, capsys=None) -> dict:
    from bahe.launchers.export import main

    code = main(["--run", str(run), "--data-dir", str(data), "--data", *map(str, files), "--out", str(out),
                 "--quiet", *extra])
    if capsys is not None:
        return {"code": code, "err": capsys.readouterr().err}
    assert code == 0
    return ExportVersion.open(out).manifest


def restored(run: Path, data: Path, **options):
    from bahe.serving.restore import restore_run

    return restore_run(run, data_dir=data, **options)


def test_a_restored_run_feeds_its_recorded_dense_statistics_not_a_refit(setup, tmp_path):
    """A warm-started run records the --init-from run's dense statistics, not its own train split's: the
    serving side must standardise with the recorded ones, as the trainer and bahe-predict do."""
    import json

    pipeline, data, run, _ = setup
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    record = json.loads((copy / "run_config.json").read_text())
    record["dense_statistics"]["mean"] = [m + 1.0 for m in record["dense_statistics"]["mean"]]
    (copy / "run_config.json").write_text(json.dumps(record))
    normalizer = restored(copy, data).normalizer
    assert list(normalizer.mean) == record["dense_statistics"]["mean"]
    assert list(normalizer.std) == record["dense_statistics"]["std"]


def test_features_are_the_models_own_for_every_store_text_and_user_as_of_the_cut_off(setup, tmp_path):
    pipeline, data, run, _ = setup
    files = [data / f"{s}.parquet" for s in ("train", "valid", "test")]
    everything = pa.concat_tables([SampleReader(f).read_all() for f in files])
    cut = int(np.sort(everything.column("timestamp").to_numpy())[300])
    manifest = export(run, data, tmp_path / "out", files, "--as-of", str(cut))
    version = ExportVersion.open(tmp_path / "out")
    assert manifest["producer"]["checkpoint"] == "step-0000002" and manifest["as_of"] == cut  # BEST, not latest
    model = restored(run, data)
    keys = model.model.text_arch.sequence_keys
    # items: every store row, keyed by store id and the store's text
    items = version.table(ITEMS)
    vocabulary = model.store.vocabulary
    assert items.column("store_id").to_pylist() == list(range(len(vocabulary)))
    assert items.column("text").to_pylist() == vocabulary.texts
    # users: each user's newest sample at or before the cut-off, the model's own numbers for it
    users = version.table(USERS)
    before = everything.filter(pc.less_equal(everything.column("timestamp"), cut))
    newest = {}
    for user, stamp in zip(before.column("user_id").to_pylist(), before.column("timestamp").to_pylist()):
        newest[user] = max(stamp, newest.get(user, stamp))
    assert users.column("user_id").to_pylist() == sorted(newest)
    assert users.column("as_of").to_pylist() == [newest[u] for u in sorted(newest)]
    rows = pa.concat_tables([before.filter(pc.and_(pc.equal(before.column("user_id"), u),
                                                   pc.equal(before.column("timestamp"), newest[u])))
                             for u in sorted(newest)])
    batch = model.batcher(rows)
    with torch.no_grad():
        text = model.model.text_arch(batch.behaviour_features)  # U x (N + 1) x D: the full model's text features
    np.testing.assert_allclose(version.user_matrix(), text[:, :len(keys)].numpy(), atol=1e-6, rtol=0)
    for key in keys:
        expected = batch.behaviour_features[key]
        column = users.column("behaviours_" + key.removeprefix("seq_"))
        assert pc.list_flatten(column).to_pylist() == expected.values().tolist()
        assert pc.list_value_length(column).to_pylist() == expected.lengths().tolist()
    store_ids = batch.behaviour_features["item_text"].values().numpy()
    np.testing.assert_allclose(version.item_matrix()[store_ids], text[:, -1].numpy(), atol=1e-6, rtol=0)


def _day_two(data: Path, out: Path) -> tuple[Path, list[int], list[int]]:
    """A later day: 3 users' newest samples again with the same behaviours (unchanged), 3 users with a new
    behaviour text and a new title (changed), all 1000 s after the last sample."""
    table = SampleReader(data / "train.parquet").read_all()
    schema = SampleReader(data / "train.parquet").schema
    users = sorted(set(table.column("user_id").to_pylist()))
    last = int(pc.max(table.column("timestamp")).as_py())
    rows = []
    for user in users[:6]:
        mine = table.filter(pc.equal(table.column("user_id"), user))
        row = mine.slice(int(np.argmax(mine.column("timestamp").to_numpy())), 1).to_pylist()[0]
        row["timestamp"] = last + 1000 + len(rows)
        if len(rows) >= 3:
            row["seq_bill"] = [*row["seq_bill"], f"Purchase at Day Two Shop {user}"]
            row["item_text"] = f"Day Two Title {user}"
        rows.append(row)
    path = out / "day2.parquet"
    with SampleWriter(path, schema) as writer:
        writer.write(pa.Table.from_pylist(rows, schema=schema.arrow_schema()))
    return path, users[:3], users[3:6]


def test_refresh_recomputes_only_changed_users_and_new_texts_and_copies_the_rest_byte_for_byte(setup, tmp_path):
    from bahe.embeddings.build import build_store
    from bahe.embeddings.encoder import EncoderConfig

    pipeline, data, run, _ = setup
    export(run, data, tmp_path / "out", [data / "train.parquet"])
    first = ExportVersion.open(tmp_path / "out")
    day2, same, changed = _day_two(data, tmp_path)
    store = tmp_path / "store"  # a refresh of the run's store: the day's new texts appended as new rows
    shutil.copytree(pipeline.store, store)
    build_store(store, [day2], EncoderConfig(model=str(pipeline.llm), k=2, device="cpu", batch_tokens=64),
                show_progress=False)
    manifest = export(run, data, tmp_path / "out", [day2], "--store", str(store))
    second = ExportVersion.open(tmp_path / "out")
    assert second.version == "v000002" and manifest["parent"] == "v000001"
    assert manifest["refresh"] == "incremental from v000001"
    old_items, new_items = first.table(ITEMS), second.table(ITEMS)
    old_rows = old_items.num_rows
    assert new_items.num_rows > old_rows  # the new texts have store rows and features
    assert manifest["items"] == {"total": new_items.num_rows, "computed": new_items.num_rows - old_rows,
                                 "kept": old_rows}
    assert first.item_matrix().tobytes() == second.item_matrix()[:old_rows].tobytes()
    assert set(new_items.column("computed_in").to_pylist()[:old_rows]) == {"v000001"}
    # users: 3 unchanged (kept, bytes identical), 3 changed (computed), the rest not in day 2 (kept)
    assert manifest["users"]["computed"] == 3 and manifest["users"]["kept_unchanged"] == 3
    assert manifest["users"]["kept_not_in_data"] == first.table(USERS).num_rows - 6
    old_users, new_users = first.table(USERS), second.table(USERS)
    assert old_users.column("user_id").to_pylist() == new_users.column("user_id").to_pylist()
    computed = dict(zip(new_users.column("user_id").to_pylist(), new_users.column("computed_in").to_pylist()))
    assert {u for u, v in computed.items() if v == "v000002"} == set(changed)
    old_features, new_features = first.user_matrix(), second.user_matrix()
    ids = new_users.column("user_id").to_numpy()
    kept = ~np.isin(ids, changed)
    assert old_features[kept].tobytes() == new_features[kept].tobytes()
    assert not np.allclose(old_features[~kept], new_features[~kept])
    # the recomputed rows are what a full export of the same data computes
    export(run, data, tmp_path / "full", [data / "train.parquet", day2], "--store", str(store))
    full = ExportVersion.open(tmp_path / "full")
    np.testing.assert_allclose(full.user_matrix(), new_features, atol=1e-6, rtol=0)
    np.testing.assert_allclose(full.item_matrix(), second.item_matrix(), atol=1e-6, rtol=0)


def test_another_checkpoint_recomputes_everything(setup, tmp_path):
    _, data, run, _ = setup
    export(run, data, tmp_path / "out", [data / "test.parquet"])
    manifest = export(run, data, tmp_path / "out", [data / "test.parquet"], "--which", "latest")
    assert manifest["producer"]["checkpoint"] == "step-0000004"
    assert manifest["refresh"] == "full: the checkpoint differs from v000001's"
    assert manifest["users"]["computed"] == manifest["users"]["total"] and manifest["items"]["kept"] == 0


def test_exported_predictor_reproduces_bahe_predict_logits_on_every_test_row(setup, tmp_path):
    import pyarrow.parquet as pq

    from bahe.serving.features import user_features
    from bahe.serving.predictor import load_predictor
    from bahe.serving.requests import FeatureCache, request_tensors

    _, data, run, _ = setup
    test = SampleReader(data / "test.parquet").read_all()
    export(run, data, tmp_path / "out", [data / "test.parquet"])
    predict(run, [data / "test.parquet"], tmp_path / "scores.parquet", data_dir=data)
    expected = torch.tensor(pq.read_table(tmp_path / "scores.parquet").column("logit").to_numpy())
    version = ExportVersion.open(tmp_path / "out")
    predictor, meta = load_predictor(version.path / "predictor.pt")
    assert meta["producer"]["checkpoint"] == "step-0000002" and meta["id_tables"] == "fp32"
    model = restored(run, data)
    cache = FeatureCache(version)
    with torch.no_grad():
        users = torch.from_numpy(user_features(model.model.text_arch, model.batcher, test))
        logits = predictor(*request_tensors(test, version.manifest), users, cache.for_rows(test)[1])
        served = predictor(*request_tensors(test, version.manifest), *cache.for_rows(test))
    assert (logits - expected).abs().max() <= 1e-5
    newest = cache.user_rows(test.column("user_id").to_numpy())  # rows that are their user's newest sample
    newest = version.table(USERS).column("as_of").to_numpy()[newest] == test.column("timestamp").to_numpy()
    assert newest.sum() > 10 and (served - expected)[torch.from_numpy(newest)].abs().max() <= 1e-5
    # a user the cache does not hold is served as the model scores a user without behaviours; an empty title and
    # one the store has not encoded as the model reads them (store ids 0 and 1)
    stranger = test.slice(0, 4).set_column(test.schema.get_field_index("user_id"), "user_id", pa.array([10**9] * 4))
    titles = ["", "A title nobody  encoded", *test.column("item_text").to_pylist()[:2]]
    stranger = stranger.set_column(stranger.schema.get_field_index("item_text"), "item_text", pa.array(titles))
    assert cache.store_ids(stranger.column("item_text")).tolist()[:2] == [0, 1]
    for key in model.model.text_arch.sequence_keys:
        stranger = stranger.set_column(stranger.schema.get_field_index(key), key, pa.array([[]] * 4, pa.list_(pa.string())))
    batch = model.batcher(stranger)
    with torch.no_grad():
        alone = model.model(batch.dense_features, batch.sparse_features, batch.behaviour_features).squeeze(-1)
        assert (cache.user_rows(stranger.column("user_id").to_numpy()) == -1).all()
        assert (predictor(*request_tensors(stranger, version.manifest), *cache.for_rows(stranger)) - alone).abs().max() <= 1e-5


def test_damaged_busy_or_empty_exports_stop_with_one_line(setup, tmp_path, capsys):
    from bahe.embeddings.folder_lock import FolderLock
    from bahe.serving.export_store import BUSY

    _, data, run, _ = setup
    out, files = tmp_path / "out", [data / "valid.parquet"]
    export(run, data, out, files)
    users = out / "v000001" / USERS
    intact = users.read_bytes()
    users.write_bytes(intact[:-9] + bytes([intact[-9] ^ 1]) + intact[-8:])
    result = export(run, data, out, files, capsys=capsys)
    assert result["code"] == 2 and f"{users}: checksum" in result["err"] and len(result["err"].splitlines()) == 1
    users.write_bytes(intact)
    manifest = out / "v000001" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"max_behaviours": 6', '"max_behaviours": 7'))
    result = export(run, data, out, files, capsys=capsys)
    assert result["code"] == 2 and "was changed after the export was written" in result["err"]
    (tmp_path / "busy").mkdir()
    with FolderLock(tmp_path / "busy", BUSY):
        result = export(run, data, tmp_path / "busy", files, capsys=capsys)
    assert result["code"] == 2 and "is being written by PID" in result["err"]
    result = export(run, data, tmp_path / "early", files, "--as-of", "5", capsys=capsys)
    assert result["code"] == 2 and "no sample at or before --as-of 5" in result["err"]
    assert not (tmp_path / "early" / "LATEST").exists()
