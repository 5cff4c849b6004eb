"""The text features a BAHE run serves from a cache, computed by the run's own text arch.

* Item text features: one per row of the behaviour store (every distinct text, item titles among them):
  the row's vector through the LLM's deep layers as a length-1 sequence, the item norm and projection
  (:meth:`BehaviourTextArch.item_text_features`): D floats. Store id 0 (``<pad>``) is computed as an EMPTY
  item text (no behaviour, length 0), as the model sees a sample without a title; store id 1 (``<unknown>``)
  is the feature of a title the store has not encoded.
* User text features: for each user, the behaviours of the user's most recent sample at or before the
  cut-off (``as_of``; ties: the later row in file order), kept as the model keeps them (empty texts
  dropped, unknown texts -> the unknown row, the M most recent), through the deep layers, user norm and
  projection (:meth:`BehaviourTextArch.user_text_features`): N x D floats, the N sequence types in the
  run's order, and the store ids they came from.

Both run the model's own lookup and batcher, so a served logit equals the model's logit on the same
sample (serving/predictor.py).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from tqdm import tqdm

from bahe.ctr_data.schema import SEQ_PREFIX, TIMESTAMP, USER_ID
from bahe.embeddings.vocabulary import PAD_ID
from bahe.model.batch import ITEM_TEXT_KEY, SampleBatcher
from bahe.model.text_arch import BehaviourTextArch
from bahe.serving.scoring_io import ScoreInput, read_rows


@dataclass
class UserBehaviours:
    """Each user's behaviours as of a cut-off: U users, sorted by user id.

    Attributes:
        rows: the users' most recent samples (the run's columns), one per user.
        user_ids, as_of: U user ids and the timestamps of those samples.
        offsets, values: per sequence type (``seq_<name>``), the store ids the model reads, oldest first:
            user u's are ``values[offsets[u]:offsets[u + 1]]``.
    """

    rows: pa.Table
    user_ids: np.ndarray
    as_of: np.ndarray
    offsets: dict[str, np.ndarray]
    values: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.user_ids)


def last_per_user(table: pa.Table) -> pa.Table:
    """The most recent row of each user (largest timestamp; ties: the later row), sorted by user id."""
    if table.num_rows == 0:
        return table
    users = table.column(USER_ID).to_numpy()
    order = np.lexsort((np.arange(table.num_rows), table.column(TIMESTAMP).to_numpy(), users))
    ordered = users[order]
    last = np.append(ordered[1:] != ordered[:-1], True)
    return table.take(pa.array(order[last]))


def latest_samples(inputs: list[ScoreInput], batcher: SampleBatcher, as_of: int | None,
                   chunk_rows: int = 65_536) -> pa.Table:
    """Each user's most recent sample at or before ``as_of`` (None: no cut-off) over the sample files,
    streamed (validated as bahe-predict reads them: a bad row names its file, row and field)."""
    total = sum(source.rows for source in inputs)
    best: pa.Table | None = None
    for table in read_rows(inputs, 0, total, batcher.schema, tuple(batcher.id_features), chunk_rows):
        if as_of is not None:
            table = table.filter(pc.less_equal(table.column(TIMESTAMP), as_of))
        best = last_per_user(table if best is None else pa.concat_tables([best, table]))
    if best is None:
        return batcher.schema.arrow_schema().empty_table()
    return best


def _jagged(kjt: KeyedJaggedTensor, key: str) -> tuple[np.ndarray, np.ndarray]:
    jt = kjt[key]
    return jt.offsets().numpy().astype(np.int64), jt.values().numpy().astype(np.int64)


def user_behaviours(rows: pa.Table, batcher: SampleBatcher, sequence_keys: list[str]) -> UserBehaviours:
    """The store ids the model reads for each user's sample (the run's batcher: normalised texts, empty ones
    dropped, the M most recent kept)."""
    batch = batcher(rows)
    offsets, values = {}, {}
    for key in sequence_keys:
        offsets[key], values[key] = _jagged(batch.behaviour_features, key)
    return UserBehaviours(rows, rows.column(USER_ID).to_numpy().astype(np.int64),
                          rows.column(TIMESTAMP).to_numpy().astype(np.int64), offsets, values)


def _batches(count: int, batch_size: int, desc: str, show_progress: bool) -> Iterator[slice]:
    bar = tqdm(total=count, unit="row", desc=desc, file=sys.stderr, disable=not show_progress)
    with bar:
        for start in range(0, count, batch_size):
            yield slice(start, min(start + batch_size, count))
            bar.update(min(batch_size, count - start))


@torch.no_grad()
def user_features(text_arch: BehaviourTextArch, batcher: SampleBatcher, rows: pa.Table, *, batch_size: int = 256,
                  show_progress: bool = False) -> np.ndarray:
    """U x N x D float32 user text features of ``rows`` (one sample per user), batch by batch."""
    keys = text_arch.sequence_keys
    out = np.zeros((rows.num_rows, len(keys), text_arch.user_projection.out_features), dtype=np.float32)
    for part in _batches(rows.num_rows, batch_size, "user text features", show_progress):
        looked_up = text_arch.lookup(batcher(rows.slice(part.start, part.stop - part.start)).behaviour_features)
        vectors = torch.stack([looked_up[k][0] for k in keys], dim=1)  # b x N x M x H
        lengths = torch.stack([looked_up[k][1] for k in keys], dim=1)  # b x N
        out[part] = text_arch.user_text_features(vectors, lengths).float().numpy()
    return out


@torch.no_grad()
def empty_user_features(text_arch: BehaviourTextArch) -> np.ndarray:
    """N x D float32: the user text features of a user without behaviours (every sequence empty), which a
    server uses for a user its cache does not hold."""
    keys = text_arch.sequence_keys
    width = text_arch.lookup.max_lengths[keys[0]]
    vectors = torch.zeros(1, len(keys), width, text_arch.aggregator.hidden_size)
    return text_arch.user_text_features(vectors, torch.zeros(1, len(keys), dtype=torch.long))[0].float().numpy()


@torch.no_grad()
def item_features(text_arch: BehaviourTextArch, store_ids: np.ndarray, *, batch_size: int = 1024,
                  show_progress: bool = False) -> np.ndarray:
    """I x D float32 item text features of behaviour-store rows (``PAD_ID``: an empty item text)."""
    keys = text_arch.lookup.keys
    out = np.zeros((len(store_ids), text_arch.item_projection.out_features), dtype=np.float32)
    for part in _batches(len(store_ids), batch_size, "item text features", show_progress):
        ids = torch.from_numpy(np.asarray(store_ids[part], dtype=np.int64))
        present = (ids != PAD_ID).long()
        lengths = torch.cat([present if key == ITEM_TEXT_KEY else torch.zeros_like(present) for key in keys])
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=list(keys), values=ids[present.bool()], lengths=lengths)
        out[part] = text_arch.item_text_features(*text_arch.lookup(kjt)[ITEM_TEXT_KEY]).float().numpy()
    return out


def same_lists(a_offsets: np.ndarray, a_values: np.ndarray, b_offsets: np.ndarray, b_values: np.ndarray) -> np.ndarray:
    """Row-wise equality of two jagged id lists with the same number of rows (offsets of rows+1): a bool mask."""
    a_len, b_len = np.diff(a_offsets), np.diff(b_offsets)
    same = a_len == b_len
    rows = np.flatnonzero(same)
    length = a_len[rows]
    within = np.arange(length.sum()) - np.repeat(np.cumsum(length) - length, length)
    differs = a_values[np.repeat(a_offsets[rows], length) + within] != b_values[np.repeat(b_offsets[rows], length) + within]
    same[rows[np.repeat(np.arange(len(rows)), length)[differs]]] = False
    return same


def sequence_name(key: str) -> str:
    """``seq_liked`` -> ``liked``."""
    return key[len(SEQ_PREFIX):] if key.startswith(SEQ_PREFIX) else key
