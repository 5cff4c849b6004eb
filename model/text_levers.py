"""Two optional ways the text arch can use the deep layers' states (issue 17, item 3); both off by default.

* ``user_projection``: ``shared`` (one H -> D Linear for the N behaviour sequence types, BAHE's default) or
  ``per_type`` (:class:`PerTypeProjection`: each sequence type its own H -> D projection);
* ``user_aggregation``: ``pooled`` (mean / last pool of a sequence's states, then norm and projection) or
  ``target_attention`` (:func:`target_attention`: DIN-style attention over a user's behaviour positions with
  the item text feature as query). With target attention a user's features depend on the item, so they
  cannot be computed once per user and cached (bahe-export, cached scoring, --frozen-text-from refuse such
  a run: :func:`refuse_item_dependent`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

USER_PROJECTIONS = ("shared", "per_type")
USER_AGGREGATIONS = ("pooled", "target_attention")
# the score of a padding position before the softmax: finite, so a sequence with no real position gives
# a uniform softmax (then zeroed by the mask) and never NaN
_MASKED_SCORE = torch.finfo(torch.float32).min


class PerTypeProjection(nn.Module):
    """N independent H -> D linear projections, one per behaviour sequence type.

    Parameters: ``weight`` N x D x H, ``bias`` N x D; each type's slice is initialised as ``nn.Linear(H, D)``.

    Example::

        projection = PerTypeProjection(num_types=2, in_features=32, out_features=8)
        out = projection(states)    # B x 2 x M x 32 -> B x 2 x M x 8 (type n uses weight[n], bias[n])
    """

    def __init__(self, num_types: int, in_features: int, out_features: int):
        super().__init__()
        self.num_types, self.in_features, self.out_features = num_types, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_types, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_types, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.in_features)
        for n in range(self.num_types):  # nn.Linear's own initialisation, per type (fan-in H)
            nn.init.kaiming_uniform_(self.weight[n], a=math.sqrt(5))
            nn.init.uniform_(self.bias[n], -bound, bound)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """B x N x M x H (type n at index n of dim 1; M positions, 1 for pooled states) -> B x N x M x D."""
        return torch.einsum("bnmh,ndh->bnmd", states, self.weight) + self.bias.unsqueeze(1)

    def extra_repr(self) -> str:
        return f"num_types={self.num_types}, in_features={self.in_features}, out_features={self.out_features}"


def target_attention(values: torch.Tensor, real: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """DIN-style target attention over behaviour positions.

    Args:
        values: B x N x M x D per-position user features (also the keys).
        real: B x N x M bool, True at a real behaviour (False: padding).
        query: B x D, the item text feature.

    Returns:
        B x N x D: sum over the real positions m of softmax_m(values_m . query / sqrt(D)) x values_m; a
        sequence without real positions gives zeros; padding positions never contribute.
    """
    values = values.float()
    # D from the shape with operators only (no math.sqrt of it): TorchRec's train pipeline fx-traces this code
    scores = torch.einsum("bnmd,bd->bnm", values, query.float()) / values.shape[-1] ** 0.5
    weights = torch.softmax(scores.masked_fill(~real, _MASKED_SCORE), dim=-1) * real.float()
    return torch.einsum("bnm,bnmd->bnd", weights, values)


def refuse_item_dependent(user_aggregation: str | None, what: str, instead: str) -> None:
    """Raise ValueError (one line naming the flag) when a run's user features depend on the item.

    Args:
        user_aggregation: the run's ``--user-aggregation`` (None: a run recorded before the flag, pooled).
        what: the part that refuses, e.g. "bahe-export runs/x".
        instead: what the user can do, e.g. "score it with the full model (bahe-predict without --features)".
    """
    if user_aggregation not in (None, "pooled"):
        raise ValueError(f"{what}: the run was trained with --user-aggregation {user_aggregation}, so its user "
                         "text features depend on the item (attention with the item text as query) and cannot be "
                         f"computed once per user and cached; {instead}")
