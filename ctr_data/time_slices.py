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


@dataclass(frozen=True)
class SliceConfig:
    """How sample files become periods.

    Args:
        period_s: length of one period in seconds (86400: days; 604800: weeks).
        warmup: fraction of all rows (by time) in the warm-up period, in (0, 1).
        valid_fraction: share of each period's rows (its last, by time) held out as its valid split.
        max_slices: keep at most this many periods after the warm-up (the LAST ones kept are the
            earliest; None: all).
    """

    period_s: int = 7 * 86400
    warmup: float = 0.5
    valid_fraction: float = 0.1
    max_slices: int | None = None

    def __post_init__(self) -> None:
        if self.period_s < 1:
            raise ValueError(f"SliceConfig.period_s must be >= 1 second, got {self.period_s}")
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


def _timestamps(files: list[Path]) -> np.ndarray:
    parts = []
    for path in files:
        reader = SampleReader(path)
        for table in reader.iter_batches():
            parts.append(table.column("timestamp").to_numpy())
    if not parts:
        raise DataError("no rows to slice", path=files[0])
    return np.concatenate(parts)


def _cuts(timestamps: np.ndarray, config: SliceConfig) -> list[dict]:
    """Per period: [start, valid_from, end) timestamps; period 0 is the warm-up."""
    ordered = np.sort(timestamps)
    warm_end = int(ordered[min(int(len(ordered) * config.warmup), len(ordered) - 1)])
    bounds = [int(ordered[0]), warm_end]
    while bounds[-1] <= ordered[-1]:
        bounds.append(bounds[-1] + config.period_s)
    periods = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        inside = ordered[(ordered >= start) & (ordered < end)]
        if len(inside) == 0:
            continue
        first_valid = int(inside[min(int(len(inside) * (1 - config.valid_fraction)), len(inside) - 1)])
        periods.append({"start": start, "valid_from": first_valid, "end": end})
    if len(periods) < 2:
        raise ValueError(f"the data spans {len(periods)} period(s) after the warm-up cut; a daily loop needs at "
                         "least a warm-up and one more period: lower --warmup or --period")
    if config.max_slices is not None:
        periods = periods[:config.max_slices + 2]  # the warm-up, the kept slices, and the test of the last one
    return periods


def _between(table: pa.Table, low: int, high: int) -> pa.Table:
    ts = table.column("timestamp")
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
    summary = {"config": {"period_s": config.period_s, "warmup": config.warmup,
                          "valid_fraction": config.valid_fraction, "max_slices": config.max_slices},
               "files": [str(f) for f in files], "periods": periods, "rows": rows,
               "slices": sorted(n for n in folders if n.startswith("slice-"))}
    (out / "slices.json").write_text(json.dumps(summary, indent=2))
    return summary
