"""The behaviour store as a frozen TorchRec table (bahe.md, "How it maps onto TorchRec").

One ``EmbeddingCollection`` table, ``behaviours`` (store rows x store dim), serves every behaviour
sequence type and the item text: one copy of the table, one vector per position. Why an
EmbeddingCollection rather than an EmbeddingBagCollection with bags of one: docs/decisions.md.

Frozen bit-exactly: the table gets its own in-backward SGD with lr=0.0 at construction (fbgemm's
fused kernels would otherwise update it with a default SGD), and trainers build their dense
optimizer from parameters WITHOUT an in-backward optimizer (torchrec's
``in_backward_optimizer_filter``), so nothing else touches it. The weights come from the store
after DistributedModelParallel has sharded the table: :func:`load_store_rows` copies into every
local shard only the rows and columns that shard holds.
"""

from __future__ import annotations

import torch
from bahe.embeddings.store import BehaviourStore
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec import EmbeddingCollection, EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

BEHAVIOUR_TABLE = "behaviours"


class BehaviourLookup(nn.Module):
    """Store ids -> behaviour vectors, padded per key.

    Args:
        num_rows: rows of the store (its vocabulary size).
        dim: H, the store's vector size (the LLM hidden size).
        keys: the KJT keys served (``seq_<name>`` per sequence type, ``item_text``).
        max_lengths: M per key; inputs must not be longer (SampleBatcher caps them, keeping the most
            recent M).
        device: where to build the table (``meta`` before DistributedModelParallel).

    Example::

        lookup = BehaviourLookup(1664, 576, ["seq_liked", "item_text"], {"seq_liked": 50, "item_text": 1})
        vectors, lengths = lookup(kjt)["seq_liked"]   # B x 50 x 576, B
    """

    def __init__(self, num_rows: int, dim: int, keys: list[str], max_lengths: dict[str, int],
                 device: torch.device | None = None):
        super().__init__()
        missing = [k for k in keys if k not in max_lengths]
        if missing:
            raise ValueError(f"max_lengths lacks {missing}")
        self.keys, self.max_lengths, self.dim = list(keys), dict(max_lengths), dim
        self.embedding_collection = EmbeddingCollection(
            tables=[EmbeddingConfig(name=BEHAVIOUR_TABLE, embedding_dim=dim, num_embeddings=num_rows,
                                    feature_names=list(keys))],
            device=device)
        _apply_optimizer_in_backward(torch.optim.SGD, self.embedding_collection.parameters(), {"lr": 0.0})

    def forward(self, features: KeyedJaggedTensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            features: KJT of store ids with (at least) this module's keys; stride B.

        Returns:
            key -> (B x M_key x H right-padded vectors, B lengths <= M_key).
        """
        jagged = self.embedding_collection(features)
        out = {}
        for key in self.keys:
            jt = jagged[key]
            lengths = jt.lengths()
            width = self.max_lengths[key]
            # the batcher already kept the most recent M (SampleBatcher.max_behaviours); no host sync here
            padded = torch.ops.fbgemm.jagged_to_padded_dense(jt.values(), [jt.offsets()], [width], 0.0)
            out[key] = (padded, lengths)
        return out


def load_store_rows(model: nn.Module, store: BehaviourStore) -> int:
    """Copy the store's vectors into the (sharded or plain) behaviour table of ``model``.

    Call it AFTER DistributedModelParallel has wrapped the model. Each rank reads from the store
    only the rows of the shards it holds (a rank may hold none). Returns the rows read here.
    """
    suffix = f"embeddings.{BEHAVIOUR_TABLE}.weight"
    targets = [(name, t) for name, t in model.state_dict().items() if name.endswith(suffix)]
    if not targets:
        raise ValueError(f"the model has no behaviour table (no state-dict key ending in {suffix!r})")
    rows_read = 0
    for name, tensor in targets:
        shape = tensor.size() if isinstance(tensor, ShardedTensor) else tensor.shape
        if tuple(shape) != (store.rows_count, store.dim):
            raise ValueError(f"{name} is {tuple(shape)}, the store {store.path} is ({store.rows_count}, {store.dim}): "
                             "build the model from this store's size, or point it at the right store")
        if isinstance(tensor, ShardedTensor):
            for shard in tensor.local_shards():
                (row, col), (n_rows, n_cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                block = torch.from_numpy(store.rows(row, row + n_rows)[:, col:col + n_cols])
                with torch.no_grad():
                    shard.tensor.copy_(block)
                rows_read += n_rows
        else:
            with torch.no_grad():
                tensor.copy_(torch.from_numpy(store.rows(0, store.rows_count)))
            rows_read += store.rows_count
    return rows_read
