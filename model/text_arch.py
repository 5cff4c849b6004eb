"""The text side of BAHE: behaviour lookup -> deep-layer aggregation -> projection to D.

``BehaviourTextArch`` turns a KJT of store ids (N behaviour sequence types + the item text) into
N + 1 "text features" of the embedding dim D, which the interaction arch treats like sparse
features:

* feature parallel (bahe.md, step 3): the N sequence types of a batch run as ONE (B*N) x M x H
  batch through the shared deep layers, then split back into B x N x H (Q_u^1 .. Q_u^N);
* item side (step 4): the item text's vector goes through the same layers as a length-1
  sequence (Q_i);
* a linear projection maps H -> D (one for user sequences, one for the item).

Two options (model/text_levers.py; the defaults are BAHE's): ``user_projection="per_type"`` gives each
sequence type its own H -> D projection; ``user_aggregation="target_attention"`` replaces the pool over a
user's behaviour positions by attention with the item text feature as query (user features then depend on
the item: no per-user cache can serve them).
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from bahe.model.batch import ITEM_TEXT_KEY
from bahe.model.behaviour_lookup import BehaviourLookup
from bahe.model.deep_layers import DeepLayerAggregator
from bahe.model.text_levers import USER_AGGREGATIONS, USER_PROJECTIONS, PerTypeProjection, target_attention


class BehaviourTextArch(nn.Module):
    """Args:
        lookup: the frozen behaviour table (keys: ``seq_<name>`` per sequence type, ``item_text``).
        aggregator: the LLM's deep layers.
        sequence_keys: the N sequence keys, in the order their features are emitted.
        embedding_dim: D of the interaction arch.
        user_projection: ``shared`` (one H -> D Linear for the N types) or ``per_type``
            (:class:`~model.text_levers.PerTypeProjection`, weight N x D x H).
        user_aggregation: ``pooled`` (the deep layers' pool, then norm and projection) or
            ``target_attention`` (per-position states normed and projected to D, attended with the item
            text feature as query: :func:`~model.text_levers.target_attention`).

    Example::

        text = BehaviourTextArch(lookup, aggregator, ["seq_liked", "seq_disliked"], embedding_dim=64)
        features = text(kjt)    # B x 3 x 64: liked, disliked, item
    """

    def __init__(self, lookup: BehaviourLookup, aggregator: DeepLayerAggregator, sequence_keys: list[str],
                 embedding_dim: int, *, user_projection: str = "shared", user_aggregation: str = "pooled"):
        super().__init__()
        if user_projection not in USER_PROJECTIONS:
            raise ValueError(f"user_projection must be one of {USER_PROJECTIONS}, got {user_projection!r}")
        if user_aggregation not in USER_AGGREGATIONS:
            raise ValueError(f"user_aggregation must be one of {USER_AGGREGATIONS}, got {user_aggregation!r}")
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
        if user_projection == "shared":
            self.user_projection = nn.Linear(aggregator.hidden_size, embedding_dim)
        else:
            self.user_projection = PerTypeProjection(len(self.sequence_keys), aggregator.hidden_size, embedding_dim)
        self.user_projection_mode, self.user_aggregation = user_projection, user_aggregation
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
        if self.user_aggregation == "target_attention":  # the item feature is the user side's query
            item = self.item_text_features(*looked_up[ITEM_TEXT_KEY])  # B x D
            user = self.user_text_features(vectors, lengths, item)  # B x N x D
        else:
            user = self.user_text_features(vectors, lengths)  # B x N x D
            item = self.item_text_features(*looked_up[ITEM_TEXT_KEY])  # B x D
        return torch.cat([user, item.unsqueeze(1)], dim=1)

    def user_text_features(self, vectors: torch.Tensor, lengths: torch.Tensor,
                           item: torch.Tensor | None = None) -> torch.Tensor:
        """The user side alone, from looked-up behaviour vectors (what a serving cache stores per user).

        Args:
            vectors: B x N x M x H behaviour vectors, right-padded, the N sequence types in ``sequence_keys`` order.
            lengths: B x N real behaviours per sequence.
            item: B x D item text features (:meth:`item_text_features`), the query of target attention;
                required with ``user_aggregation="target_attention"``, unused otherwise.

        Returns:
            B x N x D: the deep layers over the B*N sequences in one shared pass, pooled, normed, projected
            (target attention: per position normed, projected, attended with ``item`` as query).
        """
        types, hidden = len(self.sequence_keys), self.aggregator.hidden_size
        if self.user_aggregation == "target_attention":
            if item is None:
                raise ValueError("this text arch was built with user_aggregation target_attention "
                                 "(--user-aggregation target_attention): its user features depend on the item; "
                                 "pass the item text features (item=...)")
            return self.attended_user_features(vectors, lengths, item)
        pooled = self.aggregator(vectors.flatten(0, 1), lengths.flatten())  # (B*N) x H, one shared pass
        if self.user_projection_mode == "shared":
            return self.user_projection(self.user_norm(pooled.view(-1, types, hidden)))
        return self.user_projection(self.user_norm(pooled.view(-1, types, 1, hidden))).squeeze(2)  # per type

    def attended_user_features(self, vectors: torch.Tensor, lengths: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """Target attention: B x N x M x H vectors, B x N lengths, B x D item features -> B x N x D.

        The B*N sequences run through the deep layers in one shared pass; each position's state is normed
        and projected to D (the user projection: keys = values, B x N x M x D), then attended with the item
        feature as query over the real positions (an empty sequence gives zeros)."""
        types = len(self.sequence_keys)
        states = self.aggregator(vectors.flatten(0, 1), lengths.flatten(), pooled=False)  # (B*N) x M x H
        values = self.user_projection(self.user_norm(states.unflatten(0, (-1, types))))  # B x N x M x D
        real = torch.arange(vectors.shape[2], device=lengths.device) < lengths.unsqueeze(-1)  # B x N x M
        return target_attention(values, real, item)

    def item_text_features(self, vectors: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The item side alone (what a serving cache stores per item text).

        Args:
            vectors: B x 1 x H item-text vectors.
            lengths: B, 1 for a text, 0 for an empty one.

        Returns:
            B x D.
        """
        return self.item_projection(self.item_norm(self.aggregator(vectors, lengths)))
