"""The trainer on 2 gloo ranks (torchrun): runs to completion with evaluation and checkpoints,
writes the TensorBoard tags, and a run stopped mid-way resumes to the same result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.model_fixtures import make_tiny_pipeline, split_by_time
from tests.torchrun import torchrun

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    pipeline = make_tiny_pipeline(root / "pipeline", samples=2400, hidden=64, num_topics=2, num_users=12_000,
                                  topic_affinity=0.8)
    return pipeline, split_by_time(pipeline, root / "data"), root


def train(pipeline, data: Path, out: Path, *extra: str, ranks: int = 2, restarts: int = 0,
          env: dict | None = None) -> dict:
    done = torchrun("-m", "bahe.launchers.train", "--data-dir", str(data), "--store", str(pipeline.store), "--llm", str(pipeline.llm),
           "--out", str(out), "--batch-size", str(64 // ranks), "--embedding-dim", "16", "--dense-arch", "32", "16",
           "--over-arch", "32", "1", "--table-rows", "1000", "--max-behaviours", "6", "--dense-lr", "5e-3",
           "--llm-lr", "1e-3", "--warmup-steps", "5", "--log-every", "5",
           # file order: the generator's order of this small set leaves the early loss plateau within 40
           # steps (test AUC 0.89), shuffled runs by about 120 (docs/decisions.md, "Shuffled vs file-order";
           # tests/test_training_shuffled.py trains the default shuffled path)
           "--no-shuffle", *extra, ranks=ranks, restarts=restarts, env=env)
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "_log": done.stdout + done.stderr}


def assert_same_metrics(result: dict, expected: dict, keys: tuple[str, ...], *, tol: float) -> None:
    """Every ``keys`` metric of valid and test equals the expected run's within ``tol``."""
    for split in ("valid", "test"):
        for key in keys:
            assert result[split][key] == pytest.approx(expected[split][key], abs=tol), (split, key)


def assert_resumed_from(result: dict, step: int, *, steps: int) -> None:
    """The run really resumed: it says so, restored the checkpoint's step and data position, and trained
    only the steps after it (the same metrics alone cannot tell: this seeded, unshuffled run trained again
    from step 0 would end the same)."""
    assert result["resumed_from_step"] == step and result["steps_run"] == steps - step, result
    assert f"resumed from checkpoint step-{step:07d}" in result["_log"]
    assert f"{step * 64:,} training rows already seen" in result["_log"]  # 64 rows per step, any world size


@pytest.fixture(scope="module")
def full_run(setup):
    pipeline, data, root = setup
    out = root / "full"
    return train(pipeline, data, out, "--steps", "40", "--eval-every", "20", "--checkpoint-every", "20"), out


def test_a_rank_killed_mid_run_is_restarted_and_resumes_from_the_last_checkpoint(setup, full_run):
    """Rank 1 SIGKILLs itself after step 30 (checkpoints at 20 and 40); torchrun --max_restarts 1 restarts
    both ranks, which resume from step 20. The final metrics equal the uninterrupted run's within 1e-6
    (the resume test's tolerance: same arithmetic, same order), and the step-20 checkpoint stayed
    loadable throughout (the kill never leaves LATEST naming a half-written one)."""
    pipeline, data, root = setup
    out = root / "killed"
    result = train(pipeline, data, out, "--steps", "40", "--eval-every", "20", "--checkpoint-every", "20",
                   restarts=1, env={"BAHE_FAULT_KILL_RANK_AT_STEP": "1:30"})
    assert "rank 1 kills itself with SIGKILL at step 30" in result["_log"]
    assert_resumed_from(result, 20, steps=40)
    expected, _ = full_run
    assert_same_metrics(result, expected, ("auc", "ne", "logloss", "calibration"), tol=1e-6)
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "step-0000040"


def test_a_rank_killed_while_saving_a_checkpoint_resumes_from_the_previous_one(setup, full_run):
    """Rank 0 is SIGKILLed after writing its shards of the step-40 checkpoint but before publishing it:
    the half-made checkpoint is never LATEST, the restart resumes from step 20 and ends where the
    uninterrupted run ended (1e-6), with step 40 then published."""
    pipeline, data, root = setup
    out = root / "killed-saving"
    result = train(pipeline, data, out, "--steps", "40", "--eval-every", "20", "--checkpoint-every", "20",
                   restarts=1, env={"BAHE_FAULT_KILL_RANK_AT_STEP": "0:40:checkpoint"})
    assert "rank 0 kills itself with SIGKILL at checkpoint 40" in result["_log"]
    assert_resumed_from(result, 20, steps=40)
    expected, _ = full_run
    assert_same_metrics(result, expected, ("auc", "logloss"), tol=1e-6)
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "step-0000040"
    assert not list((out / "checkpoints").glob(".partial-*"))


def test_two_rank_run_completes_and_learns_the_text_signal(full_run):
    result, out = full_run
    assert result["steps"] == 40
    assert result["test"]["samples"] == 240  # every test row scored once
    # Learned, so with a measured margin (2026-12-06, this data and flags, --seed 0 / 1 / 2: test AUC 0.890 /
    # 0.684 / 0.882; a run that stays on the early plateau longer ends near 0.68; torchrun gives each of the 2
    # ranks 1 thread, with or without xdist, so thread counts do not vary). 0.6 is 0.084 below the lowest and
    # about 3 standard errors above chance on 240 rows; the DLRM-only arm reaches about 0.57 on such data.
    assert result["test"]["auc"] > 0.6, result["test"]
    assert 0.5 < result["test"]["calibration"] < 2.0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and [h["step"] for h in metrics["history"]] == [20, 40]  # the last step too
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "step-0000040"


def test_tensorboard_has_the_promised_tags(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = full_run
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/ne", "eval/auc", "eval/ne", "eval/logloss", "eval/calibration", "test/auc",
                "perf/samples_per_s", "perf/step_time_ms", "perf/data_wait_ms", "perf/peak_memory_mb",
                "lr/dense", "lr/llm", "data/rows", "data/unknown_behaviours", "data/dropped_behaviours"):
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("train/loss")] == list(range(5, 41, 5))
    assert [e.step for e in events.Scalars("eval/auc")] == [20, 40]
    assert all(e.value > 0 for e in events.Scalars("perf/samples_per_s"))
    lrs = [e.value for e in events.Scalars("lr/llm")]
    assert lrs[0] > lrs[-1]  # warm-up done by step 5, then decay
    train_loss = [e.value for e in events.Scalars("train/loss")]
    assert train_loss[-1] < train_loss[0]


def test_a_stopped_run_resumes_to_the_same_result(setup, full_run):
    """Stop after step 20 (a checkpoint), rerun: the data position, model, optimiser and schedule state
    all resume, so the result matches the uninterrupted run. Tolerance 1e-6: the same arithmetic in
    the same order on the same machine, only float32 summation order in gloo all-reduce could differ."""
    pipeline, data, root = setup
    out = root / "stopped"
    first = train(pipeline, data, out, "--steps", "40", "--eval-every", "20", "--stop-at", "20")
    assert {k: v for k, v in first.items() if k != "_log"} == {"steps": 20, "stopped_at": 20,
                                                               "resumed_from_step": 0, "steps_run": 20,
                                                               "initialized_from": None}
    resumed = train(pipeline, data, out, "--steps", "40", "--eval-every", "20")
    assert_resumed_from(resumed, 20, steps=40)
    expected, _ = full_run
    assert_same_metrics(resumed, expected, ("auc", "ne", "logloss", "calibration"), tol=1e-6)


def test_a_run_stopped_on_two_ranks_resumes_on_one(setup, full_run):
    """Stopped after step 20 on 2 ranks (32 rows each), resumed on 1 rank (64 rows): DCP reshards the
    tables and the optimiser state, the data position is a row count, so the second half sees the same
    rows in the same 64-row steps. Tolerance 2e-3 on the metrics: a 64-row batch on one rank and two
    32-row halves all-reduced sum the same gradients in another float order, and 20 Adam steps carry
    those last-bit differences into the weights."""
    pipeline, data, root = setup
    out = root / "rescaled"
    first = train(pipeline, data, out, "--steps", "40", "--eval-every", "20", "--stop-at", "20")
    assert first["stopped_at"] == 20 and first["steps_run"] == 20
    resumed = train(pipeline, data, out, "--steps", "40", "--eval-every", "20", ranks=1)
    assert_resumed_from(resumed, 20, steps=40)
    expected, _ = full_run
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 1
    assert_same_metrics(resumed, expected, ("auc", "logloss"), tol=2e-3)


@pytest.mark.parametrize("ranks", [2, 1])
def test_evaluate_rescores_the_latest_checkpoint(setup, full_run, tmp_path, ranks):
    """bahe-evaluate restores the final checkpoint and reproduces the run's own final metrics, on the
    world size that wrote it and on another one (DCP reshards the tables on load)."""
    pipeline, data, _ = setup
    expected, run = full_run
    torchrun("-m", "bahe.launchers.evaluate", "--checkpoint", str(run), "--out", str(tmp_path), "--data-dir", str(data),
           "--store", str(pipeline.store), "--llm", str(pipeline.llm), "--embedding-dim", "16", "--dense-arch", "32",
           "16", "--over-arch", "32", "1", "--table-rows", "1000", "--max-behaviours", "6", "--batch-size", "32",
             ranks=ranks)
    result = json.loads((tmp_path / "evaluation.json").read_text())
    assert result["step"] == expected["selected_step"]  # the best checkpoint by valid (of steps 20 and 40)
    assert result["test"]["auc"] == pytest.approx(expected["test"]["auc"], abs=1e-6)
    assert result["test"]["logloss"] == pytest.approx(expected["test"]["logloss"], abs=1e-5)
