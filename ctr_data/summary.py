"""Streaming summary of a sample file: how much duplication BAHE can exploit.

For each behaviour sequence type and over all of them, the number of behaviour occurrences, the
number of DISTINCT texts (what the offline store encodes once) and their ratio, plus
sequence-length percentiles; rows, users, items and the positive rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from bahe.ctr_data.parquet_io import SampleReader
from bahe.ctr_data.schema import ITEM_ID, ITEM_TEXT, LABEL, USER_ID

PERCENTILES = (50, 90, 99, 100)


def _percentiles(histogram: np.ndarray) -> dict[str, int]:
    """Percentiles of sequence lengths from a histogram (index = length)."""
    total = histogram.sum()
    if total == 0:
        return {f"p{p}": 0 for p in PERCENTILES}
    cumulative = np.cumsum(histogram)
    return {f"p{p}": int(np.searchsorted(cumulative, total * p / 100.0, side="left")) for p in PERCENTILES}


@dataclass
class SequenceStats:
    occurrences: int = 0
    distinct: set = field(default_factory=set)
    length_histogram: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))

    def add(self, column) -> None:
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        if len(lengths):
            counts = np.bincount(lengths)
            if len(counts) > len(self.length_histogram):
                self.length_histogram = np.pad(self.length_histogram, (0, len(counts) - len(self.length_histogram)))
            self.length_histogram[: len(counts)] += counts
        flat = pc.list_flatten(column)
        self.occurrences += len(flat)
        self.distinct.update(pc.unique(flat).to_pylist())

    def as_dict(self) -> dict:
        return {
            "occurrences": self.occurrences,
            "distinct_texts": len(self.distinct),
            "duplication_ratio": round(self.occurrences / max(len(self.distinct), 1), 2),
            "length": _percentiles(self.length_histogram),
        }


def summarize(paths: list[str | Path]) -> dict:
    """Summarise one or more sample files of the same schema (e.g. train, valid and test)."""
    rows = positives = 0
    users: set[int] = set()
    items: set[int] = set()
    item_texts: set[str] = set()
    per_type: dict[str, SequenceStats] = {}
    schema = None
    for path in paths:
        reader = SampleReader(path)
        schema = schema or reader.schema
        for table in reader.iter_batches():
            rows += table.num_rows
            positives += int(pc.sum(table.column(LABEL)).as_py() or 0)
            users.update(pc.unique(table.column(USER_ID)).to_pylist())
            items.update(pc.unique(table.column(ITEM_ID)).to_pylist())
            item_texts.update(pc.unique(table.column(ITEM_TEXT)).to_pylist())
            for name in reader.schema.sequences:
                per_type.setdefault(name, SequenceStats()).add(table.column("seq_" + name))
    all_texts: set[str] = set().union(*(s.distinct for s in per_type.values())) if per_type else set()
    occurrences = sum(s.occurrences for s in per_type.values())
    return {
        "dataset": schema.dataset if schema else "",
        "files": [str(p) for p in paths],
        "rows": rows,
        "positive_rate": round(positives / max(rows, 1), 4),
        "users": len(users),
        "items": len(items),
        "sequence_types": list(per_type),
        "behaviour_occurrences": occurrences,
        "distinct_behaviour_texts": len(all_texts),
        "duplication_ratio": round(occurrences / max(len(all_texts), 1), 2),
        "distinct_item_texts": len(item_texts - {""}),
        "distinct_texts_to_encode": len(all_texts | (item_texts - {""})),
        "per_sequence": {name: stats.as_dict() for name, stats in per_type.items()},
    }


def format_summary(summary: dict) -> str:
    """A few human-readable lines."""
    lines = [
        f"dataset {summary['dataset'] or '?'}: {summary['rows']:,} rows, {summary['users']:,} users, "
        f"{summary['items']:,} items, positive rate {summary['positive_rate']:.3f}",
        f"behaviours: {summary['behaviour_occurrences']:,} occurrences of {summary['distinct_behaviour_texts']:,} "
        f"distinct texts (x{summary['duplication_ratio']} duplication); "
        f"{summary['distinct_texts_to_encode']:,} distinct texts to encode incl. item texts",
    ]
    for name, stats in summary["per_sequence"].items():
        length = stats["length"]
        lines.append(
            f"  seq_{name}: {stats['occurrences']:,} occurrences, {stats['distinct_texts']:,} distinct "
            f"(x{stats['duplication_ratio']}), length p50 {length['p50']} p90 {length['p90']} "
            f"p99 {length['p99']} max {length['p100']}"
        )
    return "\n".join(lines)
