"""The text side of BAHE: behaviour lookup -> deep-layer aggregation -> projection to D.

``BehaviourTextArch`` turns a KJT of store ids (N behaviour sequence types + the item text) into
N + 1 "text features" of the embedding dim D, which the interaction arch treats like sparse
features:

* feature parallel (bahe.md, step 3): the N sequence types of a batch run as ONE (B*N) x M x H
  batch through the shared deep layers, then split back into B x N x H (Q_u^1 .. Q_u^N);
* item side (step 4): the item text's vector goes through the same layers as a length-1
  sequence (Q_i);
* a linear projection maps H -> D (one for user sequences, one for the item).
"""

from __future__ import annotations

import torch
from bahe.model.batch import ITEM_TEXT_KEY
from bahe.model.behaviour_lookup import BehaviourLookup
from bahe.model.deep_layers import DeepLayerAggregator
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


class BehaviourTextArch(nn.Module):
    """Args:
        lookup: the frozen behaviour table (keys: ``seq_<name>`` per sequence type, ``item_text``).
        aggregator: the LLM's deep layers.
        sequence_keys: the N sequence keys, in the order their features are emitted.
        embedding_dim: D of the interaction arch.

    Example::

        text = BehaviourTextArch(lookup, aggregator, ["seq_liked", "seq_disliked"], embedding_dim=64)
        features = text(kjt)    # B x 3 x 64: liked, disliked, item
    """

    def __init__(self, lookup: BehaviourLookup, aggregator: DeepLayerAggregator, sequence_keys: list[str],
                 embedding_dim: int):
        super().__init__()
        if lookup.dim != aggregator.hidden_size:
            raise ValueError(f"the behaviour store's vectors are {lookup.dim}-dim but the LLM's deep layers take "
                             f"{aggregator.hidden_size}: encode the store with the same model")
        missing = [k for k in [*sequence_keys, ITEM_TEXT_KEY] if k not in lookup.keys]
        if missing:
            raise ValueError(f"the behaviour lookup does not serve {missing}")
        widths = {lookup.max_lengths[k] for k in sequence_keys}
        if len(widths) != 1 or lookup.max_lengths[ITEM_TEXT_KEY] != 1:
            raise ValueError("every behaviour sequence must share one max length M and the item text must have "
                             f"max length 1; got {lookup.max_lengths}")
        self.lookup, self.aggregator = lookup, aggregator
        self.sequence_keys = list(sequence_keys)
        # LLM hidden states carry a few huge, nearly constant channels; the variation between users
        # lives in the rest. A LayerNorm per side rescales that before projecting to D.
        self.user_norm = nn.LayerNorm(aggregator.hidden_size)
        self.item_norm = nn.LayerNorm(aggregator.hidden_size)
        self.user_projection = nn.Linear(aggregator.hidden_size, embedding_dim)
        self.item_projection = nn.Linear(aggregator.hidden_size, embedding_dim)

    @property
    def num_text_features(self) -> int:
        return len(self.sequence_keys) + 1

    def forward(self, behaviour_features: KeyedJaggedTensor) -> torch.Tensor:
        """Returns B x (N + 1) x D: one feature per sequence type, then the item text's.

        Written with static shapes only: TorchRec's train pipeline fx-traces this module (it holds
        the sharded lookup), and traced code cannot branch on tensor shapes.
        """
        looked_up = self.lookup(behaviour_features)
        vectors = torch.stack([looked_up[k][0] for k in self.sequence_keys], dim=1)  # B x N x M x H
        lengths = torch.stack([looked_up[k][1] for k in self.sequence_keys], dim=1)  # B x N
        user = self.user_text_features(vectors, lengths)  # B x N x D
        item = self.item_text_features(*looked_up[ITEM_TEXT_KEY])  # B x D
        return torch.cat([user, item.unsqueeze(1)], dim=1)

    def user_text_features(self, vectors: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The user side alone, from looked-up behaviour vectors (what a serving cache stores per user).

        Args:
            vectors: B x N x M x H behaviour vectors, right-padded, the N sequence types in ``sequence_keys`` order.
            lengths: B x N real behaviours per sequence.

        Returns:
            B x N x D: the deep layers over the B*N sequences in one shared pass, pooled, normed, projected.
        """
        pooled = self.aggregator(vectors.flatten(0, 1), lengths.flatten())  # (B*N) x H, one shared pass
        return self.user_projection(self.user_norm(pooled.view(-1, len(self.sequence_keys), self.aggregator.hidden_size)))

    def item_text_features(self, vectors: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The item side alone (what a serving cache stores per item text).

        Args:
            vectors: B x 1 x H item-text vectors.
            lengths: B, 1 for a text, 0 for an empty one.

        Returns:
            B x D.
        """
        return self.item_projection(self.item_norm(self.aggregator(vectors, lengths)))
