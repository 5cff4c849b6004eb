"""Which dtype each linear layer of a model computed in: the check that a precision setting is applied
where it should be (the LLM's layers) and nowhere else (the head, the projections, the weights)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def linear_output_dtypes(module: nn.Module):
    """Yields {qualified name: set of output dtypes} for every ``nn.Linear`` under ``module``, filled
    by the forwards run inside the block. Under ``torch.autocast(bfloat16)`` a linear layer's weights
    and inputs stay fp32 but it computes, and returns, bf16: its output dtype is what it ran in."""
    seen: dict[str, set[torch.dtype]] = {}

    def hook(name):
        return lambda _module, _args, output: seen.setdefault(name, set()).add(output.dtype)

    handles = [m.register_forward_hook(hook(name)) for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def split_by_prefix(seen: dict[str, set[torch.dtype]], prefixes: tuple[str, ...]):
    """(dtypes of the linears under any of ``prefixes``, dtypes of all the others), each a set."""
    inside = {d for name, dtypes in seen.items() if name.startswith(prefixes) for d in dtypes}
    outside = {d for name, dtypes in seen.items() if not name.startswith(prefixes) for d in dtypes}
    return inside, outside
