"""What a server does around the exported predictor: sample-schema rows -> its input tensors, and the
cached text features looked up by user id and item title.

Written against the export's files and manifest only (no model), so it doubles as the reference for a
server in another language: docs/serving.md.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from bahe.ctr_data.schema import CAT_PREFIX, ITEM_TEXT, USER_ID
from bahe.embeddings.vocabulary import PAD_ID, UNKNOWN_ID, normalize_texts
from bahe.serving.export_store import ITEMS, USERS, ExportVersion


def request_tensors(table: pa.Table, manifest: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dense B x F_dense float32 raw values, id_values int64, id_lengths int64 F*B) of sample rows, in the
    layout the predictor takes (the manifest's dense_columns and id_features)."""
    dense = np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in manifest["dense_columns"]], axis=1)
    values, lengths = [], []
    for name in manifest["id_features"]:
        column = table.column(name).combine_chunks()
        if name.startswith(CAT_PREFIX):
            values.append(pc.list_flatten(column).to_numpy(zero_copy_only=False))
            lengths.append(pc.list_value_length(column).to_numpy(zero_copy_only=False))
        else:
            values.append(column.to_numpy(zero_copy_only=False))
            lengths.append(np.ones(len(column), dtype=np.int64))
    return (torch.from_numpy(dense.astype(np.float32).reshape(table.num_rows, -1)),
            torch.from_numpy(np.concatenate(values).astype(np.int64)),
            torch.from_numpy(np.concatenate(lengths).astype(np.int64)))


class FeatureCache:
    """An export version's text features in memory.

    Args:
        export: the version to serve (verified when opened).

    Example::

        cache = FeatureCache(ExportVersion.open("serving/ml"))
        user_text = cache.user_text(cache.user_rows(user_ids))            # B x N x D
        item_text = cache.item_text(cache.store_ids(titles))               # B x D
    """

    def __init__(self, export: ExportVersion):
        self.manifest = export.manifest
        users = export.table(USERS)
        self.user_ids = users.column(USER_ID).to_numpy()
        users = torch.from_numpy(export.user_matrix())  # U x N x D
        empty = torch.tensor(self.manifest["empty_user_features"], dtype=torch.float32).view(1, *users.shape[1:])
        self.users = torch.cat([users, empty])  # row U: a user without behaviours
        self.items = torch.from_numpy(export.item_matrix())  # I x D, row i = store id i
        texts = export.table(ITEMS).column("text").to_pylist()
        self._ids = {text: i for i, text in enumerate(texts) if i > UNKNOWN_ID}

    def user_rows(self, user_ids: np.ndarray) -> np.ndarray:
        """Row of each user in the cache; -1 for a user it does not hold (served as a user without behaviours)."""
        position = np.searchsorted(self.user_ids, user_ids)
        found = position < len(self.user_ids)
        found[found] = self.user_ids[position[found]] == np.asarray(user_ids)[found]
        return np.where(found, position, -1)

    def user_text(self, rows: np.ndarray) -> torch.Tensor:
        """B x N x D features of cache rows (``-1``: the features of a user with no behaviours)."""
        rows = np.asarray(rows, dtype=np.int64)
        return self.users.index_select(0, torch.from_numpy(np.where(rows < 0, len(self.user_ids), rows)))

    def store_ids(self, titles: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Store id of each item title, normalised as the store normalises texts: an empty title -> PAD_ID,
        a title the store has not encoded -> UNKNOWN_ID."""
        texts = normalize_texts(titles).to_pylist()
        return np.asarray([PAD_ID if not t else self._ids.get(t, UNKNOWN_ID) for t in texts], dtype=np.int64)

    def item_text(self, store_ids: np.ndarray) -> torch.Tensor:
        """B x D features of store ids."""
        return self.items.index_select(0, torch.from_numpy(np.asarray(store_ids, dtype=np.int64)))

    def for_rows(self, table: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
        """(user_text, item_text) of sample rows: their users' cached features, their titles' features."""
        return (self.user_text(self.user_rows(table.column(USER_ID).to_numpy())),
                self.item_text(self.store_ids(table.column(ITEM_TEXT))))
