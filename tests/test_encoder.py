"""The shallow encoder: a stored vector IS the LLM's own hidden_states[k], pooled; and it does not
depend on which other texts shared its batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bahe.embeddings.encoder import EncoderConfig, ShallowEncoder
from bahe.embeddings.pretrained import ModelError, resolve_model_dir
from tests.llm_fixtures import make_tiny_llama

TEXTS = ["Purchase at Starbucks Coffee 12.50 CNY", "Search: cheap flights to Shanghai", "Toy Story (1995)",
         "Café crème · 北京烤鸭 🍜🎬", "a", "Visit mini-program Metro Pass"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _reference(model_dir, texts, k, pooling, max_tokens=64):
    """The full model's own output_hidden_states[k], on a padded batch, mask-pooled."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[k]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    if pooling == "mean":
        return ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    last = batch["attention_mask"].sum(1) - 1
    return hidden[torch.arange(len(texts)), last].numpy()


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("k", [1, 3])
def test_vector_is_the_models_own_hidden_state_k(tiny_llama, k, pooling):
    encoder = ShallowEncoder(EncoderConfig(model=str(tiny_llama), k=k, pooling=pooling, device="cpu"))
    assert len(encoder.model.layers) == k  # layers k.. are never built
    vectors, stats = encoder.encode(TEXTS)
    np.testing.assert_allclose(vectors, _reference(tiny_llama, TEXTS, k, pooling), rtol=1e-5, atol=1e-5)
    assert stats.texts == len(TEXTS) and stats.truncated == 0


def test_minilm_encoder_matches_bert_hidden_state_k():
    """An encoder model (BERT) works too: its first k layers, mean-pooled over the tokens."""
    model_dir = resolve_model_dir("minilm-l6")
    encoder = ShallowEncoder(EncoderConfig(model="minilm-l6", k=2, device="cpu"))
    vectors, _ = encoder.encode(TEXTS[:4])
    assert vectors.shape == (4, 384)
    np.testing.assert_allclose(vectors, _reference(model_dir, TEXTS[:4], 2, "mean"), rtol=1e-4, atol=1e-5)


def test_vectors_do_not_depend_on_batch_companions(tiny_llama):
    """Encoding a text alone, with others, or in another order gives byte-identical vectors."""
    encoder = ShallowEncoder(EncoderConfig(model=str(tiny_llama), k=2, device="cpu", batch_tokens=64))
    many = TEXTS * 7 + [f"Search: item number {i}" for i in range(40)]
    together, _ = encoder.encode(many)
    for i in (0, 3, len(many) - 1):
        alone, _ = encoder.encode([many[i]])
        assert np.array_equal(alone[0], together[i])
    order = np.random.default_rng(0).permutation(len(many))
    shuffled, _ = encoder.encode([many[i] for i in order])
    assert np.array_equal(shuffled, together[order])


def test_long_text_is_truncated_and_counted(tiny_llama):
    encoder = ShallowEncoder(EncoderConfig(model=str(tiny_llama), k=2, device="cpu", max_tokens=8, batch_tokens=64))
    long_text = "word " * 50
    vectors, stats = encoder.encode([long_text, "short"])
    assert stats.truncated == 1 and max(stats.length_histogram) == 8
    np.testing.assert_allclose(vectors[:1], _reference(tiny_llama, [long_text], 2, "mean", max_tokens=8), atol=1e-5)


def test_padding_waste_is_counted(tiny_llama):
    encoder = ShallowEncoder(EncoderConfig(model=str(tiny_llama), k=1, device="cpu", batch_tokens=64))
    _, stats = encoder.encode(["one two three"] * 3)
    rows = encoder.rows_per_batch(stats.tokens // 3)
    assert stats.computed_tokens == rows * (stats.tokens // 3)
    assert stats.padding_waste == pytest.approx(1 - 3 / rows)


def test_config_errors_say_what_to_change(tiny_llama):
    with pytest.raises(ValueError, match="pooling"):
        EncoderConfig(pooling="max")
    with pytest.raises(ValueError, match="batch_tokens"):
        EncoderConfig(max_tokens=128, batch_tokens=64)
    with pytest.raises(ModelError, match="k=9 .* has 4"):
        ShallowEncoder(EncoderConfig(model=str(tiny_llama), k=9, device="cpu"))
    with pytest.raises(ModelError, match="no config.json"):
        ShallowEncoder(EncoderConfig(model="/nonexistent/model", device="cpu"))


def test_pickle_checkpoints_are_refused(tmp_path, tiny_llama):
    """Nothing unsafe is loaded: a directory with only a pickle .bin checkpoint is refused."""
    import shutil

    target = tmp_path / "pickled"
    shutil.copytree(tiny_llama, target)
    for file in target.glob("*.safetensors"):
        file.rename(file.with_suffix(".bin"))
    with pytest.raises(ModelError, match="pickle checkpoints are not loaded"):
        ShallowEncoder(EncoderConfig(model=str(target), k=2, device="cpu"))
