"""Sample tables -> training batches in TorchRec's ``Batch`` layout, plus text behaviours.

A :class:`BaheBatch` is a ``torchrec.datasets.utils.Batch`` (dense_features B x F_dense,
sparse_features KeyedJaggedTensor of the ID features, labels B) with one more plain attribute,
``behaviour_features``: a KeyedJaggedTensor of behaviour-store ids, one key per behaviour
sequence type plus ``item_text``. Being a plain attribute of the batch, it is pipelined by
``TrainPipelineSparseDist`` like ``sparse_features``.

:class:`SampleBatcher` converts Arrow tables of the sample schema (``bahe.ctr_data.schema``) into
batches, vectorised:

* dense: ``log1p(max(x, 0))`` (DLRM's transform of Criteo counts), standardised with the train
  split's statistics when a :class:`~model.dense_features.DenseNormalizer` is given;
* ID features ``user_id``, ``item_id`` and every ``cat_<name>``: hashed ``id % num_embeddings``.
  An id at or beyond its table's rows is NOT an error: it shares a row with the ids equal to it
  modulo the table size (the hashing trick, DLRM's convention for Criteo's 40M-id features); such
  ids are counted. A negative id is an error naming the feature and the row of the batch (the
  trainer's reader, ``SampleReader(nonnegative_ids=...)``, refuses it first, naming the file and its row);
* behaviours: each sequence's texts -> store ids (all the batch's texts resolved in one lookup). Empty
  texts carry nothing and are dropped (counted); a text the store has not encoded -> the reserved
  unknown row (counted); of the rest, the ``max_behaviours`` most recent are kept, oldest first (the
  older ones dropped are counted); an empty sequence stays empty (length 0). The item text -> one id
  (none when the text is empty).

The counts accumulate in :attr:`SampleBatcher.counters` (:class:`BatcherCounters`) for the
trainer to log; :meth:`BatcherCounters.as_dict` gives them as flat name -> number pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from bahe.ctr_data.schema import CAT_PREFIX, ITEM_TEXT, LABEL, SEQ_PREFIX, DataError, SampleSchema
from bahe.embeddings.text_index import TextIndex
from bahe.embeddings.vocabulary import PAD_ID, UNKNOWN_ID, BehaviourVocabulary
from bahe.model.dense_features import DenseNormalizer, log1p_dense

ITEM_TEXT_KEY = "item_text"


@dataclass
class BaheBatch(Batch):
    """torchrec's Batch plus ``behaviour_features`` (KJT of store ids; None for the DLRM-only arm). Labels are
    int32 (B), as torchrec's Criteo loader gives them: a two-class AUROC takes them as they are, and the
    train wrappers cast them to float for the loss."""

    behaviour_features: KeyedJaggedTensor | None = None

    def to(self, device: torch.device, non_blocking: bool = False) -> BaheBatch:
        return BaheBatch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            behaviour_features=None if self.behaviour_features is None
            else self.behaviour_features.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        if self.behaviour_features is not None:
            self.behaviour_features.record_stream(stream)

    def pin_memory(self) -> BaheBatch:
        return BaheBatch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels=self.labels.pin_memory(),
            behaviour_features=None if self.behaviour_features is None else self.behaviour_features.pin_memory(),
        )


@dataclass
class BatcherCounters:
    """What a :class:`SampleBatcher` has mapped or dropped so far (running totals over its batches).

    Attributes:
        rows: sample rows batched.
        ids_beyond_table: per ID feature, ids >= the table's rows, folded in by ``id % rows``.
        empty_behaviour_texts: empty texts inside behaviour sequences, dropped.
        unknown_behaviours: behaviours kept whose text the store has not encoded (-> the unknown row).
        unknown_item_texts: non-empty item texts the store has not encoded (-> the unknown row).
        dropped_behaviours: behaviours older than the ``max_behaviours`` most recent of their sequence.
        empty_sequences: sequences (row x sequence type) with no behaviour left to the model.
    """

    rows: int = 0
    ids_beyond_table: dict[str, int] = field(default_factory=dict)
    empty_behaviour_texts: int = 0
    unknown_behaviours: int = 0
    unknown_item_texts: int = 0
    dropped_behaviours: int = 0
    empty_sequences: int = 0

    def as_dict(self) -> dict[str, int]:
        """Flat ``name -> count`` (``ids_beyond_table/<feature>`` per feature), e.g. for TensorBoard."""
        flat = {name: value for name, value in vars(self).items() if name != "ids_beyond_table"}
        flat.update({f"ids_beyond_table/{name}": n for name, n in self.ids_beyond_table.items()})
        return flat


def id_feature_names(schema: SampleSchema) -> list[str]:
    """The ID features of a schema, in KJT key order: user_id, item_id, then cat_<name>..."""
    return ["user_id", "item_id", *schema.categorical_columns]


def keep_most_recent(lengths: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """For a flattened list column: (mask of the values to keep, new lengths), keeping the last
    ``cap`` values of every row in their order."""
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    position = np.arange(lengths.sum()) - starts
    keep = position >= np.repeat(lengths - np.minimum(lengths, cap), lengths)
    return keep, np.minimum(lengths, cap)


class SampleBatcher:
    """Arrow tables of one sample schema -> :class:`BaheBatch`.

    Args:
        schema: the sample schema of the tables.
        table_sizes: rows of the hashed ID table per ID feature to read (see :func:`id_feature_names`);
            the data's ID features it leaves out are not read.
        vocabulary: what resolves texts to store rows: the store's ``text_index`` (memory-mapped,
            bahe.embeddings.text_index: a cost per batch that follows the batch) or an in-memory
            :class:`~bahe.embeddings.vocabulary.BehaviourVocabulary`; None builds batches without behaviours.
        sequence_names: the behaviour sequence types to read (default: all of the schema's).
        max_behaviours: M, the most recent (non-empty) behaviours kept per sequence.
        dense_normalizer: train statistics to standardise the dense features with (None: log1p only).
    """

    def __init__(self, schema: SampleSchema, table_sizes: dict[str, int],
                 vocabulary: TextIndex | BehaviourVocabulary | None = None,
                 sequence_names: tuple[str, ...] | None = None,
                 max_behaviours: int = 50, dense_normalizer: DenseNormalizer | None = None):
        self.schema = schema
        if dense_normalizer is not None and list(dense_normalizer.columns) != list(schema.dense_columns):
            raise ValueError(f"the dense statistics are for {list(dense_normalizer.columns)}, the data has "
                             f"{list(schema.dense_columns)}: fit them on this data's train split")
        self.dense_normalizer = dense_normalizer
        available = id_feature_names(schema)
        unknown = [name for name in table_sizes if name not in available]
        if unknown or not table_sizes:
            raise ValueError(f"table_sizes {sorted(table_sizes)} must name some of the data's ID features {available}; "
                             f"unknown: {unknown}")
        bad = {name: rows for name, rows in table_sizes.items()
               if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1}
        if bad:
            raise ValueError(f"table_sizes must be whole numbers of rows >= 1, got {bad}")
        self.id_features = [name for name in available if name in table_sizes]
        self.table_sizes = table_sizes
        self.vocabulary = vocabulary
        self.sequence_names = tuple(sequence_names if sequence_names is not None else schema.sequences)
        unknown = [n for n in self.sequence_names if n not in schema.sequences]
        if unknown:
            raise ValueError(f"sequence type(s) {unknown} are not in the data, which has {list(schema.sequences)}")
        if max_behaviours < 1:
            raise ValueError(f"max_behaviours must be >= 1, got {max_behaviours}")
        self.max_behaviours = max_behaviours
        self.counters = BatcherCounters(ids_beyond_table=dict.fromkeys(self.id_features, 0))

    @property
    def behaviour_keys(self) -> list[str]:
        return [SEQ_PREFIX + n for n in self.sequence_names] + [ITEM_TEXT_KEY]

    def _id_features(self, table: pa.Table) -> KeyedJaggedTensor:
        values, lengths = [], []
        for name in self.id_features:
            column = table.column(name).combine_chunks()
            if name.startswith(CAT_PREFIX):
                flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
                count = pc.list_value_length(column).to_numpy(zero_copy_only=False)
            else:
                flat = column.to_numpy(zero_copy_only=False)
                count = np.ones(len(flat), dtype=np.int64)
            if len(flat) and flat.min() < 0:
                first = int(np.flatnonzero(flat < 0)[0])
                row = int(np.searchsorted(np.cumsum(count), first, side="right"))
                raise DataError(f"ids must be >= 0, found {int(flat[first])} in row {row} of the batch; ids are "
                                "hashed into the table (id % rows), so map negative ids to non-negative ones when "
                                "writing the data", field=name)
            rows = self.table_sizes[name]
            self.counters.ids_beyond_table[name] += int(np.count_nonzero(flat >= rows))
            values.append(flat.astype(np.int64) % rows)
            lengths.append(count.astype(np.int64))
        return KeyedJaggedTensor.from_lengths_sync(
            keys=self.id_features, values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)))

    def _behaviour_texts(self, table: pa.Table) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """Store rows of the batch's texts, resolved in ONE lookup (one normalisation, one hash per distinct
        text): (per sequence type its flat rows, per sequence type its lengths, the item texts' rows)."""
        columns = [table.column(SEQ_PREFIX + name).combine_chunks() for name in self.sequence_names]
        parts = [pc.list_flatten(column) for column in columns] + [table.column(ITEM_TEXT)]
        chunks = [chunk for part in parts for chunk in (part.chunks if isinstance(part, pa.ChunkedArray) else [part])]
        if len({chunk.type for chunk in chunks}) > 1:
            chunks = [pc.cast(chunk, pa.large_string()) for chunk in chunks]
        ids = self.vocabulary.lookup_array(pa.chunked_array(chunks, chunks[0].type))
        sizes = np.cumsum([len(part) for part in parts])[:-1]
        *flat, item = np.split(ids, sizes)
        lengths = [pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64) for column in columns]
        return flat, lengths, item

    def _behaviour_features(self, table: pa.Table) -> KeyedJaggedTensor:
        values, lengths = [], []
        counters = self.counters
        flat_ids, flat_lengths, item = self._behaviour_texts(table)
        for ids, count in zip(flat_ids, flat_lengths):
            padless = ids != PAD_ID  # an empty text inside a sequence carries nothing: drop it first
            if not padless.all():
                counters.empty_behaviour_texts += int(len(ids) - padless.sum())
                owners = np.repeat(np.arange(len(count)), count)
                count = np.bincount(owners[padless], minlength=len(count)).astype(np.int64)
                ids = ids[padless]
            keep, capped = keep_most_recent(count, self.max_behaviours)
            counters.dropped_behaviours += int(count.sum() - capped.sum())
            ids, count = ids[keep], capped
            counters.unknown_behaviours += int(np.count_nonzero(ids == UNKNOWN_ID))
            counters.empty_sequences += int(np.count_nonzero(count == 0))
            values.append(ids)
            lengths.append(count)
        counters.unknown_item_texts += int(np.count_nonzero(item == UNKNOWN_ID))
        values.append(item[item != PAD_ID])
        lengths.append((item != PAD_ID).astype(np.int64))
        return KeyedJaggedTensor.from_lengths_sync(
            keys=self.behaviour_keys, values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)))

    def __call__(self, table: pa.Table) -> BaheBatch:
        needed = [LABEL, *self.id_features, *self.schema.dense_columns]
        if self.vocabulary is not None:
            needed += [SEQ_PREFIX + n for n in self.sequence_names] + [ITEM_TEXT]
        missing = [name for name in needed if name not in table.column_names]
        if missing:
            raise DataError(f"the table lacks column(s) {missing} of the schema this batcher was built for; "
                            "read it with bahe.ctr_data.parquet_io.SampleReader", field=missing[0])
        self.counters.rows += table.num_rows
        dense = self.dense_normalizer(table) if self.dense_normalizer is not None \
            else log1p_dense(table, tuple(self.schema.dense_columns)).astype(np.float32)
        return BaheBatch(
            dense_features=torch.from_numpy(dense),
            sparse_features=self._id_features(table),
            labels=torch.from_numpy(table.column(LABEL).to_numpy(zero_copy_only=False).astype(np.int32)),
            behaviour_features=self._behaviour_features(table) if self.vocabulary is not None else None,
        )

