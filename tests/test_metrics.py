"""CtrMetrics (AUC, NE, log loss, calibration) against scikit-learn and the metrics' definitions: on
one process with many updates and tied scores, and through the trainer's ``evaluate`` on 1 and 2 ranks
with a padded last batch (the padding must never reach the metrics)."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from bahe.ctr_data.parquet_io import SampleReader, SampleWriter
from bahe.ctr_data.synthetic import SyntheticConfig, write_synthetic
from bahe.training.metrics import CtrMetrics
from tests.torchrun import ROOT, torchrun


def reference_metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """scikit-learn's AUC and log loss (natural log); NE = log loss / entropy of the positive rate;
    calibration = sum of predictions / sum of labels."""
    rate = labels.mean()
    entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    loss = log_loss(labels, probabilities, labels=[0, 1])
    return {"auc": roc_auc_score(labels, probabilities), "logloss": loss, "ne": loss / entropy,
            "calibration": probabilities.sum() / labels.sum(), "samples": len(labels)}


def assert_matches(found: dict, expected: dict) -> None:
    assert found["samples"] == expected["samples"]
    for key in ("auc", "logloss", "ne", "calibration"):
        assert found[key] == pytest.approx(expected[key], abs=1e-6), key


def test_single_process_metrics_equal_scikit_learn_over_many_updates_with_tied_scores():
    generator = np.random.default_rng(7)
    labels = (generator.random(1000) < 0.3).astype(np.float32)
    # rounded scores: many ties, which AUC must count as half
    probabilities = np.clip(np.round(0.3 + 0.25 * (labels - 0.3) + generator.normal(0, 0.2, 1000), 1), 0.05, 0.95)
    metrics = CtrMetrics(torch.device("cpu"))
    for start in range(0, 1000, 137):
        metrics.update(torch.tensor(probabilities[start:start + 137]), torch.tensor(labels[start:start + 137]))
    assert_matches(metrics.compute(), reference_metrics(probabilities.astype(np.float64), labels))


def test_metrics_move_when_the_predictions_do():
    """The comparison above is not vacuous: swapping two predictions of different labels changes AUC."""
    labels = np.array([0, 1, 0, 1, 1, 0], dtype=np.float32)
    probabilities = np.array([0.1, 0.8, 0.3, 0.6, 0.9, 0.2], dtype=np.float32)
    metrics, swapped = CtrMetrics(torch.device("cpu")), CtrMetrics(torch.device("cpu"))
    metrics.update(torch.tensor(probabilities), torch.tensor(labels))
    swapped.update(torch.tensor(probabilities[[1, 0, 2, 3, 4, 5]]), torch.tensor(labels))
    assert metrics.compute()["auc"] == 1.0
    assert swapped.compute()["auc"] == pytest.approx(roc_auc_score(labels, probabilities[[1, 0, 2, 3, 4, 5]]))
    assert swapped.compute()["auc"] < 1.0


@pytest.fixture(scope="module")
def odd_sized_splits(tmp_path_factory):
    """train 90 rows, valid 203 rows (not a multiple of any global batch below), test 7 rows."""
    root = tmp_path_factory.mktemp("metrics-data")
    write_synthetic(SyntheticConfig(num_users=50, num_items=30, num_samples=300, distinct_behaviours=20,
                                    num_topics=4, seed=3), root / "all.parquet")
    reader = SampleReader(root / "all.parquet")
    table = reader.read_all()
    for name, start, stop in (("train", 0, 90), ("valid", 90, 293), ("test", 293, 300)):
        with SampleWriter(root / f"{name}.parquet", reader.schema) as writer:
            writer.write(table.slice(start, stop - start))
    assert isinstance(table, pa.Table)
    return root


@pytest.mark.integration
@pytest.mark.parametrize("ranks", [1, 2])
def test_evaluate_on_ranks_with_a_padded_last_batch_equals_scikit_learn_on_the_whole_split(
        odd_sized_splits, tmp_path, ranks):
    torchrun(ROOT / "tests" / "dist" / "metrics_worker.py", odd_sized_splits, tmp_path, 16, ranks=ranks)
    result = json.loads((tmp_path / f"metrics-{ranks}.json").read_text())
    reference = result["reference"]
    probabilities, labels = np.array(reference["probabilities"]), np.array(reference["labels"])
    assert len(labels) == 203  # every valid row once: no padding row, none lost
    assert_matches(result["evaluate"], reference_metrics(probabilities, labels))
