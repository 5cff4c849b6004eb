"""`bahe-encode info --stats`: the anisotropy of a store's vectors against hand-computed references,
and the command on a real (tiny) store."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bahe.embeddings.build import build_store
from bahe.embeddings.cli import main
from bahe.embeddings.encoder import EncoderConfig
from bahe.embeddings.store import BehaviourStore
from bahe.embeddings.store_stats import anisotropy, store_anisotropy
from tests.llm_fixtures import make_tiny_llama
from tests.test_store import texts, write_samples


def test_collinear_vectors_have_cosine_one_and_rank_one():
    stats = anisotropy(np.outer([1.0, 2.0, 3.0, 4.0], [3.0, 4.0, 0.0]))
    assert stats["mean_cosine"] == pytest.approx(1.0) and stats["effective_rank"] == pytest.approx(1.0)
    assert stats["top_channel_energy"] == pytest.approx(1.0)  # all energy in 2 <= 3 channels


def test_orthogonal_vectors_have_cosine_zero_and_full_rank():
    stats = anisotropy(np.eye(6) * 2.0)
    assert stats["mean_cosine"] == pytest.approx(0.0) and stats["effective_rank"] == pytest.approx(6.0)
    assert stats["top_channel_energy"] == pytest.approx(3 / 6)


def test_a_large_shared_offset_shows_as_high_cosine_and_concentrated_energy():
    """The attention-sink pattern: random texts plus one huge channel."""
    rng = np.random.default_rng(0)
    plain = rng.normal(size=(200, 32))
    sunk = plain + np.eye(32)[0] * 40.0
    clean, bad = anisotropy(plain), anisotropy(sunk)
    assert abs(clean["mean_cosine"]) < 0.05 and bad["mean_cosine"] > 0.9
    assert bad["top_channel_energy"] > 0.9 > clean["top_channel_energy"]
    assert bad["effective_rank"] < 2 < clean["effective_rank"]
    # mean cosine against a direct pairwise loop
    unit = sunk / np.linalg.norm(sunk, axis=1, keepdims=True)
    pairs = [unit[i] @ unit[j] for i in range(200) for j in range(200) if i != j]
    assert bad["mean_cosine"] == pytest.approx(np.mean(pairs))


def test_fewer_than_two_vectors_are_refused():
    with pytest.raises(ValueError, match="at least 2 vectors"):
        anisotropy(np.ones((1, 4)))


def test_bahe_encode_info_stats_on_a_real_store(tmp_path, tiny_schema, capsys):
    tiny_llama = make_tiny_llama(tmp_path / "llm")
    data = write_samples(tmp_path / "a.parquet", tiny_schema, [texts("Pay", 12), texts("Visit", 8)], ["T1", "T2"])
    build_store(tmp_path / "store", [data], EncoderConfig(model=str(tiny_llama), k=1, device="cpu", batch_tokens=64),
                show_progress=False)
    assert main(["info", str(tmp_path / "store"), "--stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    store = BehaviourStore.open(tmp_path / "store")
    expected = anisotropy(store.rows(2, store.rows_count))  # every text row: the sample is all of them here
    assert stats == pytest.approx(expected)
    assert store_anisotropy(store, sample=5)["rows"] == 5
    assert main(["info", str(tmp_path / "store"), "--stats"]) == 0
    assert "mean cosine between texts" in capsys.readouterr().out
