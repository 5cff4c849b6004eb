"""The behaviour store: versioned builds, incremental refresh and crash-resume that give
byte-identical vectors to a from-scratch build, and clear refusals of mismatched stores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bahe.ctr_data.parquet_io import SampleWriter
from bahe.embeddings.build import WORK, build_store
from bahe.embeddings.encoder import EncoderConfig, ShallowEncoder
from bahe.embeddings.store import LATEST, BehaviourStore, Expected, StoreError
from bahe.embeddings.vocabulary import PAD_ID, UNKNOWN_ID, BehaviourVocabulary, normalize_text
from tests.llm_fixtures import make_tiny_llama
from tests.torchrun import torchrun

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def write_samples(path: Path, tiny_schema, sequences: list[list[str]], titles: list[str]) -> Path:
    n = len(sequences)
    with SampleWriter(path, tiny_schema) as writer:
        writer.write({"label": [i % 2 for i in range(n)], "timestamp": list(range(n)), "user_id": list(range(n)),
                      "item_id": list(range(n)), "cat_genre": [[] for _ in range(n)], "dense_age": [1.0] * n,
                      "item_text": titles, "seq_liked": sequences, "seq_disliked": [s[::-1] for s in sequences]})
    return path


def texts(prefix: str, n: int) -> list[str]:
    words = ["coffee", "flight", "metro", "movie", "noodles", "taxi", "hotel", "books"]
    return [f"{prefix} {words[i % 8]} order {i} " + "x" * (i % 5) for i in range(n)]


def config(model: Path, **kw) -> EncoderConfig:
    return EncoderConfig(model=str(model), k=2, device="cpu", batch_tokens=64, **kw)


def vectors_by_text(root: Path) -> dict[str, bytes]:
    store = BehaviourStore.open(root)
    rows = store.rows(0, store.rows_count)
    return {text: rows[i].tobytes() for i, text in enumerate(store.vocabulary.texts) if i > UNKNOWN_ID}


def test_build_writes_a_complete_version(tmp_path, tiny_llama, tiny_schema):
    data = write_samples(tmp_path / "a.parquet", tiny_schema, [texts("Purchase", 5), [], ["  Café\tcrème  🍜 "]],
                         ["Toy Story (1995)", "", "Heat (1995)"])
    report = build_store(tmp_path / "store", [data], config(tiny_llama), show_progress=False)
    store = BehaviourStore.open(tmp_path / "store")
    assert store.version == report.version == "v000001" and store.manifest["parent"] is None
    vocab = store.vocabulary
    assert vocab.texts[:2] == ["<pad>", "<unknown>"] and "Café crème 🍜" in vocab.texts  # normalised
    assert "" not in vocab.texts[2:]  # an empty text maps to PAD, it is never encoded
    assert store.rows_count == len(vocab) == 2 + 5 + 1 + 2
    assert not store.rows(0, 2).any()  # pad and unknown rows are zero
    store.verify()
    # each row is the encoder's vector of its text
    encoder = ShallowEncoder(config(tiny_llama))
    expected, _ = encoder.encode(vocab.texts[2:])
    assert np.array_equal(store.rows(2, store.rows_count), expected)
    assert store.rows(3, 5).shape == (2, 32)
    assert report.occurrences == 2 * 6 + 2 and report.distinct_texts == 8
    assert report.tokens_per_occurrence_encoder > report.tokens_encoded
    assert not (tmp_path / "store" / WORK / "v000001").exists()


def test_refresh_encodes_only_new_texts_and_matches_a_scratch_build(tmp_path, tiny_llama, tiny_schema):
    day1 = write_samples(tmp_path / "d1.parquet", tiny_schema, [texts("Pay", 30)], ["Title A"])
    day2 = write_samples(tmp_path / "d2.parquet", tiny_schema, [texts("Pay", 10) + texts("Search", 25)],
                         ["Title A", "Title B"][:1])
    build_store(tmp_path / "inc", [day1], config(tiny_llama), show_progress=False)
    v1 = BehaviourStore.open(tmp_path / "inc")
    v1_bytes = (v1.path / "vectors.npy").read_bytes()
    report = build_store(tmp_path / "inc", [day2], config(tiny_llama), show_progress=False)
    assert report.new_texts == 25 and report.parent == "v000001"
    v2 = BehaviourStore.open(tmp_path / "inc")
    assert v2.version == "v000002" and v2.manifest["parent"] == "v000001"
    assert np.array_equal(v2.rows(0, v1.rows_count), v1.rows(0, v1.rows_count))  # old ids and vectors unchanged
    assert v2.vocabulary.texts[: len(v1.vocabulary)] == v1.vocabulary.texts
    assert (v1.path / "vectors.npy").read_bytes() == v1_bytes  # the parent version is untouched
    build_store(tmp_path / "scratch", [day1, day2], config(tiny_llama), show_progress=False)
    assert vectors_by_text(tmp_path / "inc") == vectors_by_text(tmp_path / "scratch")
    # nothing new: no new version
    again = build_store(tmp_path / "inc", [day1, day2], config(tiny_llama), show_progress=False)
    assert again.new_texts == 0 and again.version == "v000002"


def test_refresh_with_other_encoder_settings_is_refused(tmp_path, tiny_llama, tiny_schema):
    data = write_samples(tmp_path / "a.parquet", tiny_schema, [texts("Pay", 3)], ["T"])
    build_store(tmp_path / "s", [data], config(tiny_llama), show_progress=False)
    with pytest.raises(StoreError, match="k: store has 2, config asks for 3"):
        build_store(tmp_path / "s", [data], EncoderConfig(model=str(tiny_llama), k=3, device="cpu"),
                    show_progress=False)
    with pytest.raises(StoreError, match="max_tokens: parent 64, now 16"):
        build_store(tmp_path / "s", [data], config(tiny_llama, max_tokens=16), show_progress=False)


def test_store_for_another_model_k_or_dim_is_refused_before_training(tmp_path, tiny_llama, tiny_schema):
    other = make_tiny_llama(tmp_path / "other-model", seed=1)
    data = write_samples(tmp_path / "a.parquet", tiny_schema, [texts("Pay", 3)], ["T"])
    build_store(tmp_path / "s", [data], config(tiny_llama), show_progress=False)
    store = BehaviourStore.open(tmp_path / "s")
    from bahe.embeddings.pretrained import weights_sha256

    store.check(Expected(model_sha256=weights_sha256(tiny_llama), k=2, dim=32, pooling="mean"))
    with pytest.raises(StoreError, match="model_sha256"):
        store.check(Expected(model_sha256=weights_sha256(other)))
    with pytest.raises(StoreError, match="dim: store has 32, config asks for 576"):
        store.check(Expected(dim=576))
    with pytest.raises(StoreError, match="model_sha256"):  # refreshing with another model too
        build_store(tmp_path / "s", [data], config(other), show_progress=False)


def test_corrupt_or_missing_stores_give_clear_errors(tmp_path, tiny_llama, tiny_schema):
    with pytest.raises(StoreError, match="holds no complete store version"):
        BehaviourStore.open(tmp_path / "empty")
    data = write_samples(tmp_path / "a.parquet", tiny_schema, [texts("Pay", 3)], ["T"])
    build_store(tmp_path / "s", [data], config(tiny_llama), show_progress=False)
    store = BehaviourStore.open(tmp_path / "s")
    vectors = bytearray((store.path / "vectors.npy").read_bytes())
    vectors[-1] ^= 0xFF
    (store.path / "vectors.npy").write_bytes(bytes(vectors))
    with pytest.raises(StoreError, match="checksum"):
        BehaviourStore.open(tmp_path / "s").verify()
    (tmp_path / "s" / LATEST).write_text("v000009\n")
    with pytest.raises(StoreError, match="not a complete version"):
        BehaviourStore.open(tmp_path / "s")


def test_vocabulary_ids_are_stable_and_lookups_count_unknowns(tmp_path):
    from collections import Counter

    vocab = BehaviourVocabulary()
    assert vocab.extend(Counter({"b": 2, "a": 1})) == [2, 3]  # sorted: a=2, b=3
    assert vocab.extend(Counter({"c": 1, "a": 5})) == [4]
    assert vocab.lookup(["a", " a ", "", "zzz", "c"]) == [2, 2, PAD_ID, UNKNOWN_ID, 4]
    assert vocab.unknown_lookups == 1 and vocab.counts[2] == 6
    vocab.save(tmp_path / "v.parquet")
    assert BehaviourVocabulary.load(tmp_path / "v.parquet").texts == vocab.texts
    assert normalize_text("Cafe\u0301\u00a0 crème\n") == "Café crème"
    with pytest.raises(ValueError, match="normalised"):
        vocab.extend(Counter({" padded ": 1}))


def _encode_cli(root: Path, data: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bahe.embeddings.cli", "build", "--store", str(root), "--data", str(data),
            "--model", str(model), "--k", "2", "--device", "cpu", "--batch-tokens", "64", "--chunk-texts", "8",
            "--quiet", *extra]


@pytest.mark.integration
def test_killed_encode_resumes_without_reencoding_and_matches_scratch(tmp_path, tiny_llama, tiny_schema):
    """SIGKILL mid-build: LATEST still names the previous state, the rerun skips finished chunks, and
    the final vectors are byte-identical to an uninterrupted build."""
    data = write_samples(tmp_path / "a.parquet", tiny_schema, [texts("Pay", 400)], ["T"])
    root = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(_encode_cli(root, data, tiny_llama), cwd=ROOT, env=env)
    work = root / WORK / "v000001"
    deadline = time.time() + 120
    while len(list(work.glob("chunk-*.npy"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(work.glob("chunk-*.npy")))
    assert 3 <= finished < 51, "the build must be killed mid-way for this test to mean anything"
    assert not (root / LATEST).exists() and not (root / "v000001").exists()  # nothing half-published
    out = subprocess.run(_encode_cli(root, data, tiny_llama, "--json"), cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["resumed_chunks"] == finished and report["version"] == "v000001"
    build_store(tmp_path / "scratch", [data], config(tiny_llama), chunk_texts=8, show_progress=False)
    assert vectors_by_text(root) == vectors_by_text(tmp_path / "scratch")
    assert (BehaviourStore.open(root).path / "vectors.npy").read_bytes() == \
        (BehaviourStore.open(tmp_path / "scratch").path / "vectors.npy").read_bytes()


@pytest.mark.integration
def test_two_ranks_under_torchrun_build_the_same_store(tmp_path, tiny_llama, tiny_schema):
    """torchrun with 2 ranks splits the chunks between them; the store equals a 1-process build."""
    data = write_samples(tmp_path / "a.parquet", tiny_schema, [texts("Pay", 60)], ["T", ][:1])
    torchrun(*_encode_cli(tmp_path / "ranks", data, tiny_llama)[1:], timeout=300)
    build_store(tmp_path / "one", [data], config(tiny_llama), chunk_texts=8, show_progress=False)
    assert (BehaviourStore.open(tmp_path / "ranks").path / "vectors.npy").read_bytes() == \
        (BehaviourStore.open(tmp_path / "one").path / "vectors.npy").read_bytes()


def test_cli_info_verify_and_errors(tmp_path, tiny_llama, tiny_schema, capsys):
    from bahe.embeddings.cli import main

    data = write_samples(tmp_path / "a.parquet", tiny_schema, [texts("Pay", 4)], ["T"])
    assert main(_encode_cli(tmp_path / "s", data, tiny_llama)[3:]) == 0
    assert "store version v000001" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "s")]) == 0
    assert "k=2, pooling mean" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "s")]) == 0
    assert main(["info", str(tmp_path / "nothing")]) == 2
    assert "holds no complete store version" in capsys.readouterr().err
    assert main(_encode_cli(tmp_path / "s", tmp_path / "missing.parquet", tiny_llama)[3:]) == 2
    assert "no such sample file" in capsys.readouterr().err
