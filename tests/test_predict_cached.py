"""bahe-predict --features (serving/cached_scoring.py): rows scored from a bahe-export's cached text features
equal the full model's scores for rows that are their user's sample in the export; users the export lacks get
the features of a user without behaviours, empty and unknown titles store ids 0 and 1; an export of another
checkpoint, of a run that is not --arm bahe, or with a damaged file is refused in one line; 2 ranks equal 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bahe.ctr_data.parquet_io import SampleReader, SampleWriter
from bahe.serving.export_store import ITEMS, USERS, ExportVersion
from bahe.serving.features import last_per_user
from tests.test_export import export
from tests.test_predict import input_rows, predict, process_group
from tests.test_predict import setup as setup  # noqa: F401 -- the module's trained run (BEST: step 3, latest: 6)
from tests.torchrun import torchrun


@pytest.fixture(scope="module")
def exports(setup):  # noqa: F811
    """Two exports of the test split's users: one of the run's best checkpoint (the one bahe-predict selects),
    one of its latest."""
    _, data, run, root = setup
    best, latest = root / "export-best", root / "export-latest"
    export(run, data, best, [data / "test.parquet"])
    export(run, data, latest, [data / "test.parquet"], "--which", "latest")
    return best, latest


def strangers(path: Path, source: Path) -> Path:
    """4 rows of ``source`` whose users no export holds and who have no behaviours; titles: empty, one the
    store has not encoded, two of the data's."""
    table = SampleReader(source).read_all().slice(0, 4)
    schema = SampleReader(source).schema
    table = table.set_column(table.schema.get_field_index("user_id"), "user_id", pa.array([10**9 + i for i in range(4)]))
    titles = ["", "A title nobody  encoded", *table.column("item_text").to_pylist()[2:]]
    table = table.set_column(table.schema.get_field_index("item_text"), "item_text", pa.array(titles))
    for name in schema.sequences:
        key = f"seq_{name}"
        table = table.set_column(table.schema.get_field_index(key), key, pa.array([[]] * 4, pa.list_(pa.string())))
    with SampleWriter(path, schema) as writer:
        writer.write(table)
    return path


def newest_rows(path: Path) -> np.ndarray:
    """Rows of a sample file that are their user's newest (the export's choice: the latest timestamp, ties to
    the later row): the rows whose behaviours the export holds."""
    table = SampleReader(path).read_all()
    table = table.append_column("row", pa.array(np.arange(table.num_rows)))
    return np.sort(last_per_user(table).column("row").to_numpy())


def test_cached_scores_equal_the_full_models_for_each_users_exported_sample(setup, exports, tmp_path):  # noqa: F811
    """Full model (plain bahe-predict) vs --features on the test split plus 4 strangers: equal (1e-6) on every
    row that is its user's newest sample (the export's); the strangers (not in the export, no behaviours; an
    empty and an unknown title) equal the full model on their empty histories; the other test rows differ
    (their users' features are those of a later sample): the cache, not the model, served them."""
    _, data, run, _ = setup
    best, _ = exports
    files = [data / "test.parquet", strangers(tmp_path / "strangers.parquet", data / "test.parquet")]
    full = predict(run, files, tmp_path / "full.parquet", data_dir=data)
    meta = predict(run, files, tmp_path / "cached.parquet", "--features", str(best), data_dir=data)
    assert full["text_features"] == {"from": "model"}
    text = meta["text_features"]
    version = ExportVersion.open(best)
    assert (text["from"], text["version"], text["export"]) == ("export", "v000001", str(version.path.resolve()))
    assert text["checkpoint"] == "step-0000003" == meta["checkpoint"]
    tests = SampleReader(data / "test.parquet").num_rows
    assert (text["rows"], text["users_in_export"], text["users_not_in_export"]) == (tests + 4, tests, 4)
    assert (text["titles_empty"], text["titles_not_in_store"]) == (1, 1)
    expected, cached = pq.read_table(tmp_path / "full.parquet"), pq.read_table(tmp_path / "cached.parquet")
    assert cached.select(["user_id", "item_id", "timestamp", "label"]).equals(input_rows(*files))
    newest = newest_rows(data / "test.parquet")
    assert len(newest) > 10
    same = np.concatenate([newest, np.arange(tests, tests + 4)])
    full_scores, cached_scores = expected["score"].to_numpy(), cached["score"].to_numpy()
    np.testing.assert_allclose(cached_scores[same], full_scores[same], rtol=0, atol=1e-6)
    later = np.setdiff1d(np.arange(tests), newest)
    assert len(later) >= 3 and (np.abs(cached_scores[later] - full_scores[later]) > 1e-4).all()
    # a version folder serves as its export folder's LATEST does
    predict(run, files, tmp_path / "version.parquet", "--features", str(version.path), data_dir=data)
    assert pq.read_table(tmp_path / "version.parquet")["logit"].equals(cached["logit"])


def _refused(argv: list[str], capsys) -> str:
    from bahe.launchers.predict import main

    with process_group():
        assert main(["--quiet", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bahe-predict: error: ") and "\n" not in err, err
    return err


def test_exports_of_another_checkpoint_or_arm_or_damaged_are_refused(setup, exports, tmp_path, capsys):  # noqa: F811
    _, data, run, _ = setup
    best, latest = exports
    out = tmp_path / "out"
    out.mkdir()
    common = ["--data", data / "test.parquet", "--data-dir", data, "--out", out / "scores.parquet"]
    # another checkpoint: the export names step 6, bahe-predict selected step 3 (BEST.json)
    exported = ExportVersion.open(latest).manifest["producer"]
    err = _refused(["--run", run, "--features", latest, *common], capsys)
    assert f"was exported from {exported['run']} step-0000006 (sha256 {exported['checkpoint_sha256'][:12]}" in err
    assert f"bahe-predict selected {run / 'checkpoints' / 'step-0000003'} (best by valid auc; sha256 " in err
    # ... accepted once bahe-predict selects the export's checkpoint
    meta = predict(run, [data / "test.parquet"], out / "latest.parquet", "--features", str(latest), "--which", "latest",
                   data_dir=data)
    assert (meta["step"], meta["text_features"]["checkpoint"]) == (6, "step-0000006")
    (out / "latest.parquet").unlink()
    # a run that is not --arm bahe
    dlrm = tmp_path / "dlrm-run"
    shutil.copytree(run, dlrm)
    record = json.loads((dlrm / "run_config.json").read_text())
    record["model"]["--arm"] = "dlrm"
    (dlrm / "run_config.json").write_text(json.dumps(record))
    err = _refused(["--run", dlrm, "--features", best, *common], capsys)
    assert f"--features {best}: {dlrm} trained the dlrm arm" in err
    # a damaged file of the export, and a path that is no export
    damaged = tmp_path / "damaged"
    shutil.copytree(best, damaged)
    for name in (ITEMS, USERS):
        path = damaged / "v000001" / name
        intact = path.read_bytes()
        path.write_bytes(intact[:100] + bytes([intact[100] ^ 1]) + intact[101:])
        err = _refused(["--run", run, "--features", damaged, *common], capsys)
        assert f"{path}: checksum" in err and "does not match the manifest" in err
        path.write_bytes(intact)
    err = _refused(["--run", run, "--features", tmp_path / "nowhere", *common], capsys)
    assert f"--features {tmp_path / 'nowhere'} is not a folder" in err
    assert list(out.iterdir()) == []


DRIVER = """
import json, sys
from pathlib import Path
import torch.distributed as dist
from bahe.serving.scoring import score_files
run, data, export, out = map(Path, sys.argv[1:])
summary = score_files(run, [data / "test.parquet", out / "strangers.parquet"], out / "two.parquet", batch_size=7,
                      data_dir=data, show_progress=False, features=export)
(out / f"rank{dist.get_rank()}.json").write_text(json.dumps(summary))
from bahe.embeddings.process_group import close_process_group

close_process_group()
"""


@pytest.mark.integration
def test_two_ranks_score_from_the_cache_like_one(setup, exports, tmp_path):  # noqa: F811
    """2 ranks (torchrun), 7 rows per batch (padding) == 1 rank, row for row; the lookup counts are summed
    over ranks (padding not counted)."""
    _, data, run, _ = setup
    best, _ = exports
    files = [data / "test.parquet", strangers(tmp_path / "strangers.parquet", data / "test.parquet")]
    (tmp_path / "driver.py").write_text(DRIVER)
    torchrun(tmp_path / "driver.py", run, data, best, tmp_path)
    one = predict(run, files, tmp_path / "one.parquet", "--features", str(best), data_dir=data)
    two = json.loads(pq.read_schema(tmp_path / "two.parquet").metadata[b"bahe.predict"])
    assert two["world_size"] == 2 and two["text_features"] == one["text_features"]
    np.testing.assert_allclose(pq.read_table(tmp_path / "two.parquet")["score"].to_numpy(),
                               pq.read_table(tmp_path / "one.parquet")["score"].to_numpy(), rtol=0, atol=1e-6)
