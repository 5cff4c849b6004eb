"""model/deep_layers.py, ``pooling="last"``: a zero-length behaviour sequence (a user with no behaviour of a
type) pools to exact zeros with no NaN in the output or the gradients, and does not change the other
sequences of the batch, whose pooled state is their own last real behaviour's."""

from __future__ import annotations

import pytest
import torch

from bahe.model.deep_layers import DeepLayerAggregator
from tests.llm_fixtures import make_tiny_llama

HIDDEN = 32


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"), layers=4, hidden=HIDDEN)


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_empty_sequence_pools_to_zeros_without_nans_under_last_pooling(tiny_dir, attention):
    torch.manual_seed(0)
    agg = DeepLayerAggregator(tiny_dir, k=1, deep_layers=2, pooling="last", attention=attention).eval()
    vectors = torch.randn(3, 4, HIDDEN)
    with torch.no_grad():
        out = agg(vectors, torch.tensor([0, 2, 0]))
        alone = agg(vectors[1:2, :2], torch.tensor([2]))  # the real sequence on its own, unpadded
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(HIDDEN)) and torch.equal(out[2], torch.zeros(HIDDEN))
    assert out[1].any()
    torch.testing.assert_close(out[1:2], alone, rtol=1e-5, atol=1e-5)


def test_a_batch_of_only_empty_sequences_pools_to_zeros(tiny_dir):
    agg = DeepLayerAggregator(tiny_dir, k=1, deep_layers=2, pooling="last").eval()
    with torch.no_grad():
        out = agg(torch.randn(2, 3, HIDDEN), torch.tensor([0, 0]))
    assert torch.equal(out, torch.zeros(2, HIDDEN))


def test_gradients_stay_finite_and_an_empty_sequence_gets_none(tiny_dir):
    """Training through a batch with an empty sequence: finite gradients everywhere, and the empty
    sequence's (padding) inputs get exactly zero gradient."""
    torch.manual_seed(1)
    agg = DeepLayerAggregator(tiny_dir, k=1, deep_layers=2, pooling="last").train()
    vectors = torch.randn(3, 4, HIDDEN, requires_grad=True)
    agg(vectors, torch.tensor([3, 0, 1])).square().sum().backward()
    assert torch.isfinite(vectors.grad).all()
    assert not vectors.grad[1].any()
    assert vectors.grad[0, :3].any() and not vectors.grad[0, 3:].any()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in agg.parameters())
