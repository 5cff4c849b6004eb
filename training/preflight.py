"""Checks before step 1: everything the run will read, so that bad input stops it at once with one line
that says what to change -- not after training, and not as a run that "succeeds" on garbage.

:func:`preflight` runs on every rank (the checks are deterministic, so every rank raises the same
:class:`PreflightError` and none waits in a collective), after the data source is opened and before
the model is built or anything is written into the run folder:

* every split: readable, of train's schema, valid and test with rows, train with one global batch;
* a text arm on data without behaviour texts (a Criteo conversion): use ``--arm dlrm``;
* the BAHE arm: the share of the train split's first texts (behaviours and item texts) the store has
  not encoded; above ``TrainConfig.max_unknown_text_rate`` the store was built for other data.

Config values that need no data (``--stop-at``, ``--eval-batches``) are checked by ``TrainConfig``.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from bahe.ctr_data.parquet_io import SampleReader
from bahe.ctr_data.schema import ITEM_TEXT, SEQ_PREFIX
from bahe.embeddings.store import BehaviourStore
from bahe.embeddings.vocabulary import PAD_ID, UNKNOWN_ID
from bahe.training.config import TrainConfig

SAMPLE_ROWS = 4096  # first train rows whose texts are looked up in the store


class PreflightError(ValueError):
    """Bad input found before step 1; the message names the file or flag and what to change."""


def preflight(config: TrainConfig, source, world: int) -> None:
    """Raise :class:`PreflightError` if the run would fail or train on garbage (see the module doc)."""
    paths = getattr(source, "paths", None)  # ParquetData (also a Criteo TSV conversion); RandomData has none
    if paths is not None:
        check_splits(paths, config.batch_size, world)
    text = config.model.text
    if text is None:
        return
    if not source.schema.sequences:
        raise PreflightError(f"{config.data_dir}: this data has no behaviour texts (no seq_* columns; dataset "
                             f"{source.schema.dataset!r}): use --arm dlrm, or write data with texts with bahe-data")
    if text.arm == "bahe" and paths is not None:
        store = BehaviourStore.open(text.store)
        sequences = [s for s in (text.sequences or source.schema.sequences) if s in source.schema.sequences]
        rate, unknown, total, rows = unknown_text_rate(paths["train"], store, sequences)
        if rate > config.max_unknown_text_rate:
            raise PreflightError(
                f"{rate:.1%} of the texts in the first {rows} rows of {paths['train']} ({unknown} of {total} "
                f"behaviour and item texts) are not in the behaviour store {store.path}, over the limit of "
                f"{config.max_unknown_text_rate:.1%} (--max-unknown-rate): the store was built for other data. "
                f"Refresh it: bahe-encode build --store {text.store} --data {paths['train']} {paths['valid']} "
                f"{paths['test']}")


def check_splits(paths: dict, batch_size: int, world: int) -> None:
    """Every split readable and of train's schema; valid / test not empty; train >= one global batch."""
    train = SampleReader(paths["train"])
    if train.num_rows < batch_size * world:
        raise PreflightError(f"{paths['train']} has {train.num_rows} rows, fewer than one global batch "
                             f"({batch_size} x {world} ranks); lower --batch-size")
    for split in ("valid", "test"):
        reader = SampleReader(paths[split])
        if reader.num_rows == 0:
            raise PreflightError(f"{paths[split]} has no rows: the {split} split is evaluated at the end of training; "
                                 "write it with rows (bahe-data splits the samples into train, valid and test)")
        differ = [f"{kind}: train has {list(getattr(train.schema, kind))}, {split} has {list(getattr(reader.schema, kind))}"
                  for kind in ("categorical", "dense", "sequences")
                  if getattr(train.schema, kind) != getattr(reader.schema, kind)]
        if differ:
            raise PreflightError(f"{paths[split]} has another schema than {paths['train']} ({'; '.join(differ)}): "
                                 "write the three splits of one dataset with the same bahe-data command")


def unknown_text_rate(path, store: BehaviourStore, sequences: list[str],
                      sample_rows: int = SAMPLE_ROWS) -> tuple[float, int, int, int]:
    """(share unknown, unknown texts, non-empty texts, rows read) over the first ``sample_rows`` rows of
    ``path``: the texts of ``sequences`` and the item texts, looked up in the store's text index (the one the
    batcher uses: opened once per process, no vocabulary in memory)."""
    tables, rows = [], 0
    for table in SampleReader(path).iter_batches(sample_rows):
        tables.append(table.slice(0, sample_rows - rows))
        rows += tables[-1].num_rows
        if rows >= sample_rows:
            break
    if not rows:
        return 0.0, 0, 0, 0
    table = pa.concat_tables(tables)
    texts = [pc.list_flatten(table.column(SEQ_PREFIX + name)) for name in sequences] + [table.column(ITEM_TEXT)]
    flat = pa.chunked_array([chunk for column in texts for chunk in column.chunks], pa.string())
    ids = store.text_index.lookup_array(flat, count=False)  # a look: the batcher's counters stay the data's own
    unknown, total = int((ids == UNKNOWN_ID).sum()), int((ids != PAD_ID).sum())
    return (unknown / total if total else 0.0), unknown, total, rows
