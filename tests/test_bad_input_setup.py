"""Bad input when setting up a run: vocabulary files, behaviour stores, model directories (custom
code is never run), configs and the flags of bahe-data / bahe-encode / bahe-train. Each gets a clear
error naming what to change. Only what other test files do not already cover; docs/faults.md lists
every case with its test. The data path: tests/test_bad_input_data.py.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bahe.ctr_data.parquet_io import SampleWriter
from bahe.ctr_data.schema import DataError, SampleSchema
from bahe.embeddings.vocabulary import PAD_ID, VOCAB_SCHEMA, BehaviourVocabulary
from tests.conftest import tiny_rows

CRITEO_GOOD = "\t".join(["1"] + [str(i) for i in range(13)] + [f"{i:08x}" for i in range(26)])


def tiny_table(schema: SampleSchema, rows: dict) -> pa.Table:
    """An Arrow table of the schema WITHOUT validation (what code other than SampleReader may build)."""
    return pa.table(rows, schema=schema.arrow_schema())

def _vocab(*texts: str) -> BehaviourVocabulary:
    vocab = BehaviourVocabulary()
    vocab.extend(Counter(dict.fromkeys(texts, 1)))
    return vocab


# Vocabulary files and lookups -----------------------------------------------------------------------------
def _vocab_file(path: Path, ids, texts, counts) -> Path:
    nullable = pa.schema([pa.field(f.name, f.type) for f in VOCAB_SCHEMA])  # as another tool may write it
    pq.write_table(pa.table({"id": ids, "text": texts, "count": counts}, schema=nullable), path)
    return path


@pytest.mark.parametrize(("ids", "texts", "counts", "expect"), [
    ([0, 1, 3], ["<pad>", "<unknown>", "a"], [0, 0, 1], r"row 2, field 'id': ids must be 0..n-1"),
    ([0, 1, 2], ["<unknown>", "<pad>", "a"], [0, 0, 1], r"row 0, field 'text': the first rows must be the reserved"),
    ([0, 1, 2, 3], ["<pad>", "<unknown>", "a", "a"], [0, 0, 1, 1], r"row 3, field 'text': text 'a' appears twice"),
    ([0, 1, 2], ["<pad>", "<unknown>", " a"], [0, 0, 1], r"row 2, field 'text': text ' a' is empty or not normalised"),
    ([0, 1, 2], ["<pad>", "<unknown>", ""], [0, 0, 1], r"row 2, field 'text': text '' is empty or not normalised"),
    ([0, 1, 2], ["<pad>", "<unknown>", "a"], [0, 0, -4], r"row 2, field 'count': count -4 is negative"),
    ([0, 1, 2], ["<pad>", "<unknown>", None], [0, 0, 1], r"row 2, field 'text': missing value \(null\)"),
], ids=["ids-out-of-order", "reserved-rows-swapped", "duplicate-text", "unnormalised-text", "empty-text",
        "negative-count", "null-text"])
def test_vocabulary_file_that_save_did_not_write_is_refused(tmp_path, ids, texts, counts, expect):
    with pytest.raises(DataError, match=expect):
        BehaviourVocabulary.load(_vocab_file(tmp_path / "v.parquet", ids, texts, counts))


def test_vocabulary_file_of_another_layout_is_refused(tmp_path):
    pq.write_table(pa.table({"word": ["a"]}), tmp_path / "v.parquet")
    with pytest.raises(DataError, match=r"v.parquet: not a vocabulary file \(id, text, count\)"):
        BehaviourVocabulary.load(tmp_path / "v.parquet")


def test_vocabulary_lookup_of_a_null_text_is_refused():
    with pytest.raises(ValueError, match=r"text 1 is null; a missing text is the empty text"):
        _vocab("a").lookup_array(pa.array(["a", None], pa.string()))


def test_vocabulary_extend_with_non_text_or_bad_counts_is_refused():
    vocab = _vocab("a")
    with pytest.raises(ValueError, match=r"takes texts \(str\); got int 5"):
        vocab.extend(Counter({5: 1}))
    with pytest.raises(ValueError, match="counts >= 0; got 1.5"):
        vocab.extend(Counter({"b": 1.5}))
    assert vocab.texts == ["<pad>", "<unknown>", "a"] and vocab.counts == [0, 0, 1]


def test_vocabulary_texts_that_look_like_the_reserved_rows_are_ordinary_texts():
    """The reserved rows' names (and NUL-prefixed look-alikes) get ids of their own, never 0 or 1."""
    vocab = _vocab("<pad>", "<unknown>", "\x00pad", "\x00unknown")
    ids = vocab.lookup(["<pad>", "<unknown>", "\x00pad", "\x00unknown", ""])
    assert ids[:4] == [vocab._index[t] for t in ("<pad>", "<unknown>", "\x00pad", "\x00unknown")]
    assert min(ids[:4]) >= 2 and ids[4] == PAD_ID and vocab.unknown_lookups == 0


# Behaviour stores (crafted on disk; stores built by bahe-encode are covered in tests/test_store.py) ---------
def _fake_store(root: Path, *, rows: int = 3, dim: int = 4, vectors: np.ndarray | None = None,
                manifest: dict | None = None) -> Path:
    from bahe.embeddings.store import FORMAT, LATEST, MANIFEST, VECTORS, VOCAB

    version = root / "v000001"
    version.mkdir(parents=True)
    vocab = BehaviourVocabulary()
    vocab.extend(Counter({f"text {i}": 1 for i in range(rows - 2)}))
    vocab.save(version / VOCAB)
    np.save(version / VECTORS, np.zeros((rows, dim), np.float32) if vectors is None else vectors,
            allow_pickle=vectors is not None and vectors.dtype == object)
    base = {"format": FORMAT, "version": "v000001", "rows": rows, "dim": dim, "parent": None,
            "encoder": {"k": 2, "pooling": "mean"}, "model": {"sha256": "0" * 64}, "files": {}}
    (version / MANIFEST).write_text(json.dumps({**base, **(manifest or {})}))
    (root / LATEST).write_text("v000001\n")
    return root


def test_store_with_a_corrupt_manifest_is_refused(tmp_path):
    from bahe.embeddings.store import BehaviourStore, StoreError

    root = _fake_store(tmp_path / "s")
    (root / "v000001" / "manifest.json").write_text("{half a manifest")
    with pytest.raises(StoreError, match=r"manifest.json is corrupt"):
        BehaviourStore.open(root)


def test_store_of_another_format_is_refused(tmp_path):
    from bahe.embeddings.store import BehaviourStore, StoreError

    with pytest.raises(StoreError, match=r"format 'other/9', expected 'bahe-behaviour-store/1'"):
        BehaviourStore.open(_fake_store(tmp_path / "s", manifest={"format": "other/9"}))


@pytest.mark.parametrize("vectors", [np.zeros((3, 5), np.float32), np.zeros((2, 4), np.float32),
                                     np.zeros((3, 4), np.float64)], ids=["dim", "rows", "dtype"])
def test_store_whose_vectors_disagree_with_its_manifest_is_refused(tmp_path, vectors):
    from bahe.embeddings.store import BehaviourStore, StoreError

    with pytest.raises(StoreError, match=r"the manifest says \(3, 4\) float32 \(float32 on disk\): the store is corrupt; rebuild it"):
        BehaviourStore.open(_fake_store(tmp_path / "s", vectors=vectors))


def test_store_whose_vocabulary_disagrees_with_its_rows_is_refused(tmp_path):
    from bahe.embeddings.store import BehaviourStore, StoreError

    root = _fake_store(tmp_path / "s", rows=4)
    BehaviourVocabulary().save(root / "v000001" / "vocab.parquet")  # 2 texts for 4 rows
    with pytest.raises(StoreError, match="vocabulary has 2 texts for 4 rows"):
        _ = BehaviourStore.open(root).vocabulary


def test_store_with_pickled_vectors_is_refused_without_unpickling(tmp_path):
    """An object array in vectors.npy is never unpickled (np.load with allow_pickle=False)."""
    from bahe.embeddings.store import BehaviourStore, StoreError

    with pytest.raises(StoreError, match=r"vectors.npy is not a plain float array .*(Python objects|pickle)"):
        BehaviourStore.open(_fake_store(tmp_path / "s", vectors=np.array([{"a": 1}] * 3, dtype=object)))


@pytest.mark.parametrize("name", ["../elsewhere", "/etc", "v1", "v000001/../../x"])
def test_a_latest_or_version_that_is_not_a_version_name_is_refused(tmp_path, name):
    """Paths checked: LATEST and --version can only name vNNNNNN inside the store folder."""
    from bahe.embeddings.store import BehaviourStore, StoreError

    root = tmp_path / "store"
    (root / "LATEST").parent.mkdir(parents=True)
    (root / "LATEST").write_text(name + "\n")
    with pytest.raises(StoreError, match=r"not a store version \(vNNNNNN\)"):
        BehaviourStore.open(root)
    with pytest.raises(StoreError, match=r"not a store version \(vNNNNNN\)"):
        BehaviourStore.open(root, version=name)


@pytest.mark.parametrize("name", ["../elsewhere", "/tmp", "step-40"])
def test_a_checkpoint_latest_that_is_not_a_step_name_is_refused(tmp_path, name):
    from bahe.training.checkpoint import Checkpointer

    (tmp_path / "LATEST").write_text(name + "\n")
    with pytest.raises(ValueError, match=r"not a checkpoint \(step-NNNNNNN\)"):
        Checkpointer(tmp_path).latest()


def test_store_row_range_outside_the_store_is_refused(tmp_path):
    from bahe.embeddings.store import BehaviourStore, StoreError

    store = BehaviourStore.open(_fake_store(tmp_path / "s"))
    with pytest.raises(StoreError, match=r"row range \[2, 9\) outside the store's 3 rows"):
        store.rows(2, 9)


# Model directories: custom code is never run -----------------------------------------------------------
@pytest.fixture
def custom_code_model(tmp_path):
    """A model folder whose config asks transformers to import its own Python file, which would
    leave a marker file behind if it ever ran."""
    folder = tmp_path / "custom-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "bahe_untrusted", "num_hidden_layers": 2,
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}}))
    marker = tmp_path / "CUSTOM_CODE_RAN"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return folder, marker


def test_model_with_custom_code_is_refused_by_the_encoder(custom_code_model, monkeypatch):
    from bahe.embeddings.encoder import EncoderConfig, ShallowEncoder
    from bahe.embeddings.pretrained import num_layers

    folder, marker = custom_code_model
    prompts = []
    monkeypatch.setattr("builtins.input", lambda *a: prompts.append(a) or "y")
    with pytest.raises(ValueError, match="trust_remote_code"):
        ShallowEncoder(EncoderConfig(model=str(folder), k=1, device="cpu"))
    with pytest.raises(ValueError, match="trust_remote_code"):
        num_layers(folder)
    assert not marker.exists() and prompts == []


def test_model_with_custom_code_is_refused_by_the_deep_layers_without_a_prompt(custom_code_model, monkeypatch):
    from bahe.model.deep_layers import DeepLayerAggregator

    folder, marker = custom_code_model
    prompts = []
    monkeypatch.setattr("builtins.input", lambda *a: prompts.append(a) or "n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        DeepLayerAggregator(folder, 1)
    assert not marker.exists()
    assert prompts == []


# Configs ---------------------------------------------------------------------------------------------------
def _model_configs():
    from bahe.model.config import ArchConfig, TablesConfig, TextConfig

    return [
        ("tables-embedding-dim-0", lambda: TablesConfig(embedding_dim=0), "embedding_dim must be an integer in \\[1, 16,384\\]"),
        ("tables-rows-0", lambda: TablesConfig(rows={"item_id": 0}), r"table sizes must be integers in \[1, 17,179,869,184\]"),
        ("tables-rows-text", lambda: TablesConfig(rows={"item_id": "100"}), r"table sizes must be integers in \[1, 17,179,869,184\]"),
        ("tables-dropped-and-sized", lambda: TablesConfig(rows={"user_id": 5}, drop=("user_id",)),
         "both dropped and given a size"),
        ("tables-unknown-feature", lambda: TablesConfig(rows={"cat_colour": 5}).features(["user_id", "item_id"]),
         r"names ID features the data lacks: \['cat_colour'\]"),
        ("tables-drop-everything", lambda: TablesConfig(drop=("user_id", "item_id")).features(["user_id", "item_id"]),
         "leaves no ID feature"),
        ("arch-zero-layer", lambda: ArchConfig(over_arch_layer_sizes=(0, 1)), "layer sizes must be integers in \\[1, 16,384\\]"),
        ("arch-empty-dense", lambda: ArchConfig(dense_arch_layer_sizes=()), "dense_arch_layer_sizes"),
        ("text-k-0", lambda: TextConfig(store="s", k=0), r"TextConfig.k must be in \[1, 1024\]"),
        ("text-deep-0", lambda: TextConfig(store="s", deep_layers=0), "deep_layers must be in \\[1, 1024\\]"),
        ("text-max-behaviours-0", lambda: TextConfig(store="s", max_behaviours=0), "max_behaviours must be in \\[1, 65,536\\]"),
        ("text-duplicate-sequences", lambda: TextConfig(store="s", sequences=("a", "a")), "duplicates"),
        ("text-arm", lambda: TextConfig(store="s", arm="prompt"), "arm must be one of"),
        ("text-llm-precision", lambda: TextConfig(store="s", llm_precision="fp16"), "llm_precision must be one of"),
        ("text-attention", lambda: TextConfig(store="s", attention="sliding"), "attention must be one of"),
        ("text-user-tokens-0", lambda: TextConfig(store="s", max_user_tokens=0), "max_user_tokens must be in \\[1, 1,048,576\\]"),
    ]


@pytest.mark.parametrize(("make", "expect"), [c[1:] for c in _model_configs()], ids=[c[0] for c in _model_configs()])
def test_model_config_that_does_not_meet_is_refused(make, expect):
    with pytest.raises(ValueError, match=expect):
        make()


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"{split}.parquet").write_bytes(b"")
    return folder


@pytest.mark.parametrize(("change", "expect"), [
    ({"batch_size": 0}, "batch_size and steps must be >= 1"),
    ({"steps": 0}, "batch_size and steps must be >= 1"),
    ({"log_every": 0}, "log_every >= 1"),
    ({"eval_every": -1}, "eval_every and checkpoint_every must be >= 0"),
    ({"device": "tpu"}, "device must be auto, cpu or cuda"),
    ({"data": "csv"}, "data must be parquet, criteo_tsv or random"),
    ({"data": "criteo_tsv"}, "give criteo_tsv files exactly when data is 'criteo_tsv'"),
    ({"data": "criteo_tsv", "criteo_tsv": ("/nonexistent/day_0",)}, "Criteo TSV file"),
], ids=["batch-size-0", "steps-0", "log-every-0", "eval-every-negative", "device-tpu", "data-unknown",
        "criteo-without-files", "criteo-file-missing"])
def test_train_config_that_does_not_meet_is_refused(tmp_path, data_dir, change, expect):
    from bahe.training.config import TrainConfig

    with pytest.raises((ValueError, FileNotFoundError), match=expect):
        TrainConfig(data_dir=data_dir, out_dir=tmp_path / "out", **change)


def test_train_config_without_its_split_files_is_refused(tmp_path):
    from bahe.training.config import TrainConfig

    (tmp_path / "data").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train.parquet is missing: write the data with `bahe-data"):
        TrainConfig(data_dir=tmp_path / "data", out_dir=tmp_path / "out")


@pytest.mark.parametrize(("change", "expect"), [
    ({"dense_lr": 0.0}, "dense_lr must be > 0"), ({"sparse_lr": -1.0}, "sparse_lr must be > 0"),
    ({"grad_clip": -1.0}, "must be >= 0"), ({"decay": "step"}, "decay must be cosine, linear or none"),
], ids=["dense-lr-0", "sparse-lr-negative", "grad-clip-negative", "decay-unknown"])
def test_optimiser_config_that_does_not_meet_is_refused(change, expect):
    from bahe.training.config import OptimConfig

    with pytest.raises(ValueError, match=expect):
        OptimConfig(**change)


@pytest.mark.parametrize(("change", "expect"), [
    ({"k": 0}, "k must be >= 1"), ({"dtype": "float16"}, "dtype must be one of"),
    ({"device": "tpu"}, "device must be auto, cpu or cuda"), ({"max_tokens": 0}, "max_tokens must be >= 1"),
], ids=["k-0", "dtype-float16", "device-tpu", "max-tokens-0"])
def test_encoder_config_that_does_not_meet_is_refused(change, expect):
    from bahe.embeddings.encoder import EncoderConfig

    with pytest.raises(ValueError, match=expect):
        EncoderConfig(**change)


# CLI flags ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("argv", "expect"), [
    (["movielens", "--out", "{tmp}/ml", "--max-history", "-1"], "max_history must be >= 0"),
    (["synthetic", "--out", "{tmp}/s.parquet", "--users", "0"], r"SyntheticConfig.num_users=0: set it to"),
    (["synthetic", "--out", "{tmp}/s.parquet", "--sequence-types", "Bad"], "sequence_types"),
    (["criteo", "--out", "{tmp}/c.parquet", "{tmp}/absent.tsv"], "no such Criteo TSV file"),
    (["criteo", "--out", "{tmp}/c.parquet", "{tmp}/bad.tsv"], r"bad.tsv, row 1, field 'I1': not an integer"),
    (["summary", "{tmp}/bad.tsv"], "not a readable Parquet file"),
], ids=["movielens-max-history", "synthetic-users-0", "synthetic-bad-sequence-name", "criteo-missing-file",
        "criteo-bad-row", "summary-not-parquet"])
def test_bahe_data_flags_that_do_not_meet_exit_2_naming_the_problem(tmp_path, capsys, argv, expect):
    from bahe.ctr_data.cli import main

    fields = CRITEO_GOOD.split("\t")
    fields[1] = "x"
    (tmp_path / "bad.tsv").write_text(CRITEO_GOOD + "\n" + "\t".join(fields) + "\n")
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bahe-data: error: ") and __import__("re").search(expect, err)
    assert not (tmp_path / "c.parquet").exists()


@pytest.mark.parametrize(("flags", "expect"), [
    (["--k", "0"], "k must be >= 1"), (["--max-tokens", "0"], "max_tokens must be >= 1"),
    (["--max-tokens", "256"], r"batch_tokens \(128\) must be >= max_tokens \(256\)"),
    (["--device", "tpu"], "device must be auto, cpu or cuda"), (["--chunk-texts", "0"], "chunk_texts must be >= 1"),
    (["--model", "/nonexistent/model"], "not a local Hugging Face model directory"),
], ids=["k-0", "max-tokens-0", "max-tokens-over-batch", "device", "chunk-texts-0", "model-missing"])
def test_bahe_encode_flags_that_do_not_meet_exit_2_naming_the_problem(tmp_path, capsys, tiny_schema, flags, expect):
    from bahe.embeddings.cli import main

    with SampleWriter(tmp_path / "d.parquet", tiny_schema) as writer:
        writer.write(tiny_rows(2))
    argv = ["build", "--store", str(tmp_path / "store"), "--data", str(tmp_path / "d.parquet"), "--quiet", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bahe-encode: error: ") and __import__("re").search(expect, err)
    assert not (tmp_path / "store" / "LATEST").exists()


@pytest.mark.parametrize(("flags", "expect"), [
    (["--table-rows-for", "item_id:2000"], r"--table-rows-for takes FEATURE=ROWS"),
    (["--table-rows-for", "item_id=-5"], r"--table-rows-for takes FEATURE=ROWS"),
    (["--table-rows", "0"], "table sizes must be integers in \\[1, 17,179,869,184\\]"),
    (["--embedding-dim", "32"], r"last dense arch layer \(64\) must equal the embedding dim D \(32\)"),
    (["--over-arch", "16", "2"], "ending in 1"),
    (["--dense-arch", "0", "64"], "layer sizes must be integers in \\[1, 16,384\\]"),
    (["--max-behaviours", "0"], "max_behaviours must be in \\[1, 65,536\\]"),
    (["--k", "0"], "TextConfig.k must be in \\[1, 1024\\]"),
    (["--deep-layers", "0"], "deep_layers must be in \\[1, 1024\\]"),
    (["--steps", "0"], "batch_size and steps must be >= 1"),
    (["--batch-size", "0"], "batch_size and steps must be >= 1"),
    (["--sparse-lr", "0"], "sparse_lr must be > 0"),
    (["--arm", "bahe", "--no-store"], r"--arm bahe needs --store"),
    (["--random-data"], "exactly one data input"),
    (["--criteo-tsv", "{tmp}/absent.tsv"], r"Criteo TSV file\(s\) not found"),
], ids=["table-rows-for-colon", "table-rows-for-negative", "table-rows-0", "embedding-dim-vs-dense-arch",
        "over-arch-not-ending-in-1", "dense-arch-0", "max-behaviours-0", "k-0", "deep-layers-0", "steps-0",
        "batch-size-0", "sparse-lr-0", "bahe-without-store", "two-data-inputs", "criteo-tsv-missing"])
def test_bahe_train_flags_that_do_not_meet_are_refused_before_training(tmp_path, data_dir, flags, expect):
    from bahe.launchers.train import build_parser, config_from_args

    flags = [f.format(tmp=tmp_path) for f in flags]
    store = [] if "--no-store" in flags else ["--store", str(tmp_path / "store")]
    flags = [f for f in flags if f != "--no-store"]
    args = build_parser().parse_args(["--out", str(tmp_path / "run"), "--data-dir", str(data_dir), *store, *flags])
    with pytest.raises((ValueError, FileNotFoundError), match=expect):
        config_from_args(args)


def test_bahe_train_missing_splits_exit_2_before_anything_starts(tmp_path, capsys):
    from bahe.launchers.train import main

    (tmp_path / "empty").mkdir()
    assert main(["--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "empty"), "--arm", "dlrm"]) == 2
    assert "bahe-train: error: " in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.parametrize(("module", "argv"), [
    ("bahe.ctr_data.cli", ["synthetic", "--out", "x.parquet", "--samples", "many"]),
    ("bahe.embeddings.cli", ["build", "--store", "s", "--data", "d.parquet", "--k", "six"]),
    ("bahe.launchers.train", ["--out", "run", "--steps", "ten"]),
    ("bahe.launchers.train", ["--out", "run", "--arm", "prompt"]),
], ids=["bahe-data-samples-not-int", "bahe-encode-k-not-int", "bahe-train-steps-not-int", "bahe-train-unknown-arm"])
def test_cli_flag_of_the_wrong_type_exits_2_with_argparse_usage(capsys, module, argv):
    import importlib

    with pytest.raises(SystemExit) as info:
        importlib.import_module(module).build_parser().parse_args(argv)
    assert info.value.code == 2 and "invalid" in capsys.readouterr().err
