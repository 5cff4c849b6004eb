"""bahe-predict (serving/scoring.py, serving/scoring_io.py): batch scores equal the trained model's own
forward (the one bahe-evaluate runs) row for row, for every arm; 2 ranks equal 1; ids and order are kept;
the run's BEST checkpoint is used unless --which latest; bad input stops with one line and leaves nothing."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bahe.ctr_data.parquet_io import SampleReader, SampleWriter
from bahe.serving.scoring_io import PREDICT_METADATA_KEY, forward_calls, padded_batches, rank_share
from bahe.training.selection import Selection
from tests.model_fixtures import make_tiny_pipeline, split_by_time
from tests.test_write_failures import unprivileged  # noqa: F401 -- a fixture: a process without CAP_DAC_OVERRIDE
from tests.torchrun import torchrun

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--batch-size", "16", "--embedding-dim", "8", "--dense-arch", "16", "8", "--over-arch", "16", "1",
         "--table-rows", "64", "--max-behaviours", "6", "--warmup-steps", "1", "--log-every", "3", "--no-shuffle"]


@contextlib.contextmanager
def process_group():
    """A 1-rank gloo group for in-process CLI calls on a free port; environment restored, group destroyed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port)}.items():
            patch.setenv(key, value)
        for key in ("TORCHELASTIC_RESTART_COUNT", "BAHE_TRACEBACK", "LOCAL_WORLD_SIZE"):
            patch.delenv(key, raising=False)
        try:
            yield
        finally:
            from bahe.embeddings.process_group import close_process_group

            close_process_group()


def train(out: Path, data: Path, pipeline, *extra: str) -> Path:
    from bahe.launchers.train import main

    with process_group():
        assert main(["--data-dir", str(data), "--store", str(pipeline.store), "--llm", str(pipeline.llm),
                     "--out", str(out), *SMALL, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny synthetic splits (320 / 40 / 40 rows), a store from a tiny Llama, and a BAHE run of 6 steps that
    validated at steps 3 and 6; its BEST.json is set to step 3, so best and latest differ."""
    root = tmp_path_factory.mktemp("predict")
    pipeline = make_tiny_pipeline(root / "pipeline", samples=400)
    data = split_by_time(pipeline, root / "data")
    run = train(root / "bahe", data, pipeline, "--steps", "6", "--eval-every", "3")
    Selection(metric="auc", step=3, value=0.5).save(run / "checkpoints")
    return pipeline, data, run, root


def predict(run: Path, files, out: Path, *extra: str, data_dir: Path | None = None) -> dict:
    from bahe.launchers.predict import main

    argv = ["--run", str(run), "--data", *map(str, files), "--out", str(out), "--quiet", *extra]
    argv += ["--data-dir", str(data_dir)] if data_dir else []
    with process_group():
        assert main(argv) == 0
    return json.loads(pq.read_schema(out).metadata[PREDICT_METADATA_KEY])


def reference_scores(run: Path, data: Path, split: str, step: int) -> np.ndarray:
    """The trained model's scores on a split as bahe-evaluate computes them: the trainer's own build and
    restore (Checkpointer.restore with its optimiser) and evaluation batches, then sigmoid of the logits."""
    from bahe.launchers.train import build_parser, config_from_args
    from bahe.model.bahe import BAHETrain
    from bahe.model.behaviour_lookup import load_store_rows
    from bahe.model.factory import build_model
    from bahe.model.sharding import shard_model
    from bahe.training.checkpoint import Checkpointer
    from bahe.training.loop import setup_distributed
    from bahe.training.optimizers import attach_sparse_optimizer, build_optimizer
    from bahe.training.run_record import apply_record
    from bahe.training.sources import ParquetData

    args = build_parser().parse_args(["--data-dir", str(data), "--out", str(run)])
    apply_record(args, [], run)
    config = config_from_args(args)
    source = ParquetData(data)
    with process_group():
        setup_distributed("cpu")
        model, batcher, store = build_model(config.model, source.schema, device=torch.device("meta"),
                                            dense_normalizer=source.dense_normalizer())
        attach_sparse_optimizer(model, config.optim)
        dmp = shard_model(BAHETrain(model), torch.device("cpu"), batch_size=config.batch_size)
        if store is not None:
            load_store_rows(dmp, store)
        optimizer, schedulers, _ = build_optimizer(dmp, dmp.fused_optimizer, config.optim, config.steps)
        Checkpointer(run / "checkpoints").restore(dmp, optimizer, schedulers, name=f"step-{step:07d}")
        dmp.eval()
        scores = []
        with torch.no_grad():
            for batch, real in source.evaluate(split, batcher, config.batch_size, 0, 1):
                _, (_, logits, _) = dmp(batch)
                scores.append(torch.sigmoid(logits[:real]))
    return torch.cat(scores).numpy()


def input_rows(*files: Path) -> pa.Table:
    return pa.concat_tables([SampleReader(f).read_all().select(["user_id", "item_id", "timestamp", "label"])
                             for f in files])


def test_scores_are_the_trained_models_and_match_bahe_evaluate(setup, tmp_path):
    """Per row: predict's score == the trainer's restore + evaluation forward (1e-6). Per split: AUC and log
    loss of predict's output (scikit-learn) == bahe-evaluate's evaluation.json on the same checkpoint."""
    from sklearn.metrics import log_loss, roc_auc_score

    from bahe.launchers.evaluate import main as evaluate

    _, data, run, _ = setup
    meta = predict(run, [data / "test.parquet"], tmp_path / "scores.parquet", data_dir=data)
    assert (meta["checkpoint"], meta["step"], meta["which"]) == ("step-0000003", 3, "best")
    scores = pq.read_table(tmp_path / "scores.parquet")
    assert scores.select(["user_id", "item_id", "timestamp", "label"]).equals(input_rows(data / "test.parquet"))
    np.testing.assert_allclose(scores["score"].to_numpy(), reference_scores(run, data, "test", 3), rtol=0, atol=1e-6)
    with process_group():
        assert evaluate(["--checkpoint", str(run), "--data-dir", str(data), "--out", str(tmp_path / "eval")]) == 0
    evaluation = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert evaluation["step"] == 3
    labels, probabilities = scores["label"].to_numpy(), scores["score"].to_numpy().astype(np.float64)
    assert roc_auc_score(labels, probabilities) == pytest.approx(evaluation["test"]["auc"], abs=1e-6)
    assert log_loss(labels, probabilities) == pytest.approx(evaluation["test"]["logloss"], abs=1e-6)


def test_which_latest_scores_the_last_checkpoint_and_records_it(setup, tmp_path):
    _, data, run, _ = setup
    stale = tmp_path / ".latest.parquet.0badc0de.part-00001"  # what a killed job into the same --out left
    stale.write_bytes(b"")
    meta = predict(run, [data / "test.parquet"], tmp_path / "latest.parquet", "--which", "latest", data_dir=data)
    assert not stale.exists()
    assert (meta["checkpoint"], meta["step"], meta["which"]) == ("step-0000006", 6, "latest")
    latest = pq.read_table(tmp_path / "latest.parquet")["score"].to_numpy()
    np.testing.assert_allclose(latest, reference_scores(run, data, "test", 6), rtol=0, atol=1e-6)
    assert np.abs(latest - reference_scores(run, data, "test", 3)).max() > 1e-4  # best (step 3) is another model


@pytest.mark.parametrize("arm", ["dlrm", "token_level"])
def test_the_other_arms_score_like_their_trained_model(setup, tmp_path, arm):
    pipeline, data, _, _ = setup
    extra = ["--max-user-tokens", "48"] if arm == "token_level" else []
    run = train(tmp_path / arm, data, pipeline, "--arm", arm, "--steps", "3", *extra)
    meta = predict(run, [data / "valid.parquet"], tmp_path / "scores.parquet", data_dir=data)
    assert (meta["arm"], meta["step"], meta["chosen"]) == (arm, 3, "best: the run made no selection on valid "
                                                                    "(no BEST.json), so its latest")
    scores = pq.read_table(tmp_path / "scores.parquet")
    assert scores.select(["user_id", "item_id", "timestamp", "label"]).equals(input_rows(data / "valid.parquet"))
    np.testing.assert_allclose(scores["score"].to_numpy(), reference_scores(run, data, "valid", 3), rtol=0, atol=1e-6)


DRIVER = """
import json, sys
from pathlib import Path
import torch.distributed as dist
from bahe.serving.scoring import score_files
run, data, out = map(Path, sys.argv[1:])
summary = score_files(run, [data / "test.parquet", out / "empty.parquet", data / "valid.parquet"], out / "two.parquet",
                      batch_size=7, data_dir=data, show_progress=False)
try:
    score_files(run, [out / "bad.parquet"], out / "bad-scores.parquet", batch_size=7, data_dir=data, show_progress=False)
    error = None
except ValueError as err:
    error = str(err)
(out / f"rank{dist.get_rank()}.json").write_text(json.dumps({"summary": summary, "error": error}))
from bahe.embeddings.process_group import close_process_group

close_process_group()
"""


def write_like(path: Path, source: Path, rows: int | None = None, **columns) -> Path:
    """A sample file with ``source``'s schema: its first ``rows`` rows, ``columns`` replaced."""
    table = SampleReader(source).read_all()
    table = table.slice(0, rows) if rows is not None else table
    for name, values in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, table.schema.field(name).type))
    with SampleWriter(path, SampleReader(source).schema) as writer:
        writer.write(table)
    return path


@pytest.mark.integration
def test_two_ranks_score_like_one_and_fail_together_leaving_nothing(setup, tmp_path):
    """2 ranks (torchrun), 3 files (one empty), 7 rows per batch (shares end mid-batch: padding) == 1 rank with
    the run's batch size, row for row. A negative id in rank 1's share stops both ranks with the same line
    naming the file, row and field, and no part or partial file is left."""
    _, data, run, _ = setup
    write_like(tmp_path / "empty.parquet", data / "test.parquet", rows=0)
    user_ids = SampleReader(data / "test.parquet").read_all()["user_id"].to_pylist()
    write_like(tmp_path / "bad.parquet", data / "test.parquet", user_id=user_ids[:30] + [-5] + user_ids[31:])
    (tmp_path / "driver.py").write_text(DRIVER)
    torchrun(tmp_path / "driver.py", run, data, tmp_path)
    files = [data / "test.parquet", tmp_path / "empty.parquet", data / "valid.parquet"]
    predict(run, files, tmp_path / "one.parquet", data_dir=data)
    two, one = pq.read_table(tmp_path / "two.parquet"), pq.read_table(tmp_path / "one.parquet")
    assert two.num_rows == 80 and two.select(["user_id", "item_id", "timestamp", "label"]).equals(input_rows(*files))
    np.testing.assert_allclose(two["score"].to_numpy(), one["score"].to_numpy(), rtol=0, atol=1e-6)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["summary"]["world_size"] == 2 and results[0]["summary"]["step"] == 3
    assert "row 30, field 'user_id': ids must be >= 0" in results[1]["error"]
    assert results[0]["error"] == "rank 1: " + results[1]["error"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert not (tmp_path / "bad-scores.parquet").exists()


def test_shares_are_contiguous_and_every_rank_runs_the_same_forward_calls():
    """Ranks split N rows into contiguous shares covering each row once; a rank whose share ran out (or
    never began: 3 rows, 4 ranks) still runs every forward call, on padding (real rows 0)."""
    for total, world in ((80, 2), (3, 4), (0, 2), (17, 3)):
        shares = [rank_share(total, r, world) for r in range(world)]
        assert shares[0][0] == 0 and shares[-1][1] == total and all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    table = pa.table({"x": list(range(10))})
    filler = table.slice(0, 1)
    assert forward_calls(10, 2, 4) == 2 and forward_calls(11, 2, 4) == 2 and forward_calls(17, 2, 4) == 3
    batches = list(padded_batches(iter([table.slice(0, 3), table.slice(3, 2)]), 4, 3, filler))  # a 5-row share
    assert [(t["x"].to_pylist(), real) for t, real in batches] == [([0, 1, 2, 3], 4), ([4, 4, 4, 4], 1),
                                                                    ([0, 0, 0, 0], 0)]
    assert forward_calls(3, 4, 8) == 1 and [r for _, r in padded_batches(iter([]), 8, 1, filler)] == [0]


def test_bad_inputs_stop_with_one_line_and_leave_nothing(setup, tmp_path, capsys, monkeypatch):
    """Each bad input exits 2 with one line naming what is wrong; --out's folder is left as it was (an older
    score file there intact, no part or partial file), also when a bad row is found after parts were written."""
    from bahe.ctr_data.schema import SampleSchema
    from bahe.launchers.predict import main
    from bahe.serving import scoring_io

    pipeline, data, run, root = setup
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "scores.parquet").write_bytes(b"older scores")
    test = data / "test.parquet"
    schema = SampleReader(test).schema
    fewer = SampleSchema(schema.categorical, schema.dense, schema.sequences[1:], schema.dataset)
    with SampleWriter(tmp_path / "fewer.parquet", fewer) as writer:
        writer.write(SampleReader(test).read_all().drop_columns([f"seq_{schema.sequences[0]}"]))
    retyped = SampleReader(test).read_all()
    index = retyped.schema.get_field_index("item_id")
    retyped = retyped.set_column(index, "item_id", retyped["item_id"].cast(pa.string()))
    pq.write_table(retyped.replace_schema_metadata(schema.arrow_schema().metadata), tmp_path / "retyped.parquet")
    user_ids = SampleReader(test).read_all()["user_id"].to_pylist()
    negative = write_like(tmp_path / "negative.parquet", test, user_id=user_ids[:35] + [-1] + user_ids[36:])
    empty_run = tmp_path / "no-checkpoint"
    (empty_run / "checkpoints").mkdir(parents=True)
    older_run = tmp_path / "older-run"  # recorded before runs kept their training data folder
    shutil.copytree(run, older_run)
    record = json.loads((older_run / "run_config.json").read_text())
    del record["defaults"]["--data-dir"]
    (older_run / "run_config.json").write_text(json.dumps(record))
    (tmp_path / "a-file").write_text("")
    cases = [
        ([test, tmp_path / "missing.parquet"], run, {}, "file " + str(tmp_path / "missing.parquet")
         + ": no such sample file"),
        ([tmp_path / "fewer.parquet"], run, {}, f"field 'seq_{schema.sequences[0]}': missing column"),
        ([tmp_path / "retyped.parquet"], run, {}, "field 'item_id': found type string, expected int64"),
        ([negative], run, {}, f"file {negative}, row 35, field 'user_id': ids must be >= 0"),
        ([test], empty_run, {}, "holds no checkpoint (no checkpoints/LATEST)"),
        ([test], older_run, {"--data-dir": None}, "pass --data-dir: the folder of the train.parquet"),
        ([test], run, {"--data-dir": tmp_path}, f"{tmp_path / 'train.parquet'} is missing"),
        ([test], run, {"--out": tmp_path / "nowhere" / "s.parquet"}, f"its folder {tmp_path / 'nowhere'} does not"),
        ([test], run, {"--out": tmp_path / "a-file" / "s.parquet"}, f"{tmp_path / 'a-file'} is not a folder"),
        ([test], run, {"--out": out_dir}, "is a folder: name the score file"),
    ]
    monkeypatch.setattr(scoring_io, "ROW_GROUP_ROWS", 8)  # parts are on disk before the bad row is read
    for files, which_run, flags, message in cases:
        flags = {"--data-dir": data, "--out": out_dir / "scores.parquet", **flags}
        argv = ["--run", str(which_run), "--data", *map(str, files), "--quiet", "--batch-size", "8"]
        argv += [str(x) for flag, value in flags.items() if value is not None for x in (flag, value)]
        with process_group():
            assert main(argv) == 2, message
        err = capsys.readouterr().err.strip()
        assert err.startswith("bahe-predict: error: ") and message in err and "\n" not in err, (message, err)
        assert sorted(p.name for p in out_dir.iterdir()) == ["scores.parquet"], message
        assert (out_dir / "scores.parquet").read_bytes() == b"older scores"


def test_predict_component_and_profile_render_the_command(tmp_path):
    from bahe.launchers import components
    from bahe.launchers.profiles import COMPONENTS, get_profile, render

    app = components.predict("--batch-size", "256", run="/runs/bahe", data=["/d/a.parquet", "/d/b.parquet"],
                             out="/scores/a.parquet", data_dir="/data/ml", which="latest", j="2x4")
    role = app.roles[0]
    assert role.name == "predict" and role.num_replicas == 2
    command = role.args[1]
    assert "-m bahe.launchers.predict --run-dir /runs/bahe --data /d/a.parquet /d/b.parquet --out /scores/a.parquet " \
           "--which latest --data-dir /data/ml --quiet --batch-size 256" in command
    assert COMPONENTS["predict"] is components.predict
    app, _ = render(get_profile("local"), "predict", ["--run", "r", "--data", "a.parquet", "--out", "s.parquet"],
                    {"log_dir": str(tmp_path)})
    assert "--nproc_per_node 2" in app.roles[0].args[1]
    with pytest.raises(ValueError, match="which must be best or latest"):
        components.predict(run="r", data=["a"], out="s", which="last")


@pytest.mark.integration
def test_an_unwritable_out_folder_is_refused_before_scoring(setup, tmp_path, unprivileged):  # noqa: F811
    """A real EACCES (a chmod 0o500 folder; root without its capabilities): one line naming the folder."""
    _, data, run, _ = setup
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        done = subprocess.run([*unprivileged, sys.executable, "-m", "bahe.launchers.predict", "--run", str(run),
                               "--data", str(data / "test.parquet"), "--data-dir", str(data), "--out",
                               str(folder / "scores.parquet")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        folder.chmod(0o700)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"cannot write into {folder} (Permission denied)" in done.stderr and list(folder.iterdir()) == []
