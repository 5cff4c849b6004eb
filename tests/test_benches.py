"""The benchmarks under bench/ still run (their quick modes): a bench that no longer starts would only be
found when someone needs its figures. Timings are not asserted here (bench/ prints measured ratios)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_dlrm_bench_quick_runs_and_bahe_matches_dlrm_numerically(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "bench.dlrm_bench", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    # exit code 1 means the two arms' logits or losses differed
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "same logits: True" in done.stdout
    assert out.is_file()


def test_quality_summary_is_mean_and_sample_std_and_the_table_judges_both_targets():
    """bench.quality_bench: the per-arm figures are the mean and sample std over seeds, and the table
    says met / NOT met against BAHE >= token-level - 0.002 and BAHE >= DLRM + 0.01."""
    import statistics

    from bench.quality_bench import run_name, summarise, table

    def run(auc):
        return {"test": {"auc": auc, "logloss": 1 - auc}, "wall_seconds": 10.0}

    runs = {"dlrm": [run(0.750), run(0.752)], "token_level": [run(0.7560), run(0.7580)], "bahe": [run(0.755), run(0.757)]}
    summary = summarise(runs, {"test": 0.743})
    assert summary["bahe"]["auc"]["mean"] == pytest.approx(0.756)
    assert summary["bahe"]["auc"]["std"] == pytest.approx(statistics.stdev([0.755, 0.757]))
    assert summary["floor"]["auc"] == 0.743
    text = table(summary, 600, [0, 1], "bf16")
    assert "bf16 autocast" in text
    assert "BAHE - token_level: -0.0010 (met, needs -0.002)" in text
    assert "BAHE - dlrm: +0.0050 (NOT met, needs +0.010)" in text
    # the DLRM arm has no LLM: one run folder serves every precision; the LLM arms keep theirs apart
    assert run_name("dlrm", 1, 600, "bf16") == run_name("dlrm", 1, 600, "auto") == "dlrm-seed1-steps600"
    assert run_name("bahe", 1, 600, "bf16") == "bahe-seed1-steps600-bf16" != run_name("bahe", 1, 600, "auto")
    assert run_name("dlrm", 0, 600, "bf16", "-m20") == "dlrm-seed0-steps600"  # no text: every M too
    assert run_name("token_level", 0, 600, "bf16", "-m20") == "token_level-seed0-steps600-m20-bf16"


def test_quality_wall_time_mean_leaves_out_a_run_resumed_from_a_checkpoint():
    """A run resumed from a checkpoint trained fewer steps in the bench's call: its wall time must not
    pull the arm's mean down, and the table says which seed resumed from where."""
    from bench.quality_bench import summarise, table

    def run(wall, resumed=0):
        return {"test": {"auc": 0.75, "logloss": 0.58}, "wall_seconds": wall, "resumed_from_step": resumed}

    summary = summarise({"token_level": [run(3600.0), run(4000.0), run(2400.0, resumed=50)],
                         "bahe": [run(100.0, resumed=300)]}, {"test": 0.743})
    assert summary["token_level"]["wall_seconds"]["values"] == [3600.0, 4000.0]
    assert summary["token_level"]["resumed_from_step"] == [0, 0, 50]
    text = table(summary, 600, [0, 1, 2], "bf16")
    assert "token_level: seed 2 resumed from its step-50 checkpoint; its wall time is left out of the mean" in text
    assert "| token_level | 0.7500 +- 0.0000 | 0.5800 +- 0.0000 | 3800 |" in text
    # every run resumed: nothing to leave out, and the table says what the figure covers
    assert summary["bahe"]["wall_seconds"]["values"] == [100.0]
    assert "bahe: seed 0 resumed from its step-300 checkpoint; the wall time counts only" in table(summary, 600, [0])


def run_folder_files(work: Path) -> dict[str, tuple[int, int, int]]:
    """Every run folder of a quality-bench work dir, and everything in it: path -> (inode, size, mtime)."""
    runs = [run for run in work.iterdir() if run.is_dir() and run.name.startswith(("dlrm-", "token_level-", "bahe-"))]
    return {str(path.relative_to(work)): (path.stat().st_ino, path.stat().st_size, path.stat().st_mtime_ns)
            for run in runs for path in [run, *run.rglob("*")]}


def test_quality_bench_reuses_a_finished_run_and_trains_an_unfinished_one(tmp_path, monkeypatch):
    """bench.quality_bench.train: a run folder with metrics.json is read back and nothing is started or
    written; one without starts the trainer once, into that folder, and records its wall time and the
    checkpoint step it resumed from."""
    import json

    import bench.quality_bench as quality
    from bahe.launchers.demo import PRESETS

    started = []

    def trainer(cmd, **_):
        started.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        (out / "metrics.json").write_text(json.dumps({"test": {"auc": 0.61, "logloss": 0.69}}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(quality.subprocess, "run", trainer)
    preset = PRESETS["cpu"]
    finished = tmp_path / "bahe-seed0-steps3"
    finished.mkdir()
    recorded = {"test": {"auc": 0.7, "logloss": 0.6}, "wall_seconds": 12.5, "resumed_from_step": 0}
    (finished / "metrics.json").write_text(json.dumps(recorded))
    before = run_folder_files(tmp_path)
    assert quality.train("bahe", 0, 3, tmp_path / "data", tmp_path / "store", finished, preset) == recorded
    assert started == [] and run_folder_files(tmp_path) == before

    unfinished = tmp_path / "bahe-seed1-steps3"
    (unfinished / "checkpoints").mkdir(parents=True)
    (unfinished / "checkpoints" / "LATEST").write_text("step-2\n")
    result = quality.train("bahe", 1, 3, tmp_path / "data", tmp_path / "store", unfinished, preset)
    assert len(started) == 1 and started[0][started[0].index("--out") + 1] == str(unfinished)
    assert started[0][started[0].index("--seed") + 1] == "1"
    assert result["test"]["auc"] == 0.61 and result["resumed_from_step"] == 2 and result["wall_seconds"] >= 0


@pytest.mark.integration
def test_quality_bench_trains_each_arm_per_seed_and_writes_json_markdown_and_plot(tmp_path):
    """A tiny real run: MovieLens-100K, the real store, 2 torchrun ranks per run, 3 steps; a second call
    reuses the finished runs: their folders, files and TensorBoard logs are left exactly as they were."""
    import json

    out, work = tmp_path / "quality.json", tmp_path / "work"
    command = [sys.executable, "-m", "bench.quality_bench", "--arms", "dlrm", "bahe", "--seeds", "0",
               "--steps", "3", "--work", str(work), "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"dlrm", "bahe"} and all(len(r) == 1 for r in report["runs"].values())
    assert all(0.0 < r["auc"] < 1.0 for runs in report["runs"].values() for r in runs)
    assert "BAHE - dlrm" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0
    trained = run_folder_files(work)
    assert {"dlrm-seed0-steps3/metrics.json", "bahe-seed0-steps3/metrics.json"} <= set(trained)
    # a second call reuses the finished runs instead of training again: nothing in a run folder is
    # re-created, rewritten or added (a retrain would rewrite metrics.json and log new event files)
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert run_folder_files(work) == trained
    assert json.loads(out.read_text())["runs"] == report["runs"]


def test_daily_summary_compares_each_period_with_its_retrain_and_judges_the_last():
    """The daily bench's per-period means, the served model (yesterday's when the guard kept today's) and
    the targets at the last period, against numbers worked out by hand."""
    from bench.daily_bench import markdown, summarize

    def cell(seed, period, daily, retrain, update_s, retrain_s, status="published", yesterday=None):
        served = {"test": {"auc": daily}} if status == "published" else {"test": {"auc": yesterday}}
        return {"seed": seed, "period": period, "day": f"slice-{period:02d}", "status": status, "served": served,
                "daily": {"test": {"auc": daily}, "update_seconds": update_s, "new_texts": 10,
                          "new_occurrence_share": 0.01},
                "retrain": {"test": {"auc": retrain}, "seconds": retrain_s}}

    cells = [{"seed": 0, "period": 0, "day": "slice-00", "status": "published", "daily": {}},
             cell(0, 1, 0.70, 0.71, 10, 100), cell(1, 1, 0.72, 0.71, 30, 100),
             cell(0, 2, 0.700, 0.701, 10, 200), cell(1, 2, 0.690, 0.701, 30, 200, "kept", yesterday=0.702)]
    summary = summarize(cells)
    first, last = summary["periods"]
    assert first["auc_difference"] == pytest.approx(0.0) and first["time_ratio"] == pytest.approx(0.2)
    assert last["auc_difference"] == pytest.approx(-0.006) and last["auc_difference_min"] == pytest.approx(-0.011)
    assert last["served_difference"] == pytest.approx((-0.001 + 0.001) / 2) and last["time_ratio"] == pytest.approx(0.1)
    assert summary["targets_met"] == {"time_ratio_at_most_0.2": True, "auc_within_0.002_or_better": False,
                                      "served_auc_within_0.002_or_better": True}
    assert "| slice-02 | 0.6950 | 0.7010 | -0.0060 (min -0.0110) | +0.0000 | 20 | 200 | 0.10 |" in markdown(summary)
    assert last["published"] == 1


def test_daily_bench_auc_and_paired_bootstrap_against_references():
    """The daily bench's rank AUC equals torchmetrics' AUROC (ties included); the paired bootstrap of an AUC
    difference is zero for a model against itself, brackets the point difference, and leans the right way for a
    model that is better on the rows."""
    from torchmetrics.functional.classification import binary_auroc

    from bench.daily_bench import paired_bootstrap, rank_auc

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 3000)
    noisy = labels + rng.normal(0, 1.5, 3000)
    tied = np.round(noisy, 1)  # many ties
    for scores in (noisy, tied):
        assert rank_auc(scores, labels) == pytest.approx(
            float(binary_auroc(torch.from_numpy(scores), torch.from_numpy(labels))), abs=1e-6)
    same = paired_bootstrap({"a": [noisy], "b": [noisy]}, labels, resamples=50)
    assert same["difference"] == 0 and same["ci90"] == [0.0, 0.0]
    better = labels + rng.normal(0, 1.0, 3000)
    result = paired_bootstrap({"a": [better, better], "b": [noisy, tied]}, labels, resamples=200)
    assert result["ci90"][0] < result["difference"] < result["ci90"][1]
    assert result["ci90"][0] > 0 and result["seeds"] == 2 and result["rows"] == 3000
