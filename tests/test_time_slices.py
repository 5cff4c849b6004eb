"""`bahe-data slices`: consecutive periods of time-ordered samples, each row exactly where its timestamp says."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bahe.ctr_data.cli import main as data_main
from bahe.ctr_data.parquet_io import SampleReader
from bahe.ctr_data.synthetic import SyntheticConfig, write_synthetic
from bahe.ctr_data.time_slices import SliceConfig, parse_period, write_time_slices


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    path = tmp_path_factory.mktemp("slices") / "samples.parquet"
    write_synthetic(SyntheticConfig(num_samples=600, num_users=50, num_items=30, seed=3), path)
    return path


def _timestamps(path):
    return SampleReader(path).read_all().column("timestamp").to_numpy()


def test_every_row_lands_in_its_period_and_upto_holds_everything_before_the_days_valid_rows(samples, tmp_path):
    summary = write_time_slices([samples], tmp_path, SliceConfig(period_s=400, warmup=0.5, valid_fraction=0.2))
    all_ts = np.sort(_timestamps(samples))
    periods = summary["periods"]
    assert periods[0]["start"] == all_ts[0] and len(summary["slices"]) == len(periods) - 1 >= 3
    seen_train_valid = []
    for p, name in enumerate(summary["slices"]):
        period, following = periods[p], periods[p + 1]
        train, valid, test = (_timestamps(tmp_path / name / f"{s}.parquet") for s in ("train", "valid", "test"))
        assert train.min() >= period["start"] and train.max() < period["valid_from"] <= valid.min()
        assert valid.max() < period["end"] <= following["start"] <= test.min() and test.max() < following["end"]
        # the valid rows are about the last 20% of the period (ties at the cut stay together)
        assert 0.1 <= len(valid) / (len(train) + len(valid)) <= 0.35
        expected_test = all_ts[(all_ts >= following["start"]) & (all_ts < following["end"])]
        np.testing.assert_array_equal(np.sort(test), expected_test)
        seen_train_valid += [train, valid]
        upto = _timestamps(tmp_path / name.replace("slice", "upto") / "train.parquet")
        np.testing.assert_array_equal(np.sort(upto), all_ts[all_ts < period["valid_from"]])
    # the periods' train and valid rows partition every row before the last period, each row once
    np.testing.assert_array_equal(np.sort(np.concatenate(seen_train_valid)), all_ts[all_ts < periods[-1]["start"]])
    assert json.loads((tmp_path / "slices.json").read_text())["rows"] == summary["rows"]


def test_max_slices_keeps_the_first_periods(samples, tmp_path):
    summary = write_time_slices([samples], tmp_path, SliceConfig(period_s=400, warmup=0.5, max_slices=2))
    assert summary["slices"] == ["slice-00", "slice-01", "slice-02"]


def test_the_cli_writes_slices_and_refuses_bad_settings(samples, tmp_path, capsys):
    assert data_main(["slices", "--out", str(tmp_path / "days"), "--period", "400s", "--warmup", "0.6",
                      str(samples)]) == 0
    assert (tmp_path / "days" / "slice-01" / "test.parquet").is_file()
    assert data_main(["slices", "--out", str(tmp_path / "x"), "--period", "soon", str(samples)]) == 2
    assert "--period 'soon': give a length like 7d" in capsys.readouterr().err
    assert data_main(["slices", "--out", str(tmp_path / "long"), "--period", "1000d", str(samples)]) == 0
    assert json.loads((tmp_path / "long" / "slices.json").read_text())["slices"] == ["slice-00"]  # warm-up + the rest
    assert data_main(["slices", "--out", str(tmp_path / "x"), "--warmup", "1.5", str(samples)]) == 2
    assert "SliceConfig.warmup=1.5" in capsys.readouterr().err
    assert not (tmp_path / "x" / "slice-00").exists()


def test_parse_period():
    assert (parse_period("7d"), parse_period("12h"), parse_period("90m"), parse_period("30")) == (604800, 43200, 5400, 30)
    with pytest.raises(ValueError, match="positive length"):
        parse_period("0d")
