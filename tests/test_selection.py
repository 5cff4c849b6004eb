"""Training for the data: --epochs, the best checkpoint by valid, early stopping, and evaluation of the
selected checkpoint (training/selection.py, training/loop.py, bahe-evaluate --which)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bahe.ctr_data.parquet_io import SampleReader, SampleWriter
from bahe.ctr_data.synthetic import SyntheticConfig, write_synthetic
from bahe.training.selection import Selection, epochs_to_steps, passes_warning

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--arm", "dlrm", "--batch-size", "16", "--embedding-dim", "8", "--dense-arch", "16", "8", "--over-arch",
         "16", "1", "--table-rows", "500", "--log-every", "5", "--no-shuffle"]


def test_selection_keeps_the_best_by_auc_or_logloss_and_stops_after_patience():
    by_auc = Selection("auc", patience=2)
    assert [by_auc.update(s, {"auc": a}) for s, a in ((5, 0.6), (10, 0.7), (15, 0.65), (20, 0.7))] == \
        [True, True, False, False]  # an equal value is not an improvement
    assert (by_auc.step, by_auc.value, by_auc.stopped_at) == (10, 0.7, 20)
    by_loss = Selection("logloss", patience=0)
    for step, loss in ((5, 0.7), (10, 0.6), (15, float("nan")), (20, 0.65)):
        by_loss.update(step, {"logloss": loss})
    assert (by_loss.step, by_loss.value, by_loss.stopped_at) == (10, 0.6, None)  # NaN never wins; no patience


def test_selection_state_survives_a_restart_and_a_run_keeps_its_metric(tmp_path):
    state = Selection("logloss", patience=3)
    state.update(5, {"logloss": 0.5})
    state.update(10, {"logloss": 0.6})
    state.save(tmp_path)
    again = Selection.load(tmp_path, "logloss", 3)
    assert (again.step, again.value, again.evals_since_best) == (5, 0.5, 1)
    with pytest.raises(ValueError, match="selects by logloss, not auc"):
        Selection.load(tmp_path, "auc", 3)
    (tmp_path / "BEST.json").write_text("{not json")
    with pytest.raises(ValueError, match="BEST.json is damaged"):
        Selection.load(tmp_path, "logloss", 3)


def test_epochs_and_the_many_passes_warning():
    assert epochs_to_steps(1, 1000, 16, 2) == 31 and epochs_to_steps(2.5, 1000, 16, 2) == 78
    assert epochs_to_steps(0.001, 1000, 16, 2) == 1
    assert passes_warning(31, 1000, 16, 2, eval_every=0) is None  # one pass
    assert passes_warning(33, 1000, 16, 2, eval_every=0) is None  # 1.06 passes: a few rows twice
    assert "pass 2.0 times" in passes_warning(62, 1000, 16, 2, eval_every=0)
    assert passes_warning(62, 1000, 16, 2, eval_every=10) is None  # the best checkpoint is kept


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> Path:
    """A small time-ordered MovieLens-like synthetic set: 320 train, 200 valid, 200 test rows."""
    root = tmp_path_factory.mktemp("selection")
    write_synthetic(SyntheticConfig(num_users=60, num_items=40, num_samples=720, distinct_behaviours=20,
                                    num_topics=4, seed=5), root / "all.parquet")
    reader = SampleReader(root / "all.parquet")
    table = reader.read_all()
    for name, start, stop in (("train", 0, 320), ("valid", 320, 520), ("test", 520, 720)):
        with SampleWriter(root / f"{name}.parquet", reader.schema) as writer:
            writer.write(table.slice(start, stop - start))
    return root


def _cli(module: str, *args) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def early_stopped(splits, tmp_path_factory):
    """60 steps (3 epochs) with a high learning rate, validated every 5 steps, patience 2."""
    out = tmp_path_factory.mktemp("run") / "run"
    done = _cli("bahe.launchers.train", "--data-dir", splits, "--out", out, "--steps", "60", "--eval-every", "5",
                "--patience", "2", "--dense-lr", "3e-2", "--sparse-lr", "0.3", *SMALL)
    return out, json.loads((out / "metrics.json").read_text()), done


@pytest.mark.integration
def test_the_run_ends_with_the_best_checkpoint_by_valid_auc(early_stopped):
    out, metrics, _ = early_stopped
    by_step = {h["step"]: h["auc"] for h in metrics["history"]}
    best = max(by_step, key=lambda s: (by_step[s], -s))  # the first of equal values
    assert metrics["selected_step"] == best and metrics["select_by"] == "auc"
    # the reported valid metrics are the restored best checkpoint's, not the last step's
    assert metrics["valid"]["auc"] == pytest.approx(by_step[best], abs=1e-7)
    assert json.loads((out / "checkpoints" / "BEST.json").read_text())["step"] == best
    assert (out / "checkpoints" / f"step-{best:07d}").is_dir()


@pytest.mark.integration
def test_early_stopping_stops_after_patience_evaluations_without_improvement(early_stopped):
    out, metrics, done = early_stopped
    stop = metrics["early_stopped_at"]
    assert stop is not None and stop < 60, metrics["history"]  # this lr overfits 320 rows well before 3 epochs
    after = [h["auc"] for h in metrics["history"] if h["step"] > metrics["selected_step"]]
    assert len(after) == 2 and all(a <= metrics["valid"]["auc"] for a in after)
    assert metrics["steps"] == stop and f"early stop at step {stop}" in done.stdout
    assert (out / "checkpoints" / "LATEST").read_text().strip() == f"step-{stop:07d}"


@pytest.mark.integration
def test_a_rerun_of_an_early_stopped_run_trains_no_further(early_stopped, splits):
    out, metrics, _ = early_stopped
    done = _cli("bahe.launchers.train", "--data-dir", splits, "--out", out, "--steps", "60", "--eval-every", "5",
                "--patience", "2", "--dense-lr", "3e-2", "--sparse-lr", "0.3", *SMALL)
    again = json.loads(done.stdout.strip().splitlines()[-1])
    assert again["steps_run"] == 0 and again["test"]["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-7)


@pytest.mark.integration
def test_bahe_evaluate_scores_the_best_by_default_and_the_latest_on_request(early_stopped, splits, tmp_path):
    out, metrics, _ = early_stopped
    model = ["--data-dir", splits, *SMALL]
    _cli("bahe.launchers.evaluate", "--checkpoint", out, "--out", tmp_path / "best", *model)
    best = json.loads((tmp_path / "best" / "evaluation.json").read_text())
    assert best["step"] == metrics["selected_step"] and best["which"] == "best"
    assert best["test"]["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-7)
    _cli("bahe.launchers.evaluate", "--checkpoint", out, "--out", tmp_path / "latest", "--which", "latest", *model)
    latest = json.loads((tmp_path / "latest" / "evaluation.json").read_text())
    assert latest["step"] == metrics["early_stopped_at"] != metrics["selected_step"]
    last_valid = {h["step"]: h["auc"] for h in metrics["history"]}[latest["step"]]
    assert latest["valid"]["auc"] == pytest.approx(last_valid, abs=1e-7)


@pytest.mark.integration
def test_epochs_set_the_steps_and_many_passes_without_validation_warn(splits, tmp_path):
    done = _cli("bahe.launchers.train", "--data-dir", splits, "--out", tmp_path / "one", "--epochs", "1", *SMALL)
    assert json.loads(done.stdout.strip().splitlines()[-1])["steps"] == 20  # 320 rows / 16
    assert "warning" not in done.stderr
    done = _cli("bahe.launchers.train", "--data-dir", splits, "--out", tmp_path / "three", "--epochs", "3", *SMALL)
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    assert metrics["steps"] == 60 and math.isfinite(metrics["test"]["auc"])
    assert "pass 3.0 times over the 320 training rows with no validation" in done.stderr


def test_steps_and_epochs_together_and_patience_without_validation_are_refused(splits, tmp_path, capsys):
    from bahe.launchers.train import main

    for extra, message in ((["--steps", "5", "--epochs", "1"], "give --steps or --epochs, not both"),
                           (["--patience", "2"], "patience=2 needs periodic validation"),
                           (["--epochs", "0"], "epochs=0.0: give a number of passes")):
        assert main(["--data-dir", str(splits), "--out", str(tmp_path / "x"), *SMALL, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
