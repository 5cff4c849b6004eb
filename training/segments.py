"""Segment metrics: AUC and log loss per segment of the rows, each with its row count and a bootstrap
interval -- the one definition every report uses (the trainer's valid / test reports and TensorBoard,
``bahe-evaluate``, ``bahe-predict``'s summary, ``make demo``). docs/segments.md describes it.

Two segmentations of the same rows:

* **item popularity** (``item_popularity``): the rows the row's ``item_id`` has in the run's TRAINING
  split (:class:`ItemCounts`, counted once per run, recorded in ``<run>/item_counts.parquet``). With the
  thresholds ``t0 < t1 < ...`` (default ``0 20 200``) a row belongs to the first segment ``i`` with
  ``count <= t_i``, else to the last one: cold (0 training rows), tail (1-20), torso (21-200), head (> 200).
* **history length** (``history_length``): the behaviours in the row's own sequences (every ``seq_*``
  column of the row, summed, as the data carries them), bucketed the same way (default ``0 5 20 100``:
  0, 1-5, 6-20, 21-100, 101+).

Per segment: ``rows``, ``positives``, ``auc`` (scikit-learn's ``roc_auc_score``: ties count half) and
``logloss`` (natural log, probabilities clamped to [1e-12, 1 - 1e-12] as torchrec's NE is), and the
bootstrap interval of each (``auc_interval``, ``logloss_interval``): ``bootstrap`` resamples of the
segment's rows with replacement (seeded per segment: the same rows give the same interval on any number
of ranks), the central ``confidence`` share of the resampled values. A segment of one class has no AUC:
``auc`` is null and ``note`` says why (never 0, never a crash); an empty segment has ``rows`` 0 and null
metrics. Resamples that draw one class are left out of the AUC interval (the note counts them); with
fewer than half of them usable the interval is null.

Everything here is numpy on arrays of scores (probabilities), labels and segment ids; gathering the rows
of every rank is training/metrics.py's (:class:`~bahe.training.metrics.SegmentRows`).
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ITEM_COUNTS = "item_counts.parquet"  # beside run_config.json in the run folder
ITEM_COUNTS_KEY = b"bahe.item_counts"
ETA = 1e-12  # probability clamp of the log loss (torchrec's NE uses the same)
KINDS = ("item_popularity", "history_length")


@dataclass(frozen=True)
class SegmentSpec:
    """Which segments and how their intervals are drawn.

    Args:
        item_thresholds: ascending training-row counts bounding the item popularity segments (default
            cold = 0, tail <= 20, torso <= 200, head above).
        history_thresholds: ascending behaviour counts bounding the history length segments.
        bootstrap: resamples per interval (0: no intervals).
        confidence: the interval's central share (0.9: the 5th to the 95th percentile).
        seed: the resampling seed (each segment draws from its own stream of it).
    """

    item_thresholds: tuple[int, ...] = (0, 20, 200)
    history_thresholds: tuple[int, ...] = (0, 5, 20, 100)
    bootstrap: int = 200
    confidence: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("item_thresholds", "history_thresholds"):
            values = tuple(int(v) for v in getattr(self, name))
            object.__setattr__(self, name, values)
            flag = "--segment-thresholds" if name == "item_thresholds" else "--history-thresholds"
            if not values or values[0] < 0 or any(b <= a for a, b in zip(values, values[1:])):
                raise ValueError(f"SegmentSpec.{name}={list(values)} ({flag}): give one or more counts >= 0, "
                                 "strictly ascending, e.g. 0 20 200")
        if self.bootstrap < 0:
            raise ValueError(f"SegmentSpec.bootstrap={self.bootstrap} (--bootstrap): give resamples >= 0 (0: no interval)")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"SegmentSpec.confidence={self.confidence} (--confidence): give a share in (0, 1), e.g. 0.9")

    def names(self, kind: str) -> list[str]:
        """The segment names of ``kind``, in id order."""
        if kind == "item_popularity":
            t = self.item_thresholds
            if len(t) == 3 and t[0] == 0:
                return ["cold", "tail", "torso", "head"]
            return ["cold" if i == 0 and t[0] == 0 else label for i, label in enumerate(range_labels(t))]
        if kind == "history_length":
            return range_labels(self.history_thresholds)
        raise ValueError(f"unknown segmentation {kind!r}: choose one of {KINDS}")

    def ranges(self, kind: str) -> list[list[int | None]]:
        """[lowest, highest] count of each segment of ``kind`` (None: no upper bound)."""
        t = self.item_thresholds if kind == "item_popularity" else self.history_thresholds
        lows = [0, *(v + 1 for v in t)]
        return [[lo, hi] for lo, hi in zip(lows, [*t, None])]

    def ids(self, kind: str, counts: np.ndarray) -> np.ndarray:
        """Segment id (int8) of each count: the first ``i`` with ``count <= t_i``, else ``len(t)``."""
        t = self.item_thresholds if kind == "item_popularity" else self.history_thresholds
        return np.searchsorted(np.asarray(t, dtype=np.int64), np.asarray(counts, dtype=np.int64),
                               side="left").astype(np.int8)

    def record(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


DEFAULT_SPEC = SegmentSpec()  # what every report uses unless told otherwise


def range_labels(thresholds: tuple[int, ...]) -> list[str]:
    """"0", "1-20", "21-200", "201+" for thresholds (0, 20, 200)."""
    labels, low = [], 0
    for high in thresholds:
        labels.append(str(low) if low == high else f"{low}-{high}")
        low = high + 1
    return [*labels, f"{low}+"]


# Metrics on numpy arrays -------------------------------------------------------------------------------------

def _tie_groups(scores: np.ndarray) -> tuple[np.ndarray, int]:
    """Each score's rank among the distinct scores (ascending), and how many distinct scores there are."""
    distinct, group = np.unique(scores, return_inverse=True)
    return group.ravel(), len(distinct)


def _auc(group: np.ndarray, groups: int, positive: np.ndarray, negative: np.ndarray) -> float | None:
    """AUC of weighted rows: P(score of a positive > score of a negative) + half the ties, from each row's
    tie group and its positive / negative weight (1 / 0 per row, or bootstrap multiplicities). None: one class."""
    pos = np.bincount(group, weights=positive, minlength=groups)
    neg = np.bincount(group, weights=negative, minlength=groups)
    total_pos, total_neg = pos.sum(), neg.sum()
    if total_pos == 0 or total_neg == 0:
        return None
    below = np.cumsum(neg) - neg  # negatives with a strictly lower score
    return float(np.dot(pos, below + 0.5 * neg) / (total_pos * total_neg))


def row_losses(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-row cross entropy (natural log) of probabilities ``scores`` against 0/1 ``labels``."""
    p = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    return -(y * np.log(np.maximum(p, ETA)) + (1.0 - y) * np.log(np.maximum(1.0 - p, ETA)))


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """roc_auc_score of ``scores`` for 0/1 ``labels``; None when the rows hold one class (or none)."""
    labels = np.asarray(labels, dtype=np.float64)
    if labels.size == 0:
        return None
    group, groups = _tie_groups(np.asarray(scores, dtype=np.float64))
    return _auc(group, groups, labels, 1.0 - labels)


def log_loss(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Mean cross entropy (natural log); None for no rows."""
    losses = row_losses(scores, labels)
    return float(losses.mean()) if losses.size else None


def _interval(values: list[float], confidence: float) -> list[float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.asarray(values, dtype=np.float64), [tail, 1.0 - tail])
    return [float(low), float(high)]


def _stream(seed: int, kind: str, name: str) -> np.random.Generator:
    """The segment's own generator: its intervals do not depend on the other segments or the row order."""
    return np.random.default_rng([seed, zlib.crc32(f"{kind}/{name}".encode())])


def segment_entry(scores: np.ndarray, labels: np.ndarray, *, bootstrap: int, confidence: float,
                  rng: np.random.Generator) -> dict:
    """The metrics of one segment's rows: rows, positives, auc, logloss, their intervals and a note."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    n = int(labels.size)
    positives = int(labels.sum())
    entry = {"rows": n, "positives": positives, "auc": None, "auc_interval": None, "logloss": None,
             "logloss_interval": None}
    if n == 0:
        entry["note"] = "no rows in this segment: no AUC, no log loss"
        return entry
    group, groups = _tie_groups(scores)
    losses = row_losses(scores, labels)
    entry["auc"] = _auc(group, groups, labels, 1.0 - labels)
    entry["logloss"] = float(losses.mean())
    notes = []
    if entry["auc"] is None:
        notes.append(f"AUC undefined: all {n} row(s) are {'positive' if positives else 'negative'} "
                     "(AUC ranks positives against negatives)")
    if bootstrap:
        aucs, lls = [], []
        for _ in range(bootstrap):
            weight = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
            lls.append(float(np.dot(weight, losses) / n))
            if entry["auc"] is not None:
                value = _auc(group, groups, weight * labels, weight * (1.0 - labels))
                if value is not None:
                    aucs.append(value)
        entry["logloss_interval"] = _interval(lls, confidence)
        if entry["auc"] is not None:
            if len(aucs) * 2 >= bootstrap:
                entry["auc_interval"] = _interval(aucs, confidence)
            if len(aucs) < bootstrap:
                notes.append(f"{bootstrap - len(aucs)} of {bootstrap} resamples drew one class and are left out of "
                             f"the AUC interval{'' if entry['auc_interval'] else ', too many: no interval'}")
    if notes:
        entry["note"] = "; ".join(notes)
    return entry


def segment_report(scores: np.ndarray, labels: np.ndarray, item_ids: np.ndarray, history_ids: np.ndarray,
                   spec: SegmentSpec, *, item_counts: dict | None = None) -> dict:
    """The report of rows with their item popularity and history length segment ids (spec.ids):
    ``{"spec": ..., "item_counts": ..., "all": entry, "item_popularity": {name: entry}, "history_length": {...}}``;
    each entry also names its ``range`` of counts. The row order does not matter (rows are put in a
    canonical order first, so any split of them over ranks gives the same intervals)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    ids = {"item_popularity": np.asarray(item_ids, dtype=np.int64),
           "history_length": np.asarray(history_ids, dtype=np.int64)}
    if not (len(scores) == len(labels) == len(ids["item_popularity"]) == len(ids["history_length"])):
        raise ValueError("segment_report: scores, labels and segment ids differ in length")
    order = np.lexsort((scores, labels, ids["history_length"], ids["item_popularity"]))
    scores, labels = scores[order], labels[order]
    ids = {kind: value[order] for kind, value in ids.items()}
    settings = {"bootstrap": spec.bootstrap, "confidence": spec.confidence}
    report = {"spec": spec.record(), "item_counts": item_counts,
              "all": segment_entry(scores, labels, rng=_stream(spec.seed, "all", "all"), **settings)}
    for kind in KINDS:
        report[kind] = {}
        for index, (name, span) in enumerate(zip(spec.names(kind), spec.ranges(kind))):
            mask = ids[kind] == index
            entry = segment_entry(scores[mask], labels[mask], rng=_stream(spec.seed, kind, name), **settings)
            report[kind][name] = {"range": span, **entry}
    return report


def format_line(report: dict, kind: str = "item_popularity", names: tuple[str, ...] | None = None) -> str:
    """One line: ``cold 149 rows AUC 0.7146 [0.66, 0.77]; tail ...`` (the demo prints it)."""
    parts = []
    for name, entry in report[kind].items():
        if names is not None and name not in names:
            continue
        if entry["auc"] is None:
            auc = "AUC n/a (no rows)" if not entry["rows"] else "AUC n/a (one class)"
        else:
            interval = entry["auc_interval"]
            auc = f"AUC {entry['auc']:.4f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")
        parts.append(f"{name} {entry['rows']:,} rows {auc}")
    return "; ".join(parts)


# Item popularity in the training split ---------------------------------------------------------------------

@dataclass
class ItemCounts:
    """Training rows per item: ``ids`` (sorted, int64) and ``counts`` (int64); ``source`` says where from."""

    ids: np.ndarray
    counts: np.ndarray
    source: dict

    def lookup(self, item_ids) -> np.ndarray:
        """The training rows of each item id (0 for an item the training split never had)."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if not len(self.ids):
            return np.zeros(len(item_ids), dtype=np.int64)
        at = np.clip(np.searchsorted(self.ids, item_ids), 0, len(self.ids) - 1)
        return np.where(self.ids[at] == item_ids, self.counts[at], 0)

    def record(self) -> dict:
        return {**self.source, "items": int(len(self.ids)), "train_rows": int(self.counts.sum())}


def count_items(train_path: Path, chunk_rows: int = 1 << 20) -> ItemCounts:
    """Rows per item_id of a sample file, streaming the item_id column only (memory: the items seen)."""
    train_path = Path(train_path)
    parquet = pq.ParquetFile(train_path)
    ids = np.zeros(0, dtype=np.int64)
    counts = np.zeros(0, dtype=np.int64)
    for batch in parquet.iter_batches(batch_size=chunk_rows, columns=["item_id"]):
        new_ids, new_counts = np.unique(batch.column(0).to_numpy(zero_copy_only=False).astype(np.int64),
                                        return_counts=True)
        merged, inverse = np.unique(np.concatenate([ids, new_ids]), return_inverse=True)
        counts = np.bincount(inverse.ravel(), weights=np.concatenate([counts, new_counts]),
                             minlength=len(merged)).astype(np.int64)
        ids = merged
    return ItemCounts(ids, counts, {"train_split": str(train_path.resolve()), "rows": int(parquet.metadata.num_rows)})


def write_item_counts(run_dir: Path, counts: ItemCounts) -> Path:
    """``<run_dir>/item_counts.parquet`` (item_id, train_rows; the source in its metadata), atomically."""
    path = Path(run_dir) / ITEM_COUNTS
    table = pa.table({"item_id": pa.array(counts.ids, pa.int64()), "train_rows": pa.array(counts.counts, pa.int64())})
    table = table.replace_schema_metadata({ITEM_COUNTS_KEY: json.dumps(counts.source).encode()})
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        pq.write_table(table, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def read_item_counts(run_dir: Path) -> ItemCounts | None:
    """The counts a run recorded (None: it recorded none, e.g. a run from before segment metrics).
    Raises ValueError naming the file when it is not a counts file."""
    path = Path(run_dir) / ITEM_COUNTS
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
        source = json.loads((table.schema.metadata or {}).get(ITEM_COUNTS_KEY, b"{}"))
        ids = table.column("item_id").to_numpy().astype(np.int64)
        counts = table.column("train_rows").to_numpy().astype(np.int64)
    except (pa.ArrowException, KeyError, ValueError, OSError) as err:
        raise ValueError(f"{path} is not an item counts file ({err}): delete it and rerun (bahe-evaluate and "
                         "bahe-predict then count the run's train split again)") from None
    if len(ids) and (np.any(np.diff(ids) <= 0) or np.any(counts < 1)):
        raise ValueError(f"{path}: item ids not sorted and unique, or a count below 1: delete it and rerun")
    return ItemCounts(ids, counts, {**source, "file": str(path)})


def run_item_counts(run_dir: Path, train_path: Path | None) -> ItemCounts | None:
    """The run's recorded counts, else the train split's counted now (a note says so), else None."""
    recorded = read_item_counts(run_dir)
    if recorded is not None or train_path is None or not Path(train_path).is_file():
        return recorded
    counts = count_items(train_path)
    counts.source["note"] = f"the run recorded no {ITEM_COUNTS}: counted from this train split now"
    return counts


# Segment ids of sample rows ---------------------------------------------------------------------------------

def history_lengths(table: pa.Table) -> np.ndarray:
    """Behaviours in each row's sequences: the lengths of every ``seq_*`` column, summed."""
    total = np.zeros(table.num_rows, dtype=np.int64)
    for name in table.column_names:
        if name.startswith("seq_"):
            lengths = pc.fill_null(pc.list_value_length(table.column(name)), 0)
            total += lengths.to_numpy(zero_copy_only=False).astype(np.int64)
    return total


class SegmentTagger:
    """Segment ids of sample tables: item popularity from the run's :class:`ItemCounts`, history length
    from the rows' sequences."""

    def __init__(self, spec: SegmentSpec, counts: ItemCounts):
        self.spec, self.counts = spec, counts

    def __call__(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        items = table.column("item_id").to_numpy(zero_copy_only=False)
        return (self.spec.ids("item_popularity", self.counts.lookup(items)),
                self.spec.ids("history_length", history_lengths(table)))

    def report(self, scores, labels, item_ids, history_ids) -> dict:
        return segment_report(scores, labels, item_ids, history_ids, self.spec, item_counts=self.counts.record())


class TaggingBatcher:
    """A batcher that also records the segment ids of every table it batches, in order (:meth:`pop` hands
    them out, one table at a time); everything else is the wrapped batcher's."""

    def __init__(self, batcher, tagger: SegmentTagger):
        self._batcher, self._tagger = batcher, tagger
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []

    def __getattr__(self, name):
        return getattr(self._batcher, name)

    def __call__(self, table: pa.Table):
        self._pending.append(self._tagger(table))
        return self._batcher(table)

    def pop(self, real: int) -> tuple[np.ndarray, np.ndarray]:
        """The segment ids of the first ``real`` rows of the oldest table batched and not yet popped."""
        if not self._pending:
            raise RuntimeError("segment ids requested for a batch the batcher never saw (a source that does not "
                               "batch sample tables through the batcher cannot report segments)")
        items, history = self._pending.pop(0)
        return items[:real], history[:real]
