"""Cut time-ordered sample files into consecutive periods: the days (or weeks) of a daily update loop.

Every row goes by its ``timestamp``. The rows before ``warmup`` (a fraction of all rows) form the
warm-up period; after it come periods of ``period_s`` seconds. For each period ``p`` that has a next
one, ``OUT/slice-PP/`` holds what that day's update sees::

    train.parquet   the period's rows before its last ``valid_fraction`` (by time)
    valid.parquet   the period's last rows: the day's held-out rows (model selection, the regression guard)
    test.parquet    the NEXT period's rows: how the model does on the day it serves

and ``OUT/upto-PP/`` the same valid and test with ``train`` = every row before the period's valid rows
(what a from-scratch retrain on all data so far trains on). ``OUT/slices.json`` records the cuts and
the row counts. Periods with no rows are skipped, so ``slice-01`` is the first period after the warm-up
that has rows.

The period is counted in the timestamps' unit (``timestamp_unit``: seconds by default; ``ms``, ``us`` and
``ns`` scale it). Two mistakes are refused before anything is written, each in one line that says what
to change: timestamps that span more than ``MAX_PERIODS`` periods after the warm-up cut (one outlier such
as 2**62 would otherwise make billions of empty periods: the line names the file and row of the farthest
timestamp, the span, and suggests ``--period``), and a slice whose train split would be empty (a period
holding a single row, or timestamps in another unit than the period's: milliseconds cut by ``--period 1d``
give periods of 86.4 s, nearly all of one row; the line counts them and names the unit the timestamps look
like). Nothing is written then: a day without training rows cannot be trained, and a slicing that is mostly
such days is a unit mistake, not data.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bahe.ctr_data.parquet_io import SampleReader, SampleWriter, publish_together
from bahe.ctr_data.schema import DataError

SPLITS = ("train", "valid", "test")
# At most this many periods after the warm-up cut, counted from the timestamps' span before anything is
# allocated: 100,000 hours are 11 years. Beyond it the span is an outlier or a unit mistake, not data.
MAX_PERIODS = 100_000
TIMESTAMP_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}  # units per second
INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class SliceConfig:
    """How sample files become periods.

    Args:
        period_s: length of one period in seconds (86400: days; 604800: weeks).
        warmup: fraction of all rows (by time) in the warm-up period, in (0, 1).
        valid_fraction: share of each period's rows (its last, by time) held out as its valid split.
        max_slices: keep at most this many periods after the warm-up (the LAST ones kept are the
            earliest; None: all).
        timestamp_unit: what one timestamp unit is: s (default), ms, us or ns.
    """

    @property
    def period(self) -> int:
        """One period in timestamp units."""
        return self.period_s * TIMESTAMP_UNITS[self.timestamp_unit]

    period_s: int = 7 * 86400
    warmup: float = 0.5
    valid_fraction: float = 0.1
    max_slices: int | None = None
    timestamp_unit: str = "s"

    def __post_init__(self) -> None:
        if self.period_s < 1:
            raise ValueError(f"SliceConfig.period_s must be >= 1 second, got {self.period_s}")
        if self.timestamp_unit not in TIMESTAMP_UNITS:
            raise ValueError(f"SliceConfig.timestamp_unit={self.timestamp_unit!r}: give one of "
                             f"{', '.join(TIMESTAMP_UNITS)}")
        if not 0 < self.warmup < 1:
            raise ValueError(f"SliceConfig.warmup={self.warmup}: give the warm-up's share of the rows in (0, 1)")
        if not 0 < self.valid_fraction < 1:
            raise ValueError(f"SliceConfig.valid_fraction={self.valid_fraction}: give a share in (0, 1)")
        if self.max_slices is not None and self.max_slices < 1:
            raise ValueError(f"SliceConfig.max_slices={self.max_slices}: give >= 1, or leave it out for all")


def parse_period(text: str) -> int:
    """'7d', '12h', '3600s' or '3600' -> seconds."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"--period {text!r}: give a length like 7d, 12h or 3600s") from None
    if not math.isfinite(value) or value * units[unit] < 1:
        raise ValueError(f"--period {text!r}: give a positive length like 7d, 12h or 3600s")
    return int(value * units[unit])


@dataclass(frozen=True)
class _Timestamps:
    values: np.ndarray  # every row's timestamp, the files concatenated in order
    files: list[Path]
    offsets: np.ndarray  # offsets[i]: the index of files[i]'s first row in values

    def where(self, index: int) -> tuple[Path, int]:
        """(file, row in that file) of values[index]."""
        f = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.files[f], int(index - self.offsets[f])


def _timestamps(files: list[Path]) -> _Timestamps:
    parts, offsets, total = [], [], 0
    for path in files:
        offsets.append(total)
        reader = SampleReader(path)
        for table in reader.iter_batches():
            parts.append(table.column("timestamp").to_numpy())
            total += len(parts[-1])
    if not total:
        raise DataError("no rows to slice", path=files[0])
    return _Timestamps(np.concatenate(parts), files, np.array(offsets, dtype=np.int64))


def _period_text(config: SliceConfig) -> str:
    seconds = config.period_s
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _looks_like(median: int) -> str | None:
    """The unit a typical timestamp looks like, read as time since 1970 (None: seconds, or not a clock)."""
    for unit, size in TIMESTAMP_UNITS.items():
        if 3.1e8 <= median / size < 7.3e9:  # 1980 to 2200 in this unit (the units are 1000x apart)
            return unit
    return None


def _check_span(stamps: _Timestamps, ordered: np.ndarray, warm_end: int, config: SliceConfig) -> None:
    """Refuse a span of more than MAX_PERIODS periods after the warm-up cut, before any period is made."""
    periods = (int(ordered[-1]) - warm_end) // config.period + 1  # Python ints: no int64 overflow
    if periods <= MAX_PERIODS:
        return
    median = int(ordered[len(ordered) // 2])
    far = int(np.argmax(stamps.values))  # the latest timestamp makes the span (the warm-up ends at a row's)
    path, row = stamps.where(far)
    unit = _looks_like(median)
    hint = ""
    if unit is not None and TIMESTAMP_UNITS[unit] != TIMESTAMP_UNITS[config.timestamp_unit]:
        hint = f" (the timestamps look like {unit} since 1970: --timestamp-unit {unit})"
    raise DataError(
        f"timestamp {int(stamps.values[far])} lies {periods:,} periods of --period {_period_text(config)} "
        f"({config.period:,} timestamp units) after the warm-up cut at {warm_end} (the median timestamp is "
        f"{median}); a slicing spans at most {MAX_PERIODS:,} periods. One timestamp far from the others is an "
        f"outlier or of another unit: fix or drop that row, or give a longer --period{hint}", path=path, row=row)


def _check_train_rows(periods: list[dict], stamps: _Timestamps, order: np.ndarray, config: SliceConfig) -> None:
    """Refuse slices whose train split is empty: a day's update cannot train on them."""
    ordered = stamps.values[order]
    empty = [p for p, period in enumerate(periods[:-1])
             if np.searchsorted(ordered, period["valid_from"]) == np.searchsorted(ordered, period["start"])]
    if not empty:
        return
    median = int(ordered[len(ordered) // 2])
    unit = _looks_like(median)
    if unit is not None and TIMESTAMP_UNITS[unit] != TIMESTAMP_UNITS[config.timestamp_unit]:
        advice = (f"the timestamps look like {unit} since 1970 (the median {median} is "
                  f"{_date(median / TIMESTAMP_UNITS[unit])} in {unit}) while the period counts {config.timestamp_unit}: "
                  f"give --timestamp-unit {unit}")
    else:
        advice = "give a longer --period, or drop the periods of too few rows"
    first = periods[empty[0]]
    lo, hi = np.searchsorted(ordered, first["start"]), np.searchsorted(ordered, first["end"])
    path, row = stamps.where(int(order[lo]))
    names = ", ".join(f"slice-{p:02d}" for p in empty[:3]) + (", ..." if len(empty) > 3 else "")
    raise DataError(
        f"{len(empty)} of {len(periods) - 1} slice(s) of --period {_period_text(config)} ({config.period:,} timestamp "
        f"units) would have no train rows ({names}; slice-{empty[0]:02d} holds {hi - lo} row(s), from file {path}, "
        f"row {row}, timestamp {int(ordered[lo])}), and a day's update cannot train on none: {advice}. Nothing written")


def _date(seconds: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d")


def _cuts(stamps: _Timestamps, config: SliceConfig) -> list[dict]:
    """Per period: [start, valid_from, end) timestamps; period 0 is the warm-up."""
    order = np.argsort(stamps.values, kind="stable")
    ordered = stamps.values[order]
    warm_end = int(ordered[min(int(len(ordered) * config.warmup), len(ordered) - 1)])
    _check_span(stamps, ordered, warm_end, config)
    last = int(ordered[-1])
    bounds = [int(ordered[0]), warm_end]
    while bounds[-1] <= last:  # at most MAX_PERIODS + 1 more (checked above)
        bounds.append(bounds[-1] + config.period)
    # row index of each bound (a bound beyond int64 lies after every row)
    index = [len(ordered) if b > INT64_MAX else int(np.searchsorted(ordered, b, side="left")) for b in bounds]
    periods = []
    for (start, end), (lo, hi) in zip(zip(bounds[:-1], bounds[1:]), zip(index[:-1], index[1:])):
        if hi == lo:
            continue
        first_valid = int(ordered[lo + min(int((hi - lo) * (1 - config.valid_fraction)), hi - lo - 1)])
        periods.append({"start": start, "valid_from": first_valid, "end": end})
    if len(periods) < 2:
        raise ValueError(f"the data spans {len(periods)} period(s) after the warm-up cut; a daily loop needs at "
                         "least a warm-up and one more period: lower --warmup or --period")
    if config.max_slices is not None:
        periods = periods[:config.max_slices + 2]  # the warm-up, the kept slices, and the test of the last one
    _check_train_rows(periods, stamps, order, config)
    return periods


def _between(table: pa.Table, low: int, high: int) -> pa.Table:
    ts = table.column("timestamp")
    if high > INT64_MAX:  # the last period of timestamps near the int64 limit: no upper bound
        return table.filter(pc.greater_equal(ts, low))
    return table.filter(pc.and_(pc.greater_equal(ts, low), pc.less(ts, high)))


def write_time_slices(files: list[str | Path], out_dir: str | Path, config: SliceConfig) -> dict:
    """Write ``slice-PP/`` and ``upto-PP/`` under ``out_dir`` (see the module doc); returns slices.json's content.
    Each folder's three files appear together (a failure leaves none of them replaced)."""
    files = [Path(f) for f in files]
    if not files:
        raise ValueError("give at least one sample file to slice")
    schema = SampleReader(files[0]).schema
    for path in files[1:]:
        if SampleReader(path).schema != schema:
            raise DataError(f"its schema differs from {files[0]}'s: slice files of one dataset", path=path)
    periods = _cuts(_timestamps(files), config)
    out = Path(out_dir)
    folders = {}
    for p in range(len(periods) - 1):
        period, following = periods[p], periods[p + 1]
        ranges = {"train": (period["start"], period["valid_from"]), "valid": (period["valid_from"], period["end"]),
                  "test": (following["start"], following["end"])}
        folders[f"slice-{p:02d}"] = ranges
        folders[f"upto-{p:02d}"] = {**ranges, "train": (periods[0]["start"], period["valid_from"])}
    rows = {}
    for name, ranges in folders.items():
        writers = {split: SampleWriter(out / name / f"{split}.parquet", schema) for split in SPLITS}
        counts = dict.fromkeys(SPLITS, 0)
        try:
            for path in files:
                for table in SampleReader(path).iter_batches():
                    for split, (low, high) in ranges.items():
                        part = _between(table, low, high)
                        if part.num_rows:
                            writers[split].write(part)
                            counts[split] += part.num_rows
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        publish_together(writers)
        rows[name] = counts
    summary = {"config": {"period_s": config.period_s, "timestamp_unit": config.timestamp_unit, "warmup": config.warmup,
                          "valid_fraction": config.valid_fraction, "max_slices": config.max_slices},
               "files": [str(f) for f in files], "periods": periods, "rows": rows,
               "slices": sorted(n for n in folders if n.startswith("slice-"))}
    (out / "slices.json").write_text(json.dumps(summary, indent=2))
    return summary
