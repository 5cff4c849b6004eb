"""The embedded default model, for real: SmolLM2-135M from its wheel (converted once, cached). The store,
the deep-layer aggregator and the token-level arm each reproduce the real model's own forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bahe.embeddings.encoder import EncoderConfig, ShallowEncoder
from bahe.embeddings.pretrained import resolve_model_dir, weights_sha256
from bahe.model.deep_layers import DeepLayerAggregator

pytestmark = pytest.mark.integration

LAYERS, HIDDEN = 30, 576
TEXTS = ["Purchase at Starbucks Coffee", "Search: 北京 flights ✈️ for the weekend, then Toy Story (1995) again"]


@pytest.fixture(scope="module")
def smollm2():
    """(model dir, tokenizer, the full causal LM in fp32, eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model_dir("smollm2-135m")
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model_dir, AutoTokenizer.from_pretrained(model_dir), full


def own_hidden_states(full, tokenizer, text: str) -> tuple[torch.Tensor, ...]:
    """The model's own hidden_states for ``text`` (no special tokens, as the batchers tokenise):
    [i] is the input of layer i; the last one is already through the final norm."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return tuple(h[0] for h in full(input_ids=ids, output_hidden_states=True).hidden_states)


def test_smollm2_store_vector_is_its_hidden_state_k(smollm2):
    model_dir, tokenizer, full = smollm2
    titles = ["Toy Story (1995)", "Purchase at Starbucks Coffee", "Search: 北京 flights ✈️"]
    k = 4
    encoder = ShallowEncoder(EncoderConfig(model="smollm2-135m", k=k, device="cpu"))
    assert len(encoder.model.layers) == k and encoder.dim == HIDDEN
    vectors, _ = encoder.encode(titles)
    assert full.config.num_hidden_layers == LAYERS
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


@pytest.mark.parametrize(("k", "deep"), [(4, 3), (6, LAYERS - 6)])
def test_smollm2_deep_layers_turn_its_hidden_state_k_into_its_hidden_state_k_plus_d(smollm2, k, deep):
    """Fed the real model's own hidden_states[k] for two texts (right-padded into one batch), the
    aggregator's layers k..k+d-1 give, at every real position, the model's own hidden_states[k+d]
    through the final norm (the model's last hidden state when they run to the end)."""
    model_dir, tokenizer, full = smollm2
    states = [own_hidden_states(full, tokenizer, text) for text in TEXTS]
    lengths = torch.tensor([s[k].shape[0] for s in states])
    assert lengths[0] != lengths[1]
    vectors = torch.zeros(len(TEXTS), int(lengths.max()), HIDDEN)
    for row, s in enumerate(states):
        vectors[row, : lengths[row]] = s[k]
    agg = DeepLayerAggregator(model_dir, k=k, deep_layers=deep, pooling="last").eval()
    seen = {}
    agg.decoder.register_forward_hook(lambda _m, _a, out: seen.update(hidden=out.last_hidden_state))
    with torch.no_grad():
        pooled = agg(vectors, lengths)
    for row, s in enumerate(states):
        with torch.no_grad():
            expected = s[LAYERS] if k + deep == LAYERS else full.model.norm(s[k + deep])
        torch.testing.assert_close(seen["hidden"][row, : lengths[row]], expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(pooled[row], expected[-1], rtol=1e-4, atol=1e-4)


def test_smollm2_token_level_arm_is_its_own_forward(smollm2):
    """The token-level arm's shallow (0..k, frozen) and deep (k..L) layers on a padded batch of real
    token ids == the real model's own forward on each row alone, for users and (fixed-width) items."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from bahe.model.token_baseline import ITEM_TOKENS, USER_TOKENS, TokenLevelTextArch

    model_dir, tokenizer, full = smollm2
    users = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS]
    items = [user[:5] for user in users]
    assert len(users[0]) != len(users[1])
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=[USER_TOKENS, ITEM_TOKENS], values=torch.tensor([t for row in users + items for t in row]),
        lengths=torch.tensor([len(row) for row in users + items]))
    arch = TokenLevelTextArch(model_dir, 4, None, 8, max_user_tokens=64, max_item_tokens=8).eval()
    assert len(arch.shallow.layers) == 4 and len(arch.deep.decoder.layers) == LAYERS - 4
    with torch.no_grad():
        encoded = {key: arch._encode(features, key) for key in (USER_TOKENS, ITEM_TOKENS)}
        for key, rows in ((USER_TOKENS, users), (ITEM_TOKENS, items)):
            for row, ids in enumerate(rows):
                own = full.model(input_ids=torch.tensor([ids])).last_hidden_state[0].mean(0)
                torch.testing.assert_close(encoded[key][row], own, rtol=1e-4, atol=1e-4)
