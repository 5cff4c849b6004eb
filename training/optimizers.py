"""Optimisers: fused row-wise Adagrad in backward for the ID tables, AdamW for the dense parts (LLM
layers with their own learning rate), warm-up and decay, gradient clipping per group.

The frozen behaviour table already carries its own lr=0 in-backward optimizer (model/behaviour_lookup.py)
and is excluded from the dense groups by torchrec's ``in_backward_optimizer_filter``.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.optim import _apply_optimizer_in_backward
from torch.optim.lr_scheduler import LambdaLR
from torchrec.optim.clipping import GradientClipping, GradientClippingOptimizer
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from bahe.model.bahe import BAHE
from bahe.training.config import OptimConfig

LLM_PARAMETER_MARKERS = (".aggregator.decoder.", ".text_arch.deep.", ".text_arch.shallow.")


def attach_sparse_optimizer(model: BAHE, config: OptimConfig) -> None:
    """Fused row-wise Adagrad, applied inside backward, for every trainable ID table (call before DMP)."""
    _apply_optimizer_in_backward(RowWiseAdagrad, model.sparse_arch.parameters(), {"lr": config.sparse_lr})


def lr_factor(step: int, config: OptimConfig, total_steps: int) -> float:
    """Multiplier of the base learning rate at ``step``: 0.1 -> 1 over the warm-up, then decay to 0.1."""
    if step < config.warmup_steps:
        return 0.1 + 0.9 * step / max(config.warmup_steps, 1)
    if config.decay == "none":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(total_steps - config.warmup_steps, 1))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if config.decay == "cosine" else 1 - progress
    return 0.1 + 0.9 * shape


def build_optimizer(module: torch.nn.Module, fused: torch.optim.Optimizer, config: OptimConfig, total_steps: int
                    ) -> tuple[CombinedOptimizer, list[LambdaLR], dict[str, KeyedOptimizerWrapper]]:
    """The CombinedOptimizer for TrainPipelineSparseDist, its schedulers, and the dense groups by name."""
    dense = dict(in_backward_optimizer_filter(module.named_parameters()))
    llm = {n: p for n, p in dense.items() if any(m in "." + n for m in LLM_PARAMETER_MARKERS) and p.requires_grad}
    rest = {n: p for n, p in dense.items() if n not in llm and p.requires_grad}
    groups, parts = {}, [("sparse", fused)]
    for name, params, lr in (("dense", rest, config.dense_lr), ("llm", llm, config.llm_lr)):
        if not params:
            continue
        groups[name] = KeyedOptimizerWrapper(
            params, lambda ps, lr=lr: torch.optim.AdamW(ps, lr=lr, weight_decay=config.weight_decay))
        # Clipping wraps each group on its own (norm per group): a wrapper around a nested
        # CombinedOptimizer would snapshot its (still empty, AdamW is lazy) state and lose it from
        # every checkpoint.
        part = GradientClippingOptimizer(groups[name], clipping=GradientClipping.NORM,
                                         max_gradient=config.grad_clip) if config.grad_clip > 0 else groups[name]
        parts.append((name, part))
    schedulers = [LambdaLR(group, lambda step: lr_factor(step, config, total_steps)) for group in groups.values()]
    return CombinedOptimizer(parts), schedulers, groups
