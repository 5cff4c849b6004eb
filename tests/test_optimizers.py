"""training/optimizers.py: the dense learning-rate schedule (``lr_factor``: warm-up 0.1 -> 1, then cosine or
linear decay to 0.1, or none) and gradient clipping (``build_optimizer``: the L2 norm of each dense
group's gradients, dense and llm, clipped to ``grad_clip`` on its own; 0 = off), checked against the
formulas written out here and against gradients of known norm."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper

from bahe.training.config import OptimConfig
from bahe.training.optimizers import build_optimizer, lr_factor

TOTAL = 120
WARMUP = 20


def expected_factor(step: int, warmup: int, total: int, decay: str) -> float:
    """The schedule as documented: linear warm-up from 10% to 100% over ``warmup`` steps, then from 100%
    down to 10% at ``total`` (cosine or linear), 10% after it; ``none`` stays at 100% after warm-up."""
    if step < warmup:
        return 0.1 + 0.9 * step / warmup
    if decay == "none":
        return 1.0
    t = min(1.0, (step - warmup) / (total - warmup))
    if decay == "cosine":
        return 0.1 + 0.45 * (1 + math.cos(math.pi * t))
    return 1.0 - 0.9 * t


@pytest.mark.parametrize("decay", ["cosine", "linear", "none"])
def test_lr_factor_equals_the_formula_at_every_step(decay):
    config = OptimConfig(warmup_steps=WARMUP, decay=decay)
    for step in range(TOTAL + 30):
        assert lr_factor(step, config, TOTAL) == pytest.approx(expected_factor(step, WARMUP, TOTAL, decay), abs=1e-12)


@pytest.mark.parametrize("decay", ["cosine", "linear", "none"])
def test_warm_up_rises_from_a_tenth_to_one(decay):
    config = OptimConfig(warmup_steps=WARMUP, decay=decay)
    warm = [lr_factor(step, config, TOTAL) for step in range(WARMUP + 1)]
    assert warm[0] == pytest.approx(0.1)
    assert warm[WARMUP // 2] == pytest.approx(0.55)
    assert warm[WARMUP] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(warm, warm[1:]))  # strictly increasing


def test_decay_shapes_at_chosen_steps():
    """After warm-up: cosine is 0.55 halfway and flat at both ends; linear loses 0.9 / (total - warmup) per
    step; both reach 0.1 at the last step and stay there; none stays at 1."""
    cosine, linear, none = (OptimConfig(warmup_steps=WARMUP, decay=d) for d in ("cosine", "linear", "none"))
    span = TOTAL - WARMUP
    half, quarter = WARMUP + span // 2, WARMUP + span // 4
    assert lr_factor(half, cosine, TOTAL) == pytest.approx(0.55)
    assert lr_factor(quarter, cosine, TOTAL) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(half, linear, TOTAL) == pytest.approx(0.55)
    assert lr_factor(quarter, linear, TOTAL) == pytest.approx(1 - 0.9 / 4)
    for step in range(WARMUP, TOTAL):
        assert lr_factor(step, linear, TOTAL) - lr_factor(step + 1, linear, TOTAL) == pytest.approx(0.9 / span)
    # cosine falls slower than linear in the first half and faster in the second
    assert lr_factor(quarter, cosine, TOTAL) > lr_factor(quarter, linear, TOTAL)
    assert lr_factor(TOTAL - span // 4, cosine, TOTAL) < lr_factor(TOTAL - span // 4, linear, TOTAL)
    for config in (cosine, linear):
        assert lr_factor(TOTAL, config, TOTAL) == pytest.approx(0.1)
        assert lr_factor(TOTAL + 50, config, TOTAL) == pytest.approx(0.1)  # never below the floor
        decayed = [lr_factor(s, config, TOTAL) for s in range(WARMUP, TOTAL + 1)]
        assert all(b < a for a, b in zip(decayed, decayed[1:]))
    assert {lr_factor(s, none, TOTAL) for s in range(WARMUP, TOTAL + 50)} == {1.0}


def test_no_warm_up_starts_at_one():
    config = OptimConfig(warmup_steps=0, decay="linear")
    assert lr_factor(0, config, 10) == pytest.approx(1.0)
    assert lr_factor(5, config, 10) == pytest.approx(0.55)


class Toy(nn.Module):
    """Parameters named as BAHE's: a dense group (``over``), an LLM group (``text_arch.deep``) and an ID
    table trained in backward (excluded from both)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.over = nn.Linear(4, 3)
        self.text_arch = nn.Module()
        self.text_arch.deep = nn.Linear(3, 2)
        self.table = nn.Embedding(5, 4)
        _apply_optimizer_in_backward(torch.optim.SGD, self.table.parameters(), {"lr": 0.0})


def optimizer_for(model: Toy, config: OptimConfig, total: int = TOTAL):
    fused = KeyedOptimizerWrapper({"table.weight": model.table.weight},
                                  lambda ps: torch.optim.SGD(ps, lr=0.0))  # stands in for DMP's fused optimizer
    return build_optimizer(model, fused, config, total)


def set_gradients(model: Toy, dense_norm: float, llm_norm: float) -> dict[str, torch.Tensor]:
    """Gradients of given group norms (each group's grads scaled together); returns copies of them."""
    g = torch.Generator().manual_seed(1)
    for group, norm in (((model.over.weight, model.over.bias), dense_norm),
                        ((model.text_arch.deep.weight, model.text_arch.deep.bias), llm_norm)):
        grads = [torch.randn(p.shape, generator=g) for p in group]
        scale = norm / torch.sqrt(sum((x**2).sum() for x in grads))
        for p, x in zip(group, grads):
            p.grad = x * scale
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def group_norm(model: Toy, prefix: str) -> float:
    return math.sqrt(sum(float((p.grad**2).sum()) for n, p in model.named_parameters() if n.startswith(prefix)))


def test_groups_hold_the_dense_and_llm_parameters_with_their_rates():
    model = Toy()
    config = OptimConfig(dense_lr=3e-3, llm_lr=2e-4, warmup_steps=0, decay="none")
    _, schedulers, groups = optimizer_for(model, config)
    assert set(groups) == {"dense", "llm"} and len(schedulers) == 2
    assert set(groups["dense"].params) == {"over.weight", "over.bias"}
    assert set(groups["llm"].params) == {"text_arch.deep.weight", "text_arch.deep.bias"}  # the table is in neither
    assert groups["dense"].param_groups[0]["lr"] == pytest.approx(3e-3)
    assert groups["llm"].param_groups[0]["lr"] == pytest.approx(2e-4)


def test_each_groups_gradient_norm_is_clipped_to_the_limit_on_its_own():
    """dense grads of norm 10 are scaled to norm 0.5 (direction kept); llm grads of norm 0.2 are under the
    limit and stay exactly as they were, though the two groups' joint norm is far over it."""
    model = Toy()
    optimizer, _, _ = optimizer_for(model, OptimConfig(grad_clip=0.5))
    before = set_gradients(model, dense_norm=10.0, llm_norm=0.2)
    optimizer.step()
    assert group_norm(model, "over.") == pytest.approx(0.5, rel=1e-5)
    for name in ("over.weight", "over.bias"):  # clip_grad_norm_'s scale: limit / (norm + 1e-6)
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, before[name] * (0.5 / (10.0 + 1e-6)))
    for name in ("text_arch.deep.weight", "text_arch.deep.bias"):
        assert torch.equal(dict(model.named_parameters())[name].grad, before[name])


def test_llm_group_is_clipped_too():
    model = Toy()
    optimizer, _, _ = optimizer_for(model, OptimConfig(grad_clip=1.0))
    set_gradients(model, dense_norm=0.3, llm_norm=7.0)
    optimizer.step()
    assert group_norm(model, "text_arch.") == pytest.approx(1.0, rel=1e-5)
    assert group_norm(model, "over.") == pytest.approx(0.3, rel=1e-5)


def test_grad_clip_zero_leaves_gradients_alone():
    model = Toy()
    optimizer, _, _ = optimizer_for(model, OptimConfig(grad_clip=0.0))
    before = set_gradients(model, dense_norm=50.0, llm_norm=30.0)
    optimizer.step()
    for name, grad in before.items():
        assert torch.equal(dict(model.named_parameters())[name].grad, grad)


def test_schedulers_set_each_groups_rate_by_lr_factor():
    """Stepping the schedulers gives every group base_lr x lr_factor(step)."""
    model = Toy()
    config = OptimConfig(dense_lr=1e-2, llm_lr=1e-3, warmup_steps=4, decay="linear", grad_clip=0.0)
    optimizer, schedulers, groups = optimizer_for(model, config, total=12)
    for step in range(15):
        for name, base in (("dense", 1e-2), ("llm", 1e-3)):
            assert groups[name].param_groups[0]["lr"] == pytest.approx(base * expected_factor(step, 4, 12, "linear"))
        set_gradients(model, 1.0, 1.0)
        optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
