"""``bahe-data import``: a team's own logs -> ``train/valid/test.parquet`` in the sample schema.

The input is a table of impressions (one row per (user, item) shown, with its 0/1 label), in Parquet, CSV or
JSON lines, and optionally an item table (item id -> title) and event tables (per-user behaviours with
texts). An :class:`~bahe.ctr_data.import_mapping.ImportMapping` (a TOML file, or flags) says which column
becomes which sample column. The output is the layout ``bahe-data movielens --out DIR`` writes, so
``bahe-encode build`` and ``bahe-train --data-dir`` take it unchanged.

Behaviour sequences come from a list column of the row itself, or from an event table joined per user by
time: the user's events STRICTLY before the row's timestamp ``t``, not before ``t - window``, the
``max_length`` most recent, oldest first (the schema's order).

Streaming, memory flat in the files' size. What is held at any time:

* one batch (``batch_rows``) of the impressions and of each event table, and up to ``batch_rows`` converted
  rows per split waiting to be written;
* the item table, if given (the catalogue: item id -> title);
* per event sequence, for each user with an event in the last ``window`` (every user with an event when
  there is no window), at most ``max_length`` (timestamp, text) pairs. Users whose newest event fell out
  of the window are dropped as the rows advance.

For that join the impressions and the event tables must be in time order (non-decreasing timestamps, across
their files in the order given); a row that goes back in time is refused by file and row. A split by
fractions needs the impressions in time order too (the cut rows are counted: the first pass only counts
rows); cuts (timestamps) or the team's own split column take any order. Rows keep their input order in
each split.

A failed import (a bad row, a full disk) leaves no partial output: each split is written under a
temporary name beside its target and all three are renamed into place only once all are complete; older
files there stay as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import deque
from pathlib import Path

import numpy as np
import pyarrow as pa

from bahe.ctr_data.import_mapping import SPLITS, EventSequence, ImportMapping, ListSequence
from bahe.ctr_data.import_sources import (
    RawBatch,
    categories,
    count_rows,
    floats,
    integers,
    labels,
    read_batches,
    split_names,
    text_form,
    text_lists,
    texts,
)
from bahe.ctr_data.item_cold import WARM, cold_codes, hold_out
from bahe.ctr_data.parquet_io import SampleWriter, publish_together
from bahe.ctr_data.schema import DataError, SampleSchema
from bahe.ctr_data.validation import validate_batch

__all__ = ["EventHistory", "import_logs", "load_items"]


class _TimeOrder:
    """Refuses a row whose timestamp is earlier than the row before it (over all files of one table)."""

    def __init__(self, why: str):
        self.why = why
        self.last: int | None = None

    def check(self, batch: RawBatch, column: str, times: list[int]) -> None:
        last = self.last
        for i, t in enumerate(times):
            if last is not None and t < last:
                raise batch.fail(i, column, f"timestamp {t} is earlier than the row before it ({last}): {self.why}")
            last = t
        self.last = last


def _hashed(mapping: ImportMapping, column: str) -> bool:
    return column in mapping.hash_ids


def load_items(mapping: ImportMapping) -> dict[int, str]:
    """The [items] table: item id -> title (an id listed twice with two titles is refused)."""
    spec = mapping.items
    titles: dict[int, str] = {}
    for batch in read_batches(spec.source, [spec.item_id, spec.text], mapping.batch_rows, [spec.item_id, spec.text]):
        ids = integers(batch, spec.item_id, nonnegative=True, hashed=_hashed(mapping, "item_id"))
        for i, (item, title) in enumerate(zip(ids, texts(batch, spec.text))):
            if titles.setdefault(item, title) != title:
                raise batch.fail(i, spec.item_id, f"item {batch.columns[spec.item_id][i]!r} is listed again with "
                                 f"another title ({titles[item]!r}, now {title!r}): keep one row per item")
    return titles


def _titles(batch: RawBatch, column: str, ids: list[int], items: dict[int, str], what: str) -> list[str]:
    out = []
    for i, item in enumerate(ids):
        title = items.get(item)
        if title is None:
            raise batch.fail(i, column, f"item {batch.columns[column][i]!r} is not in the items table ({what}): add "
                             "it there")
        out.append(title)
    return out


class EventHistory:
    """One event sequence's join: the events read so far, by user, as the impressions' time advances."""

    def __init__(self, seq: EventSequence, mapping: ImportMapping, items: dict[int, str] | None):
        self.seq, self._mapping, self._items = seq, mapping, items
        text = seq.text or seq.item_id
        self._batches = read_batches(seq.source, [seq.user_id, seq.timestamp, text, *(c for c, _ in seq.where)],
                                     mapping.batch_rows, [seq.user_id, seq.timestamp, text])
        self._order = _TimeOrder("an event table is joined by time as it streams, so it must be sorted by its "
                                 "timestamp (docs/byo_data.md shows how)")
        self._users: list[int] = []
        self._times: list[int] = []
        self._texts: list[str] = []
        self._pos, self._done = 0, False
        self.by_user: dict[int, deque] = {}
        self.peak_users = 0  # the most users held at once (the memory bound's count)
        self._sweep_at = 1024

    def _load(self) -> bool:
        """Read the next batch with kept events; False at the end of the table."""
        seq = self.seq
        for batch in self._batches:
            if seq.where:
                keep = [i for i in range(len(batch))
                        if all(text_form(batch.columns[c][i]) in values for c, values in seq.where)]
                batch = RawBatch(batch.path, [batch.rows[i] for i in keep],
                                 {c: [v[i] for i in keep] for c, v in batch.columns.items()})
            if not len(batch):
                continue
            times = integers(batch, seq.timestamp, nonnegative=False)
            self._order.check(batch, seq.timestamp, times)
            users = integers(batch, seq.user_id, nonnegative=True, hashed=_hashed(self._mapping, "user_id"))
            if seq.text is not None:
                found = texts(batch, seq.text)
            else:
                ids = integers(batch, seq.item_id, nonnegative=True, hashed=_hashed(self._mapping, "item_id"))
                found = _titles(batch, seq.item_id, ids, self._items, f"sequence {seq.name}")
            self._users, self._times, self._texts, self._pos = users, times, found, 0
            return True
        self._done = True
        return False

    def advance(self, t: int) -> None:
        """Take in every event before time ``t`` (the impressions' times never go back)."""
        while True:
            times, pos = self._times, self._pos
            while pos < len(times) and times[pos] < t:
                user = self._users[pos]
                held = self.by_user.get(user)
                if held is None:
                    held = self.by_user[user] = deque(maxlen=self.seq.max_length)
                held.append((times[pos], self._texts[pos]))
                pos += 1
            self._pos = pos
            if pos < len(times) or self._done or not self._load():
                break
        self.peak_users = max(self.peak_users, len(self.by_user))
        if self.seq.window is not None and len(self.by_user) > self._sweep_at:
            oldest = t - self.seq.window  # a user whose newest event is older is out of every later row's window
            for user in [u for u, held in self.by_user.items() if held[-1][0] < oldest]:
                del self.by_user[user]
            self._sweep_at = max(1024, 2 * len(self.by_user))

    def sequence(self, user: int, t: int) -> list[str]:
        """The user's texts before ``t`` (after :meth:`advance`), in the window, oldest first."""
        held = self.by_user.get(user)
        if not held:
            return []
        if self.seq.window is None:
            return [text for _, text in held]
        oldest = t - self.seq.window
        return [text for when, text in held if when >= oldest]


class _Splitter:
    """Which split each row goes to. With ``cold_share`` (item_cold, ctr_data/item_cold.py) a first pass counts
    the rows per item (memory: the distinct items); the cold items' rows go to valid or test (each item whole
    to one), the warm rows are split by time (fractions: of the warm rows)."""

    def __init__(self, mapping: ImportMapping):
        self.split = mapping.split
        self.column = mapping.split.column
        self.cold: tuple[set[int], set[int]] | None = None
        if self.split.cold_share is not None:
            counts = _item_rows(mapping)
            weights = self.split.fractions[1:] if self.split.fractions is not None else (1.0, 1.0)
            self.cold = hold_out(counts, self.split.cold_share, self.split.seed, weights)
            cold_rows = sum(counts[i] for part in self.cold for i in part)
        if self.split.fractions is not None:
            rows = count_rows(mapping.input, mapping.timestamp) if self.cold is None else sum(counts.values()) - cold_rows
            bounds = np.cumsum(self.split.fractions[:2]) * rows
            self.bounds = [int(round(b)) for b in bounds]
            self.rows = rows
        self.index, self.current, self.last = 0, 0, None

    def assign(self, batch: RawBatch, times: list[int], item_ids: list[int]) -> np.ndarray:
        if self.column is not None:
            return np.asarray(split_names(batch, self.column), dtype=np.int8)
        codes = cold_codes(item_ids, *self.cold) if self.cold is not None else np.full(len(times), WARM, np.int8)
        if self.split.cuts is not None:
            out = np.searchsorted(np.asarray(self.split.cuts, dtype=np.int64), np.asarray(times, dtype=np.int64),
                                  side="right").astype(np.int8)
            return np.where(codes == WARM, out, codes).astype(np.int8)
        out = codes.copy()
        for i, t in enumerate(times):  # warm rows by row count, then moved later past equal timestamps
            if codes[i] != WARM:
                continue
            nominal = (self.index >= self.bounds[0]) + (self.index >= self.bounds[1])
            self.current = self.current if nominal > self.current and t == self.last else max(nominal, self.current)
            out[i], self.last = self.current, t
            self.index += 1
        return out

    def empty_split(self, name: str) -> str:
        if self.column is not None:
            return f"no row's {self.column!r} says {name!r}: bahe-train needs rows in train, valid and test"
        if self.split.cuts is not None:
            t1, t2 = self.split.cuts
            span = {"train": f"before {t1}", "valid": f"in [{t1}, {t2})", "test": f"from {t2} on"}[name]
            return f"no row has a timestamp {span}: move [split] cuts so that each split gets rows"
        return (f"the {name} split is empty ({self.rows} rows; fractions {list(self.split.fractions)}, cuts moved "
                "past equal timestamps): import more rows or give [split] cuts")


def _item_rows(m: ImportMapping) -> dict[int, int]:
    """Rows per item id of the impressions (a pass over their item column)."""
    counts: dict[int, int] = {}
    for batch in read_batches(m.input, [m.item_id], m.batch_rows, [m.item_id]):
        ids, n = np.unique(np.asarray(integers(batch, m.item_id, nonnegative=True, hashed=_hashed(m, "item_id")),
                                      dtype=np.int64), return_counts=True)
        for i, c in zip(ids.tolist(), n.tolist()):
            counts[i] = counts.get(i, 0) + c
    return counts


class _Outputs:
    """The three split files, written in chunks of about ``batch_rows`` rows."""

    def __init__(self, out: Path, schema: SampleSchema, batch_rows: int):
        self.writers: dict[str, SampleWriter] = {}
        try:
            for name in SPLITS:
                self.writers[name] = SampleWriter(out / f"{name}.parquet", schema, row_group_size=max(batch_rows, 1024))
        except BaseException:
            self.abort()
            raise
        self.pending: dict[str, list[pa.Table]] = {name: [] for name in SPLITS}
        self.rows = dict.fromkeys(SPLITS, 0)
        self.batch_rows = batch_rows

    def add(self, table: pa.Table, split: np.ndarray) -> None:
        for k, name in enumerate(SPLITS):
            part = table.filter(pa.array(split == k)) if (split != k).any() else table
            if part.num_rows:
                self.pending[name].append(part)
                self.rows[name] += part.num_rows
                if sum(p.num_rows for p in self.pending[name]) >= self.batch_rows:
                    self.flush(name)

    def flush(self, name: str) -> None:
        if self.pending[name]:
            self.writers[name].write(pa.concat_tables(self.pending[name]))
            self.pending[name] = []

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()


def _convert(batch: RawBatch, m: ImportMapping, schema: SampleSchema, items: dict[int, str] | None,
             histories: dict[str, EventHistory], order: _TimeOrder | None, splitter: _Splitter
             ) -> tuple[pa.Table, np.ndarray]:
    """One batch of impressions as sample rows (in input order) and the split of each."""
    times = integers(batch, m.timestamp, nonnegative=False)
    if order is not None:
        order.check(batch, m.timestamp, times)
    users = integers(batch, m.user_id, nonnegative=True, hashed=_hashed(m, "user_id"))
    item_ids = integers(batch, m.item_id, nonnegative=True, hashed=_hashed(m, "item_id"))
    cols: dict[str, list] = {"label": labels(batch, m.label), "timestamp": times, "user_id": users, "item_id": item_ids}
    for c in m.categorical:
        cols[f"cat_{c.name}"] = categories(batch, c.column, c.sep)
    for d in m.dense:
        cols[f"dense_{d.name}"] = floats(batch, d.column, d.fill)
    cols["item_text"] = (texts(batch, m.item_text) if m.item_text is not None
                         else _titles(batch, m.item_id, item_ids, items, "the item titles"))
    for seq in m.sequences:
        if isinstance(seq, ListSequence):
            cols[f"seq_{seq.name}"] = text_lists(batch, seq.column, seq.sep, seq.newest_first, seq.max_length)
    events = [(seq.name, histories[seq.name]) for seq in m.sequences if isinstance(seq, EventSequence)]
    if events:
        joined: dict[str, list] = {name: [] for name, _ in events}
        for user, t in zip(users, times):
            for name, history in events:
                history.advance(t)
                joined[name].append(history.sequence(user, t))
        cols.update({f"seq_{name}": values for name, values in joined.items()})
    split = splitter.assign(batch, times, item_ids)
    table = pa.Table.from_pydict(cols, schema=schema.arrow_schema())
    ids = ["user_id", "item_id", *schema.categorical_columns]
    try:  # the sample schema's own checks, as a second net; rows and columns named as the input's
        table = validate_batch(table, schema, path=batch.path, row_offset=0, nonnegative=ids)
    except DataError as err:
        prefix = str(DataError("", path=err.path, row=err.row, field=err.field))
        raise DataError(str(err)[len(prefix):], path=batch.path, row=None if err.row is None else batch.rows[err.row],
                        field=m.source_columns().get(err.field, err.field)) from None
    return table, split


def import_logs(mapping: ImportMapping, out_dir: str | Path) -> dict:
    """Write ``train/valid/test.parquet`` under ``out_dir`` from the mapping's files.

    Returns ``{"paths": {split: Path}, "rows": {split: int}, "peak_users": {sequence: int}}`` (the most users
    each event join held at once). Raises :class:`DataError` for a bad row (file, row, column named),
    ``ValueError`` for an empty split; nothing is written then.
    """
    out = Path(out_dir)
    schema = mapping.schema()
    items = load_items(mapping) if mapping.items is not None else None
    histories = {seq.name: EventHistory(seq, mapping, items) for seq in mapping.sequences
                 if isinstance(seq, EventSequence)}
    order = None
    if mapping.ordered:
        why = ("event tables are joined by time as the rows stream" if histories else
               "a split by fractions counts rows in time order; or give [split] cuts or column, which take any order")
        order = _TimeOrder(f"the impressions must be sorted by time ({why}); sort them by their timestamp "
                           "(docs/byo_data.md shows how)")
    splitter = _Splitter(mapping)
    if splitter.cold is not None:  # what the split recorded, as bahe-data movielens --split item_cold records it
        cold = {"cold_share": mapping.split.cold_share, "seed": mapping.split.seed,
                "cold_items": len(splitter.cold[0]) + len(splitter.cold[1])}
        schema = dataclasses.replace(schema, extra={**schema.extra, "imported": {**schema.extra["imported"],
                                                                                 "item_cold": cold}})
    columns = [m for m in (mapping.user_id, mapping.item_id, mapping.label, mapping.timestamp, mapping.item_text,
                           mapping.split.column) if m is not None]
    required = list(columns) + [d.column for d in mapping.dense if d.fill is None]
    columns += [c.column for c in mapping.categorical] + [d.column for d in mapping.dense]
    columns += [s.column for s in mapping.sequences if isinstance(s, ListSequence)]
    created = not out.exists()
    outputs = None
    try:
        outputs = _Outputs(out, schema, mapping.batch_rows)
        for batch in read_batches(mapping.input, columns, mapping.batch_rows, required):
            outputs.add(*_convert(batch, mapping, schema, items, histories, order, splitter))
        for name in SPLITS:
            outputs.flush(name)
            if not outputs.rows[name]:
                raise ValueError(f"nothing written: {splitter.empty_split(name)}")
        paths = publish_together(outputs.writers)
    except BaseException:
        if outputs is not None:
            outputs.abort()
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if it is empty: the folder this import made
        raise
    return {"paths": paths, "rows": dict(outputs.rows),
            "peak_users": {name: h.peak_users for name, h in histories.items()}}
