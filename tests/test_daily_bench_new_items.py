"""The daily bench's new-item report (bench/daily_bench.py, item 6 of issue 31): which test rows hold an item no
earlier training row has, and the per-period summary and table of update / retrain / DLRM-only on them."""

from __future__ import annotations

import numpy as np
import pytest

from bahe.training.segments import segment_entry
from bench.daily_bench import new_item_markdown, new_item_rows, new_item_summary, rank_auc


def test_new_item_rows_are_those_whose_item_no_earlier_training_row_has():
    earlier = np.array([5, 7, 7, 9, 11])
    items = np.array([5, 6, 7, 8, 6, 11, 12, 9])
    assert new_item_rows(items, earlier).tolist() == [False, True, False, True, True, False, True, False]
    assert new_item_rows(items, np.array([], dtype=np.int64)).all()  # nothing trained yet: every row new
    assert not new_item_rows(np.array([], dtype=np.int64), earlier).size


def cell(seed: int, period: int, scores: dict, labels: np.ndarray, items: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    new = {m: segment_entry(s, labels, bootstrap=50, confidence=0.9, rng=rng) for m, s in scores.items()}
    return {"seed": seed, "period": period, "day": f"slice-{period:02d}", "retrain": {},
            "new_items": {"rows": len(labels), "share": 0.25, "items": items, "positives": int(labels.sum()), **new},
            "_new_scores": {**scores, "labels": labels}}


def test_the_summary_averages_the_seeds_and_bootstraps_the_differences_pairwise():
    rng = np.random.default_rng(0)
    labels = (rng.random(400) < 0.4).astype(np.int64)
    signal = labels + rng.normal(0, 1.0, 400)
    cells = [{"seed": 0, "period": 0, "day": "slice-00"}]  # the warm-up: no new-item report
    for seed in (0, 1):
        noise = np.random.default_rng(seed + 10).normal(0, 0.5, 400)
        scores = {"daily": 1 / (1 + np.exp(-(signal + noise))), "retrain": 1 / (1 + np.exp(-(signal + 2 * noise))),
                  "dlrm": np.full(400, 0.4) + 0.01 * noise}
        cells.append(cell(seed, 1, scores, labels))
    [row] = new_item_summary(cells)
    assert (row["day"], row["seeds"], row["rows"], row["positives"]) == ("slice-01", 2, 400, int(labels.sum()))
    for m in ("daily", "retrain", "dlrm"):
        expected = np.mean([rank_auc(c["_new_scores"][m], labels) for c in cells[1:]])
        assert row[f"{m}_auc"] == pytest.approx(expected, abs=1e-9)
        low, high = row[f"{m}_auc_interval"]
        assert low <= row[f"{m}_auc"] <= high
    d = row["daily_minus_retrain"]
    assert d["difference"] == pytest.approx(row["daily_auc"] - row["retrain_auc"], abs=1e-9)
    assert d["ci90"][0] <= d["difference"] <= d["ci90"][1] and d["seeds"] == 2
    assert row["daily_minus_dlrm"]["difference"] > 0.2  # text-free scores that are mostly noise
    table = new_item_markdown([row])
    assert "| slice-01 | 400 (3, 25.0%) | " in table and f"{row['daily_auc']:.4f} [" in table


def test_a_period_without_both_classes_among_its_new_items_reports_no_auc():
    labels = np.ones(5, dtype=np.int64)
    scores = {m: np.linspace(0.1, 0.9, 5) for m in ("daily", "retrain", "dlrm")}
    [row] = new_item_summary([cell(0, 1, scores, labels)])
    assert row["daily_auc"] is None and "daily_minus_retrain" not in row
    assert "| - | - | - | - | - |" in new_item_markdown([row])
