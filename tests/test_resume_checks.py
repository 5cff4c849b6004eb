"""Resuming and evaluating a run folder whose checkpoint is damaged, foreign or was trained with other
model flags: `bahe-train` and `bahe-evaluate` stop with one line that names the file / flag, exit 2,
and leave the run folder as it was. A run folder records its model flags (run_config.json) and
bahe-evaluate defaults to them. DLRM-only arm on one process (gloo), a few steps."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bahe.ctr_data.synthetic import SyntheticConfig, write_synthetic
from bahe.launchers import evaluate, train
from bahe.training.run_record import RECORD
from tests.model_fixtures import TinyPipeline, split_by_time

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--arm", "dlrm", "--embedding-dim", "8", "--dense-arch", "16", "8", "--over-arch", "16", "1",
         "--table-rows", "64", "--batch-size", "16", "--log-every", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(module: str, *argv: str) -> subprocess.CompletedProcess:
    """One process (a 1-rank gloo group of its own), as a user would run it without torchrun."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    env.pop("BAHE_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", module, *map(str, argv)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(done: subprocess.CompletedProcess, command: str) -> str:
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith(f"{command}: error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume-data")
    write_synthetic(SyntheticConfig(num_users=50, num_items=30, num_samples=300, behaviours_per_sequence=3,
                                    tokens_per_behaviour=3, distinct_behaviours=10, num_topics=2), root / "s.parquet")
    return split_by_time(TinyPipeline(llm=root, data=root / "s.parquet", store=root), root / "data")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> Path:
    """A real DLRM-only run folder: 4 steps, checkpoint at step 4."""
    out = tmp_path_factory.mktemp("resume-run") / "run"
    done = cli("bahe.launchers.train", "--data-dir", data, "--out", out, "--steps", "4", *MODEL)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def test_a_run_records_its_model_flags(trained):
    record = json.loads((trained / RECORD).read_text())
    assert record["model"]["--arm"] == "dlrm" and record["model"]["--embedding-dim"] == 8
    assert record["model"]["--pooling"] is None  # ignored by the DLRM-only arm


def test_resume_with_another_model_shape_is_refused_naming_the_flags(run, data, capsys):
    before = snapshot(run)
    flags = [*MODEL[:2], "--embedding-dim", "16", "--dense-arch", "16", "16", *MODEL[7:]]
    assert train.main(["--data-dir", str(data), "--out", str(run), "--steps", "8", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--embedding-dim: run has 8, now 16" in err and "--dense-arch: run has [16, 8]" in err
    assert snapshot(run) == before


def test_resume_with_other_data_lanes_is_refused_and_a_lanes_run_trains_and_resumes(run, data, capsys, tmp_path):
    """The training order depends on --data-lanes: a resume must keep the run's value (the rows it skips are
    counted in that order); a run with lanes trains, records them and resumes with them."""
    before = snapshot(run)
    assert train.main(["--data-dir", str(data), "--out", str(run), "--steps", "8", "--data-lanes", "2", *MODEL]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--data-lanes: run has 1, now 2" in err
    assert snapshot(run) == before
    laned = tmp_path / "laned"
    done = cli("bahe.launchers.train", "--data-dir", data, "--out", laned, "--steps", "2", "--data-lanes", "4", *MODEL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((laned / RECORD).read_text())["stream"] == {"--data-lanes": 4}
    done = cli("bahe.launchers.train", "--data-dir", data, "--out", laned, "--steps", "4", "--data-lanes", "4", *MODEL)
    assert done.returncode == 0 and "resumed from checkpoint step-0000002" in done.stdout, done.stderr[-3000:]
    assert train.main(["--data-dir", str(data), "--out", str(tmp_path / "x"), "--data-lanes", "0", *MODEL]) == 2
    assert "TrainConfig.data_lanes=0" in capsys.readouterr().err


def test_a_warm_start_keeps_the_dense_statistics_its_weights_learned_on(trained, data, tmp_path):
    """A run records the z-score statistics of its dense features; a warm start on another day's data keeps
    the --init-from run's (its weights were trained on those inputs), not a refit on the new train split."""
    import pyarrow.compute as pc

    from bahe.ctr_data.parquet_io import SampleReader, SampleWriter
    from bahe.model.dense_features import DenseNormalizer

    shifted = tmp_path / "day2"
    for split in ("train", "valid", "test"):
        reader = SampleReader(data / f"{split}.parquet")
        table = reader.read_all()
        for name in reader.schema.dense_columns:  # another day: the dense features drift
            i = table.schema.get_field_index(name)
            table = table.set_column(i, name, pc.multiply(table.column(name), 3.0).cast(table.schema.field(i).type))
        with SampleWriter(shifted / f"{split}.parquet", reader.schema) as writer:
            writer.write(table)
    first = json.loads((trained / RECORD).read_text())["dense_statistics"]
    done = cli("bahe.launchers.train", "--init-from", trained, "--data-dir", shifted, "--out", tmp_path / "warm",
               "--steps", "2", *MODEL)
    assert done.returncode == 0, done.stderr[-3000:]
    warm = json.loads((tmp_path / "warm" / RECORD).read_text())
    refit = DenseNormalizer.fit(SampleReader(shifted / "train.parquet"))
    assert warm["dense_statistics"] == first and list(refit.mean) != first["mean"]
    assert warm["defaults"]["--data-dir"] == str(shifted)


def test_resume_with_another_pooling_attention_or_deep_layers_is_refused_naming_each(tmp_path, data, capsys):
    """A BAHE run folder (its record and LATEST): --pooling / --attention / --deep-layers changed would
    silently resume with weights trained for another aggregation. Refused before anything starts."""
    from bahe.training.run_record import write_record

    out = tmp_path / "bahe-run"
    text = ["--store", str(tmp_path / "store"), "--llm", str(tmp_path / "llm")]
    args = train.build_parser().parse_args(["--data-dir", str(data), "--out", str(out), *text, "--deep-layers", "2"])
    (out / "checkpoints").mkdir(parents=True)
    write_record(out, train.config_from_args(args))
    (out / "checkpoints" / "LATEST").write_text("step-0000004\n")
    before = snapshot(out)
    assert train.main(["--data-dir", str(data), "--out", str(out), *text, "--pooling", "last", "--attention",
                       "bidirectional", "--deep-layers", "1"]) == 2
    err = capsys.readouterr().err
    assert "--pooling: run has 'mean', now 'last'" in err and "--attention: run has 'causal', now 'bidirectional'" in err
    assert "--deep-layers: run has 2, now 1" in err and err.strip().count("\n") == 0
    assert snapshot(out) == before


def test_resume_of_an_unrecorded_run_with_another_shape_is_one_line(run, data):
    """An older run folder without run_config.json: DCP's size mismatch becomes one line, exit 2."""
    (run / RECORD).unlink()
    before = snapshot(run)
    flags = [*MODEL[:2], "--embedding-dim", "16", "--dense-arch", "16", "16", *MODEL[7:]]
    line = one_line_error(cli("bahe.launchers.train", "--data-dir", data, "--out", run, "--steps", "8", *flags),
                          "bahe-train")
    assert f"checkpoint {run / 'checkpoints' / 'step-0000004'} does not load into this model" in line
    assert snapshot(run) == before


@pytest.mark.parametrize("command", ["bahe-train", "bahe-evaluate"])
def test_a_truncated_shard_is_named_on_resume_and_on_evaluate(run, data, command):
    shard = sorted((run / "checkpoints" / "step-0000004").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    before = snapshot(run)
    if command == "bahe-train":
        done = cli("bahe.launchers.train", "--data-dir", data, "--out", run, "--steps", "8", *MODEL)
    else:
        done = cli("bahe.launchers.evaluate", "--checkpoint", run, "--data-dir", data)
    line = one_line_error(done, command)
    assert f"checkpoint shard {shard} is truncated or damaged" in line
    assert snapshot(run) == before and not (run / "evaluation").exists()


def test_a_resume_whose_metadata_reaches_os_system_is_refused(run, data, tmp_path):
    """The attack end to end: bahe-train resumes a run whose .metadata was re-pickled with
    STACK_GLOBAL('torch.distributed.checkpoint.metadata', 'os.system'): one line, exit 2, nothing ran."""
    from tests.test_safe_checkpoint_load import DottedGlobalPickler, RunsCode

    metadata_file = run / "checkpoints" / "step-0000004" / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())
    marker = tmp_path / "ran"
    metadata.__dict__["extra"] = RunsCode(marker)
    with open(metadata_file, "wb") as handle:
        DottedGlobalPickler(handle, protocol=4).dump(metadata)
    line = one_line_error(cli("bahe.launchers.train", "--data-dir", data, "--out", run, "--steps", "8", *MODEL),
                          "bahe-train")
    assert str(metadata_file) in line and "'os.system'" in line and not marker.exists()


def test_evaluate_defaults_to_the_recorded_model_flags(run, data):
    """No model flags given: bahe-evaluate builds the run's model from run_config.json and scores it."""
    done = cli("bahe.launchers.evaluate", "--checkpoint", run, "--data-dir", data)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run / "evaluation" / "evaluation.json").read_text())["step"] == 4


def test_evaluate_with_a_model_flag_other_than_the_run_is_refused(run, data, capsys):
    assert evaluate.main(["--checkpoint", str(run), "--data-dir", str(data), "--embedding-dim", "16",
                          "--dense-arch", "16", "16"]) == 2
    err = capsys.readouterr().err
    assert "--embedding-dim: run has 8, now 16" in err and err.strip().count("\n") == 0


@pytest.mark.parametrize("latest", ["junk text\n", "step-0000099\n", "../elsewhere\n"],
                         ids=["junk", "missing-step", "path"])
def test_evaluate_with_a_damaged_latest_is_one_line(run, data, capsys, latest):
    (run / "checkpoints" / "LATEST").write_text(latest)
    before = snapshot(run)
    assert evaluate.main(["--checkpoint", str(run), "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bahe-evaluate: error: ") and err.strip().count("\n") == 0
    assert str(run / "checkpoints" / "LATEST") in err and snapshot(run) == before


def test_train_out_naming_a_file_is_refused_and_the_file_untouched(tmp_path, data, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("my notes")
    for out in (target, target / "run"):
        assert train.main(["--data-dir", str(data), "--out", str(out), *MODEL]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"bahe-train: error: --out {out} ") and "not a run folder" in err
    assert target.read_text() == "my notes" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
