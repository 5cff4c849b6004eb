"""bench/segment_quality_bench.py: each arm's cell is chosen on VALID, gaps are seed-paired with a t-interval,
the page judges the item-cold targets, the floor is scored per segment, and a never-seen item's dense values
come from the data."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from bench.segment_quality_bench import (
    SEGMENTS,
    arm_lever,
    cell_label,
    floor_segments,
    gap,
    never_seen_values,
    page,
    select,
    summarise,
)


def runs(valid: float, test: dict[str, float], n: int = 3, step: float = 0.001) -> list[dict]:
    """n seed runs whose AUCs move by ``step`` per seed."""
    out = []
    for i in range(n):
        shifted = {k: v + i * step for k, v in test.items()}
        out.append({"valid": {**shifted, "all": valid + i * step}, "test": shifted,
                    "test_half_width": dict.fromkeys(test, 0.01), "test_rows": dict.fromkeys(test, 100)})
    return out


def result() -> dict:
    test = {"all": 0.70, "cold": 0.65, "tail": 0.70, "torso": 0.72, "head": 0.68}
    better_test = {k: v + 0.05 for k, v in test.items()}  # the cell that looks best on TEST ...
    return {"cells": {
        "dropout 0, M 5": {"dlrm": runs(0.70, test), "bahe": runs(0.71, {**test, "cold": 0.68})},
        "dropout 0.3, M 5": {"dlrm": runs(0.69, better_test), "bahe": runs(0.72, {**test, "cold": 0.70, "all": 0.715})},
    }, "floor": {"chosen": "item", "valid": {"all": 0.6}, "test": {**dict.fromkeys(SEGMENTS, 0.6), "all": 0.6}}}


def test_each_arm_takes_the_cell_best_on_valid_never_on_test():
    chosen = select(result(), ["dlrm", "bahe"])
    assert chosen == {"dlrm": "dropout 0, M 5", "bahe": "dropout 0.3, M 5"}  # ... is not chosen for dlrm


def test_the_gap_is_seed_paired_with_a_t_interval():
    a = [{"all": 0.72}, {"all": 0.74}, {"all": 0.73}]
    b = [{"all": 0.70}, {"all": 0.71}, {"all": 0.70}]
    g = gap(a, b, "all")
    pairs = [0.02, 0.03, 0.03]
    half = 2.920 * statistics.stdev(pairs) / 3 ** 0.5
    assert g["mean"] == pytest.approx(np.mean(pairs))
    assert g["interval"] == pytest.approx([np.mean(pairs) - half, np.mean(pairs) + half])
    assert gap([{"cold": None}], [{"cold": 0.6}], "cold") is None  # an undefined AUC makes no pair


def test_the_summary_and_page_judge_the_item_cold_targets():
    r = result()
    r["summary"] = summarise(r, ["dlrm", "bahe"])
    g = r["summary"]["bahe_minus_dlrm"]
    assert g["cold"]["mean"] == pytest.approx(0.05) and g["all"]["mean"] == pytest.approx(0.015)
    text = page({"splits": {"item_cold": r}})
    assert "* cold: +0.0500" in text and "target >= +0.02: met" in text
    assert "* tail: +0.0000" in text and "NOT met, short by 0.0100" in text
    assert "bahe (chosen on valid) | dropout 0.3, M 5" in text and "floor (item, chosen on valid)" in text


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    from bahe.ctr_data.movielens import MovieLensConfig, write_movielens

    root = tmp_path_factory.mktemp("segment-quality")
    for protocol in ("time", "item_cold"):
        write_movielens(MovieLensConfig(max_history=2, protocol=protocol, seed=0), root / protocol)
    return root


def test_a_never_seen_items_dense_values_come_from_the_data(splits):
    """The time split smooths a new item's prior toward 0.5; the item-cold split toward the running global rate."""
    assert never_seen_values(splits / "time") == ["dense_item_history=0", "dense_item_prior_positive_rate=0.5000"]
    prior = float(never_seen_values(splits / "item_cold")[1].split("=")[1])
    assert 0.5 < prior < 0.7


def test_the_floor_is_scored_per_segment_with_the_candidate_chosen_on_valid(splits):
    from bahe.training.baselines import non_learned_baseline

    floor = floor_segments(splits / "item_cold")
    whole = non_learned_baseline(splits / "item_cold")
    assert floor["chosen"] == whole["chosen"]
    assert floor["test"]["all"]["auc"] == pytest.approx(whole["test"], abs=1e-4)  # torchmetrics in float32
    cold = floor["test"]["item_popularity"]["cold"]
    assert cold["rows"] > 5000 and 0.5 < cold["auc"] < 1.0  # the held-out items' rows


def test_the_plots_data_set_must_be_made_first_and_the_message_says_how(tmp_path):
    """movielens-plots needs --accept-terms, so the bench never makes it: it names the command to run."""
    from bench.segment_quality_bench import plots_paths

    with pytest.raises(SystemExit, match="bahe-data movielens-plots --accept-terms --max-history 5 --split item_cold"):
        plots_paths(tmp_path, "item_cold", {"max_history": 5, "k": 8})


def test_the_user_aggregation_cell_changes_the_bahe_arm_alone():
    """target_attention is BAHE's lever: its runs get their own folders and the bahe-train flag; the DLRM and
    token-level arms read no behaviour vectors that way, so they share the pooled cell's runs. The default
    cell's label and folders are the ones earlier reports were written with."""
    assert arm_lever("bahe", "target_attention") == ("-tattn", ("--user-aggregation", "target_attention"))
    assert arm_lever("bahe", "pooled") == ("", ())
    assert arm_lever("dlrm", "target_attention") == ("", ()) and arm_lever("token_level", "target_attention") == ("", ())
    assert cell_label(0.3, 5) == "dropout 0.3, M 5" == cell_label(0.3, 5, "pooled")
    assert cell_label(0.3, 5, "target_attention") == "dropout 0.3, M 5, target attention"
