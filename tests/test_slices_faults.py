"""`bahe-data slices` on hostile timestamps (issue 27, bug 6 and the millisecond weak spot).

* One outlier timestamp (2**62, INT64_MAX) made the period list grow until memory ran out. The number of
  periods is now bounded from the span before anything is allocated: one line naming the file, the row,
  the span, and --period; nothing written. The CLI runs under an address-space limit here, so a
  regression fails (MemoryError) instead of eating the machine.
* Millisecond timestamps with --period 1d made periods of 86.4 s, nearly all of one row: 0 train rows
  each, exit 0, no word. Such a slicing is refused (exit 2, the unit the timestamps look like and
  --timestamp-unit ms), and --timestamp-unit ms slices them into days.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from bahe.ctr_data.cli import main as data_main
from bahe.ctr_data.parquet_io import SampleReader, SampleWriter
from bahe.ctr_data.schema import DataError
from bahe.ctr_data.synthetic import SyntheticConfig, write_synthetic
from bahe.ctr_data.time_slices import MAX_PERIODS, SliceConfig, write_time_slices

ROOT = Path(__file__).resolve().parents[1]
INT64_MAX = 2**63 - 1
MEMORY_LIMIT = 1 << 30  # 1 GiB of address space: python + pyarrow need ~0.3; the old loop hit it in seconds


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    path = tmp_path_factory.mktemp("slices-faults") / "samples.parquet"
    write_synthetic(SyntheticConfig(num_samples=300, num_users=30, num_items=20, seed=3), path)
    return path


def with_timestamps(source: Path, out: Path, timestamps: np.ndarray) -> Path:
    """A copy of the sample file ``source`` with these timestamps (one per row, in row order)."""
    reader = SampleReader(source)
    table = reader.read_all()
    table = table.set_column(table.schema.get_field_index("timestamp"), "timestamp",
                             pa.array(np.asarray(timestamps, dtype=np.int64)))
    writer = SampleWriter(out, reader.schema)
    writer.write(table)
    writer.close()
    return out


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def bahe_data_limited(*argv: str) -> subprocess.CompletedProcess:
    """`bahe-data ARGV` in a child process that cannot map more than MEMORY_LIMIT bytes (and 120 s)."""
    return subprocess.run([sys.executable, "-m", "bahe.ctr_data.cli", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, preexec_fn=_limited)


@pytest.mark.parametrize("outlier", [2**62, INT64_MAX], ids=["2**62", "INT64_MAX"])
def test_one_outlier_timestamp_is_refused_by_row_before_anything_is_allocated(samples, tmp_path, outlier):
    timestamps = SampleReader(samples).read_all().column("timestamp").to_numpy().copy()
    timestamps[137] = outlier
    bad = with_timestamps(samples, tmp_path / "outlier.parquet", timestamps)
    done = bahe_data_limited("slices", "--out", str(tmp_path / "days"), str(bad))
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip()
    assert "\n" not in line and "MemoryError" not in line and "Traceback" not in line
    assert line.startswith(f"bahe-data: error: file {bad}, row 137: timestamp {outlier} lies ")
    assert "periods of --period 7d" in line and f"at most {MAX_PERIODS:,} periods" in line
    assert "fix or drop that row, or give a longer --period" in line
    assert not (tmp_path / "days").exists()


def test_the_outlier_is_named_in_the_second_file_by_its_own_row(samples, tmp_path):
    timestamps = SampleReader(samples).read_all().column("timestamp").to_numpy().copy()
    first = with_timestamps(samples, tmp_path / "a.parquet", timestamps)
    timestamps[5] = 2**62
    second = with_timestamps(samples, tmp_path / "b.parquet", timestamps)
    done = bahe_data_limited("slices", "--out", str(tmp_path / "days"), "--period", "1d", str(first), str(second))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith(f"bahe-data: error: file {second}, row 5: timestamp {2**62} lies "), done.stderr
    assert not (tmp_path / "days").exists()


def test_timestamps_at_the_int64_limit_slice_without_overflow(samples, tmp_path):
    """A legitimate data set whose periods end beyond INT64_MAX: every row still lands in its period."""
    timestamps = INT64_MAX - 6000 + 20 * np.arange(300)  # the last row 20 units below the limit
    timestamps[-1] = INT64_MAX
    near = with_timestamps(samples, tmp_path / "near.parquet", timestamps)
    summary = write_time_slices([near], tmp_path / "days", SliceConfig(period_s=1000, warmup=0.5))
    rows = sum(summary["rows"][name]["train"] + summary["rows"][name]["valid"] for name in summary["slices"])
    last_test = summary["rows"][summary["slices"][-1]]["test"]
    assert rows + last_test == 300 and summary["periods"][-1]["end"] > INT64_MAX


def _millisecond_days(samples: Path, out: Path, days: int = 20) -> Path:
    """``days`` days of 15 rows each, one an hour, timestamps in milliseconds since 1970 (from 2023-11-14)."""
    day, hour = np.divmod(np.arange(300), 15)
    return with_timestamps(samples, out, 1_700_000_000_000 + day * 86_400_000 + hour * 3_600_000)


def test_millisecond_timestamps_cut_by_days_are_refused_naming_the_unit(samples, tmp_path):
    ms = _millisecond_days(samples, tmp_path / "ms.parquet")
    done = bahe_data_limited("slices", "--out", str(tmp_path / "days"), "--period", "1d", "--warmup", "0.3", str(ms))
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip()
    assert "\n" not in line and line.startswith("bahe-data: error: ")
    assert "slice(s) of --period 1d (86,400 timestamp units) would have no train rows" in line
    assert "the timestamps look like ms since 1970" in line and "2023-11-" in line
    assert "give --timestamp-unit ms" in line and f"from file {ms}, row " in line
    assert not (tmp_path / "days").exists()


def test_timestamp_unit_ms_slices_millisecond_timestamps_into_days(samples, tmp_path):
    ms = _millisecond_days(samples, tmp_path / "ms.parquet")
    out = tmp_path / "days"
    assert data_main(["slices", "--out", str(out), "--period", "1d", "--timestamp-unit", "ms", "--warmup", "0.7",
                      str(ms)]) == 0
    summary = json.loads((out / "slices.json").read_text())
    assert summary["config"]["timestamp_unit"] == "ms" and summary["config"]["period_s"] == 86400
    assert len(summary["slices"]) == 6  # the warm-up (14 days) and 6 days, each tested on the next
    for name in summary["slices"][1:]:
        assert summary["rows"][name]["train"] + summary["rows"][name]["valid"] == 15  # one day each
        assert summary["rows"][name]["train"] > 0
    periods = summary["periods"]
    assert all(p["end"] - p["start"] == 86_400_000 for p in periods[1:])


def test_a_period_of_one_row_in_the_right_unit_is_refused_with_a_longer_period_advised(samples, tmp_path):
    """Seconds, periods of 400 s, and one lonely row 1000 s from the rows before and after it: its period
    holds only that row (its valid split), so its slice cannot train."""
    timestamps = SampleReader(samples).read_all().column("timestamp").to_numpy().copy()
    timestamps[150:] += 1000
    timestamps[151:] += 1000
    lonely = with_timestamps(samples, tmp_path / "lonely.parquet", timestamps)
    with pytest.raises(DataError, match="1 of [0-9]+ slice\\(s\\) of --period 400s .* would have no train rows") as err:
        write_time_slices([lonely], tmp_path / "days", SliceConfig(period_s=400, warmup=0.3))
    assert f"holds 1 row(s), from file {lonely}, row 150," in str(err.value)
    assert "give a longer --period" in str(err.value)
    assert "--timestamp-unit" not in str(err.value)
    assert not (tmp_path / "days").exists()


def test_the_unit_is_validated(samples, tmp_path, capsys):
    with pytest.raises(ValueError, match="timestamp_unit='min'"):
        SliceConfig(timestamp_unit="min")
    with pytest.raises(SystemExit):
        data_main(["slices", "--out", str(tmp_path / "d"), "--timestamp-unit", "min", str(samples)])
    assert "invalid choice: 'min'" in capsys.readouterr().err
