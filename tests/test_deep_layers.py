"""The deep-layer aggregator IS layers k..k+deep of the Hugging Face model, on behaviour vectors;
padding never changes a real sequence's result; only the slice of the model is ever built."""

from __future__ import annotations

import pytest
import torch

from bahe.embeddings.pretrained import ModelError
from bahe.model.deep_layers import DeepLayerAggregator
from tests.llm_dtypes import linear_output_dtypes
from tests.llm_fixtures import make_tiny_llama

LAYERS, HIDDEN = 6, 32


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"), layers=LAYERS, hidden=HIDDEN)


@pytest.fixture(scope="module")
def full_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


def reference(full_model, vectors, k, deep, causal=True):
    """Run the full model's own layers k..k+deep-1 (and its final norm) on inputs_embeds."""
    base = full_model.model
    positions = torch.arange(vectors.shape[1]).unsqueeze(0).expand(vectors.shape[0], -1)
    embeddings = base.rotary_emb(vectors, positions)
    hidden = vectors
    for layer in base.layers[k:k + deep]:
        layer.self_attn.is_causal = causal
        hidden = layer(hidden, attention_mask=None, position_embeddings=embeddings, position_ids=positions)
        layer.self_attn.is_causal = True
    return base.norm(hidden)


@pytest.mark.parametrize(("k", "deep"), [(2, 4), (1, 2), (0, 6)])
def test_equals_the_models_own_layers(tiny_dir, full_model, k, deep):
    torch.manual_seed(0)
    agg = DeepLayerAggregator(tiny_dir, k=k, deep_layers=deep, pooling="last").eval()
    assert len(agg.decoder.layers) == deep and agg.decoder.embed_tokens is None  # nothing below k is built
    vectors = torch.randn(3, 5, HIDDEN)
    with torch.no_grad():
        ours = agg(vectors, torch.full((3,), 5))
        ref = reference(full_model, vectors, k, deep)[:, -1]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_default_deep_layers_is_all_the_rest(tiny_dir):
    assert DeepLayerAggregator(tiny_dir, k=2).deep_layers == LAYERS - 2


def test_bidirectional_attention_equals_unmasked_reference(tiny_dir, full_model):
    torch.manual_seed(1)
    agg = DeepLayerAggregator(tiny_dir, k=2, deep_layers=3, attention="bidirectional").eval()
    vectors = torch.randn(2, 4, HIDDEN)
    with torch.no_grad():
        ours = agg(vectors, torch.full((2,), 4))
        ref = reference(full_model, vectors, 2, 3, causal=False).mean(1)
        causal = DeepLayerAggregator(tiny_dir, k=2, deep_layers=3).eval()(vectors, torch.full((2,), 4))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, causal, atol=1e-4)


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_padding_does_not_change_a_sequence(tiny_dir, attention, pooling):
    """A length-3 sequence gives the same pooled state alone or right-padded with garbage to 7."""
    torch.manual_seed(2)
    agg = DeepLayerAggregator(tiny_dir, k=1, deep_layers=3, pooling=pooling, attention=attention).eval()
    real = torch.randn(1, 3, HIDDEN)
    padded = torch.cat([real, 100 * torch.randn(1, 4, HIDDEN)], dim=1)
    with torch.no_grad():
        alone = agg(real, torch.tensor([3]))
        inside = agg(torch.cat([padded, torch.randn(1, 7, HIDDEN)]), torch.tensor([3, 7]))[:1]
    torch.testing.assert_close(inside, alone, rtol=1e-5, atol=1e-5)


def test_empty_sequence_pools_to_zeros_without_nans(tiny_dir):
    agg = DeepLayerAggregator(tiny_dir, k=1, deep_layers=2).eval()
    out = agg(torch.randn(3, 4, HIDDEN), torch.tensor([0, 2, 0]))
    assert torch.isfinite(out).all() and not out[0].any() and not out[2].any() and out[1].any()


def test_gradients_reach_the_layers_and_the_inputs(tiny_dir):
    agg = DeepLayerAggregator(tiny_dir, k=1, deep_layers=2, gradient_checkpointing=True).train()
    assert agg.decoder.is_activation_checkpointing  # the layers recompute in backward
    assert not DeepLayerAggregator(tiny_dir, k=1, deep_layers=2).decoder.is_activation_checkpointing
    vectors = torch.randn(2, 3, HIDDEN, requires_grad=True)
    agg(vectors, torch.tensor([3, 1])).sum().backward()
    assert vectors.grad is not None and vectors.grad[1, 1:].abs().sum() == 0  # padding gets no gradient
    assert all(p.grad is not None for p in agg.parameters())


def test_bad_slices_and_options_are_refused(tiny_dir):
    with pytest.raises(ModelError, match=r"need k \+ deep_layers <= 6"):
        DeepLayerAggregator(tiny_dir, k=4, deep_layers=3)
    with pytest.raises(ValueError, match="pooling"):
        DeepLayerAggregator(tiny_dir, k=1, deep_layers=1, pooling="max")
    with pytest.raises(ValueError, match="attention"):
        DeepLayerAggregator(tiny_dir, k=1, deep_layers=1, attention="sparse")


def test_bf16_precision_autocasts_on_cpu_and_auto_stays_fp32_there(tiny_dir, full_model):
    """``precision`` picks the LLM layers' compute dtype: under ``bf16`` every linear layer of every
    decoder layer computes in bfloat16 (on any device), under ``fp32`` and ``auto`` (on CPU) in fp32;
    the weights, their gradients and the pooled result stay fp32 either way. The bf16 result is the
    model's own layers under the same autocast (not merely close to fp32)."""
    torch.manual_seed(2)
    # small inputs: the layers' own (unit-RMS normed) contributions dominate the residual stream
    vectors, lengths = 0.01 * torch.randn(3, 5, HIDDEN), torch.full((3,), 5)
    outputs = {}
    for precision in ("fp32", "auto", "bf16"):
        torch.manual_seed(0)
        agg = DeepLayerAggregator(tiny_dir, k=1, deep_layers=3, precision=precision, pooling="last").train()
        with linear_output_dtypes(agg) as seen:
            outputs[precision] = agg(vectors, lengths)
        assert len(seen) == 3 * 7  # q, k, v, o, gate, up, down of each of the 3 layers ran
        computed = {dtype for dtypes in seen.values() for dtype in dtypes}
        assert computed == {torch.bfloat16 if precision == "bf16" else torch.float32}, precision
        outputs[precision].sum().backward()
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in agg.parameters())
    assert all(out.dtype == torch.float32 for out in outputs.values())
    assert torch.equal(outputs["auto"], outputs["fp32"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref_bf16 = reference(full_model, vectors, 1, 3)[:, -1].float()
    with torch.no_grad():
        ref_fp32 = reference(full_model, vectors, 1, 3)[:, -1]
    # the two references are far apart next to this tolerance: a layer left in fp32 would show
    assert (ref_bf16 - ref_fp32).abs().max() > 2e-3
    torch.testing.assert_close(outputs["bf16"].detach(), ref_bf16, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs["fp32"].detach(), ref_fp32, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="precision must be one of"):
        DeepLayerAggregator(tiny_dir, k=1, deep_layers=1, precision="fp16")
