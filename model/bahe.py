"""The BAHE CTR model with TorchRec DLRM's contract (anchors.md), and its train wrapper.

``BAHE`` takes what ``torchrec.models.dlrm.DLRM`` takes -- an EmbeddingBagCollection of ID tables,
the dense input size, the dense and over arch layer sizes -- plus an optional
:class:`~model.text_arch.BehaviourTextArch`. Its arches are torchrec's own ``SparseArch``,
``DenseArch``, ``InteractionArch`` and ``OverArch`` under DLRM's attribute names, so:

* without a text arch it IS a DLRM (same modules, same state-dict keys, same numbers);
* with one, the N + 1 text features (user behaviour sequences, item text) join the F sparse
  features in the pairwise interaction: F' = F + N + 1;
* the frozen behaviour table lives under ``text_arch``, never under ``sparse_arch``, so code that
  attaches the sparse optimizer to ``model.sparse_arch.parameters()`` (dlrm_main) keeps working.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.dlrm import DenseArch, InteractionArch, OverArch, SparseArch, choose
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from bahe.model.text_arch import BehaviourTextArch
from bahe.model.token_baseline import TokenLevelTextArch


class BAHE(nn.Module):
    """DLRM + behaviour text features.

    Args:
        embedding_bag_collection: the ID tables (user, item, categorical features); one dim D.
        dense_in_features: number of dense features.
        dense_arch_layer_sizes: DenseArch sizes; the last must be D.
        over_arch_layer_sizes: OverArch sizes, ending in 1.
        text_arch: the behaviour text arch, or the token-level baseline's (None: a plain DLRM, the
            DLRM-only arm). It maps the batch's ``behaviour_features`` to B x T x D text features.
        dense_device: where to build the dense arches.

    Example::

        model = BAHE(ebc, dense_in_features=5, dense_arch_layer_sizes=[32, 16],
                     over_arch_layer_sizes=[32, 1], text_arch=text_arch)
        logits = model(dense, sparse_kjt, behaviour_kjt)   # B x 1, pre-sigmoid
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection, dense_in_features: int,
                 dense_arch_layer_sizes: list[int], over_arch_layer_sizes: list[int],
                 text_arch: BehaviourTextArch | TokenLevelTextArch | None = None, dense_device: torch.device | None = None):
        super().__init__()
        configs = embedding_bag_collection.embedding_bag_configs()
        if not configs:
            raise ValueError("BAHE needs at least one ID table in the embedding bag collection")
        dims = {c.name: c.embedding_dim for c in configs}
        if len(set(dims.values())) != 1:
            raise ValueError(f"every ID table must share one embedding dim D; got {dims}")
        dim = configs[0].embedding_dim
        if dense_arch_layer_sizes[-1] != dim:
            raise ValueError(f"the last dense arch layer ({dense_arch_layer_sizes[-1]}) must equal the tables' "
                             f"embedding dim D ({dim})")
        if text_arch is not None and text_arch.user_projection.out_features != dim:
            raise ValueError(f"the text arch projects to {text_arch.user_projection.out_features}, the tables use D={dim}")
        self.sparse_arch = SparseArch(embedding_bag_collection)
        self.dense_arch = DenseArch(dense_in_features, dense_arch_layer_sizes, device=dense_device)
        num_features = len(self.sparse_arch.sparse_feature_names) + (text_arch.num_text_features if text_arch else 0)
        self.inter_arch = InteractionArch(num_sparse_features=num_features)
        self.over_arch = OverArch(dim + choose(num_features, 2) + num_features, over_arch_layer_sizes,
                                  device=dense_device)
        self.text_arch = text_arch

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor,
                behaviour_features: KeyedJaggedTensor | None = None) -> torch.Tensor:
        """
        Args:
            dense_features: B x dense_in_features.
            sparse_features: KJT of the ID features.
            behaviour_features: KJT of behaviour-store ids (required when the model has a text arch).

        Returns:
            B x 1 logits (pre-sigmoid), as DLRM.
        """
        text_features = None
        if self.text_arch is not None:
            if behaviour_features is None:
                raise ValueError("this BAHE model has a text arch: pass behaviour_features (BaheBatch.behaviour_features)")
            text_features = self.text_arch(behaviour_features)  # B x (N + 1) x D
        return self.forward_from_text_features(dense_features, sparse_features, text_features)

    def forward_from_text_features(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor,
                                   text_features: torch.Tensor | None) -> torch.Tensor:
        """The interaction part of :meth:`forward`, from text features computed elsewhere (e.g. served from a
        cache, bahe.serving): dense_features B x dense_in_features, the ID features' KJT, text_features
        B x (N + 1) x D (N user sequence features, then the item text's) or None. Returns B x 1 logits."""
        embedded_dense = self.dense_arch(dense_features)  # B x D
        embedded_sparse = self.sparse_arch(sparse_features)  # B x F x D
        if text_features is not None:
            embedded_sparse = torch.cat([embedded_sparse, text_features], dim=1)  # B x F' x D
        return self.over_arch(self.inter_arch(dense_features=embedded_dense, sparse_features=embedded_sparse))


class BAHETrain(nn.Module):
    """DLRMTrain's contract: ``forward(batch) -> (loss, (loss, logits, labels))``, logits of shape B.

    Works with torchrec's ``Batch`` (no behaviours: the model must have no text arch) and with
    :class:`~model.batch.BaheBatch`.
    """

    def __init__(self, model: BAHE):
        super().__init__()
        self.model = model
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(self, batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits = self.model(batch.dense_features, batch.sparse_features,
                            getattr(batch, "behaviour_features", None)).squeeze(-1)
        loss = self.loss_fn(logits, batch.labels.float())
        return loss, (loss.detach(), logits.detach(), batch.labels.detach())
