"""The store's text index (issue 28, item 1): text -> row per batch from memory-mapped files, equal to the
dict-based resolution on real stores (unknown texts, empty text = padding, refreshed stores, stores written
before the index); 64-bit collisions never give a wrong row; a changed index file is refused, named; readers
hold no Python copy of the vocabulary and open the index once per process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from bahe.ctr_data.schema import SampleSchema
from bahe.embeddings import text_index as text_index_module
from bahe.embeddings import vocabulary as vocabulary_module
from bahe.embeddings.build import build_store
from bahe.embeddings.cli import main as encode_main
from bahe.embeddings.store import MANIFEST_DIGEST, BehaviourStore, StoreError, manifest_digest
from bahe.embeddings.text_index import FILES, SECTION, TextIndex, hash_texts
from bahe.embeddings.text_index_writer import write_text_index
from bahe.embeddings.vocabulary import PAD_ID, UNKNOWN_ID, BehaviourVocabulary, normalize_text
from bahe.model.batch import SampleBatcher
from tests.conftest import tiny_rows
from tests.llm_fixtures import make_tiny_llama
from tests.test_store import config, texts, write_samples

SCHEMA = SampleSchema(categorical=("genre",), dense=("age",), sequences=("liked", "disliked"), dataset="tiny")
DAY1 = {"liked": [texts("Pay", 12), [], ["  Café\tcrème  🍜 ", "Toy Story (1995)"]], "titles": ["Heat (1995)", "", "X"]}
DAY2 = {"liked": [texts("Pay", 5) + texts("Search", 9), ["Nouveau ✈"]], "titles": ["Heat (1995)", "Y"]}


def queries(store_texts: list[str]) -> list[str]:
    """Every store text (some re-spaced: normalised first), unknown texts, empty and blank texts, the reserved
    rows' literal texts (not real texts: unknown)."""
    real = store_texts[2:]
    return ([*real, *[f"  {t}\n" for t in real[::3]], "never encoded", "Pay coffee order 999", "", " ", "\u3000",
             "<pad>", "<unknown>", real[0] + " ", real[-1][:-1] or "zz"] * 2)


def dict_resolution(store_texts: list[str], asked: list[str]) -> list[int]:
    """Today's semantics, the obvious way: a dict of every store text."""
    rows = {text: row for row, text in enumerate(store_texts) if row >= 2}
    return [PAD_ID if not normalize_text(t) else rows.get(normalize_text(t), UNKNOWN_ID) for t in asked]


def build(root: Path, data_dir: Path, model: Path, day: dict, name: str) -> BehaviourStore:
    data = write_samples(data_dir / f"{name}.parquet", SCHEMA, day["liked"], day["titles"])
    build_store(root, [data], config(model), chunk_texts=4, show_progress=False)
    return BehaviourStore.open(root)


def strip_index(version: Path) -> None:
    """Make ``version`` what the writer wrote before text indexes: no index files, no section, re-digested."""
    manifest = json.loads((version / "manifest.json").read_text())
    for name in FILES:
        (version / name).unlink()
        del manifest["files"][name]
    del manifest[SECTION]
    manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
    (version / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def stores(tmp_path_factory, model):
    """A store of two versions (v000001, and its refresh v000002) built once; tests copy it before changing it."""
    folder = tmp_path_factory.mktemp("stores")
    build(folder / "store", folder, model, DAY1, "day1")
    build(folder / "store", folder, model, DAY2, "day2")
    return folder / "store"


@pytest.fixture
def store_copy(stores, tmp_path) -> Path:
    shutil.copytree(stores, tmp_path / "store")
    return tmp_path / "store"


@pytest.mark.parametrize("version", ["v000001", "v000002"])
def test_resolution_equals_the_dict_resolution_and_counts_unknowns(stores, version):
    store = BehaviourStore.open(stores, version)
    assert SECTION in store.manifest and store.manifest[SECTION]["texts"] == store.rows_count - 2
    index = store.text_index
    store_texts = store.vocabulary.texts
    asked = queries(store_texts)
    before = index.unknown_lookups
    got = index.lookup_array(pa.array(asked, pa.string()))
    expected = dict_resolution(store_texts, asked)
    assert got.tolist() == expected
    assert index.unknown_lookups - before == expected.count(UNKNOWN_ID) > 0
    assert index.lookup_array(pa.array(asked), count=False).tolist() == expected
    assert index.unknown_lookups - before == expected.count(UNKNOWN_ID)  # count=False: not counted
    assert index.texts(0, store.rows_count) == store_texts and store.texts(3, 5) == store_texts[3:5]
    assert len(index) == store.rows_count


def test_a_refresh_extends_the_parent_index_byte_for_byte_as_a_scratch_index(stores, tmp_path):
    """v000002's index (the parent's extended: appended bytes, merged hashes) equals one written from all
    its texts at once."""
    v1, v2 = BehaviourStore.open(stores, "v000001"), BehaviourStore.open(stores, "v000002")
    assert v2.rows_count > v1.rows_count and v2.texts(0, v1.rows_count) == v1.texts(0, v1.rows_count)
    (tmp_path / "scratch").mkdir()
    section = write_text_index(tmp_path / "scratch", v2.vocabulary.texts, 0, None)
    assert section == v2.manifest[SECTION]
    for name in FILES:
        assert (tmp_path / "scratch" / name).read_bytes() == (v2.path / name).read_bytes(), name


def test_the_batcher_on_the_index_equals_the_batcher_on_the_vocabulary(stores):
    """The batch (store rows per key, lengths) and every counter are those of the in-memory vocabulary."""
    store = BehaviourStore.open(stores)
    rows = tiny_rows(6)
    store_texts = store.vocabulary.texts
    rows["seq_liked"] = [[store_texts[2], "", "unknown one", store_texts[5]], [], [" ", store_texts[-1]],
                         ["never", "seen"], [store_texts[3]] * 7, [""]]
    rows["seq_disliked"] = [[store_texts[4]], ["x"], [], [store_texts[2], store_texts[3]], [], []]
    rows["item_text"] = [store_texts[6], "", "no such title", store_texts[2], " ", store_texts[-1]]
    table = pa.table(rows, schema=SCHEMA.arrow_schema())
    sizes = {"user_id": 50, "item_id": 500}
    on_index = SampleBatcher(SCHEMA, sizes, store.text_index, max_behaviours=3)
    on_vocab = SampleBatcher(SCHEMA, sizes, BehaviourVocabulary(store_texts), max_behaviours=3)
    a, b = on_index(table).behaviour_features, on_vocab(table).behaviour_features
    assert a.keys() == b.keys()
    assert a.values().tolist() == b.values().tolist() and a.lengths().tolist() == b.lengths().tolist()
    assert on_index.counters == on_vocab.counters and on_index.counters.unknown_behaviours == 4
    assert on_index.counters.unknown_item_texts == 1 and on_index.counters.empty_behaviour_texts == 3


def test_readers_hold_no_vocabulary_and_open_the_index_once_per_process(stores, monkeypatch, tmp_path):
    """The pre-flight look and the batcher never load the vocabulary's texts as Python objects; a second
    opening of the same version in the process returns the same index."""
    from bahe.ctr_data.parquet_io import SampleWriter
    from bahe.training.preflight import unknown_text_rate

    def refuse(*args, **kwargs):
        raise AssertionError("a reader loaded the vocabulary")

    monkeypatch.setattr(BehaviourVocabulary, "load", refuse)
    monkeypatch.setattr(vocabulary_module, "read_vocab_table", refuse)
    monkeypatch.setattr(text_index_module, "read_vocab_table", refuse)
    store = BehaviourStore.open(stores)
    assert store.text_index is BehaviourStore.open(stores).text_index
    rows = tiny_rows(4)
    rows["seq_liked"] = [store.texts(2, 4), ["unknown one"], [], [""]]
    with SampleWriter(tmp_path / "train.parquet", SCHEMA) as writer:
        writer.write(rows)
    assert unknown_text_rate(tmp_path / "train.parquet", store, ["liked", "disliked"])[1:3] == (5, 7)
    batcher = SampleBatcher(SCHEMA, {"user_id": 50}, store.text_index)
    batcher(pa.table(rows, schema=SCHEMA.arrow_schema()))
    assert batcher.counters.unknown_behaviours == 1 and batcher.counters.unknown_item_texts == 4


def test_a_store_written_before_the_index_opens_warns_once_and_its_refresh_writes_one(store_copy, model, tmp_path,
                                                                                      capsys):
    """Its texts are indexed in memory (one warning naming bahe-encode); the same rows; a refresh writes an index
    equal to a scratch one."""
    strip_index(store_copy / "v000001")
    strip_index(store_copy / "v000002")
    (store_copy / "LATEST").write_text("v000001\n")
    shutil.rmtree(store_copy / "v000002")
    old = BehaviourStore.open(store_copy)
    assert SECTION not in old.manifest and not (old.path / FILES[0]).exists()
    index = old.text_index
    assert not index.on_disk and BehaviourStore.open(store_copy).text_index is index
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "was written before stores carried a text index" in err
    assert f"bahe-encode build --store {store_copy}" in err
    asked = queries(old.vocabulary.texts)
    assert index.lookup_array(pa.array(asked)).tolist() == dict_resolution(old.vocabulary.texts, asked)
    old.verify()  # its files still verify
    new = build(store_copy, tmp_path, model, DAY2, "day2")
    assert new.version == "v000002" and new.text_index.on_disk
    asked = queries(new.vocabulary.texts)
    assert new.text_index.lookup_array(pa.array(asked)).tolist() == dict_resolution(new.vocabulary.texts, asked)
    (tmp_path / "scratch").mkdir()
    write_text_index(tmp_path / "scratch", new.vocabulary.texts, 0, None)
    for name in FILES:
        assert (tmp_path / "scratch" / name).read_bytes() == (new.path / name).read_bytes(), name


def weak_hash(texts) -> np.ndarray:
    """A planted collision generator: the byte length mod 3 (every text shares its hash with a third of the store)."""
    offsets, _ = text_index_module.string_parts(texts)
    return (np.diff(offsets) % 3).astype(np.uint64)


def test_planted_64_bit_collisions_never_give_a_wrong_row(model, tmp_path, monkeypatch):
    """With a hash that collides everywhere (written and read with it), resolution still equals the dict's: each
    candidate row's bytes are compared, equal hashes are walked, an unseen text of a store text's hash stays unknown;
    the writer counts the equal-hash pairs, also across a refresh's merge."""
    monkeypatch.setattr(text_index_module, "hash_texts", weak_hash)
    build(tmp_path / "store", tmp_path, model, DAY1, "day1")
    store = build(tmp_path / "store", tmp_path, model, DAY2, "day2")
    assert store.manifest[SECTION]["equal_hash_pairs"] == store.rows_count - 2 - len(np.unique(
        weak_hash(pa.array(store.vocabulary.texts[2:]))))
    store_texts = store.vocabulary.texts
    asked = queries(store_texts)
    index = store.text_index
    assert index.lookup_array(pa.array(asked)).tolist() == dict_resolution(store_texts, asked)
    assert index.hash_collisions_seen > 0
    (tmp_path / "scratch").mkdir()
    write_text_index(tmp_path / "scratch", store_texts, 0, None)
    for name in FILES:  # the merge of a refresh orders equal hashes by row, as a scratch index does
        assert (tmp_path / "scratch" / name).read_bytes() == (store.path / name).read_bytes(), name


def test_the_real_hash_is_blake2b_of_the_utf8_bytes():
    import hashlib

    texts = ["Café crème 🍜", "a", "Toy Story (1995)"]
    expected = [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") for t in texts]
    assert hash_texts(pa.array(texts)).tolist() == expected
    assert hash_texts(pa.array(["x", *texts]).slice(1)).tolist() == expected  # an array with an offset
    assert hash_texts(pa.array(texts, pa.large_string())).tolist() == expected


@pytest.mark.parametrize("name", FILES)
def test_a_changed_index_file_is_refused_naming_it(store_copy, name, capsys):
    """Flip one byte of an index file: opening the index refuses it, naming the file; so does bahe-encode verify."""
    path = store_copy / "v000002" / name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError) as refused:
        BehaviourStore.open(store_copy).text_index.lookup(["x"])
    assert f"{path}: checksum" in str(refused.value) and "changed after the store was written" in str(refused.value)
    assert encode_main(["verify", str(store_copy)]) == 2
    assert f"{path}: checksum" in capsys.readouterr().err


def test_verify_audits_the_index_against_the_vocabulary(store_copy, monkeypatch):
    """An index whose checksums were rewritten to match (a forged index) still fails the audit of verify."""
    version = store_copy / "v000002"
    rows = np.load(version / "text_rows.npy")
    rows[[0, 1]] = rows[[1, 0]]
    np.save(version / "text_rows.npy", rows)
    manifest = json.loads((version / "manifest.json").read_text())
    from bahe.embeddings.store import file_sha256

    manifest["files"]["text_rows.npy"]["sha256"] = file_sha256(version / "text_rows.npy")
    manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
    (version / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="text_rows.npy is not the sorted blake2b-64-le index"):
        BehaviourStore.open(store_copy).verify()


def test_lookup_refuses_nulls_and_takes_empty_batches(stores):
    index = BehaviourStore.open(stores).text_index
    with pytest.raises(ValueError, match="text 1 is null; a missing text is the empty text"):
        index.lookup_array(pa.array(["a", None], pa.string()))
    assert index.lookup_array(pa.array([], pa.string())).tolist() == []
    assert index.lookup(["", "nope"]) == [PAD_ID, UNKNOWN_ID]


def test_the_cache_is_per_version_and_store(stores, store_copy):
    """Another version, or a copy of the store elsewhere, is another index."""
    assert BehaviourStore.open(stores, "v000001").text_index is not BehaviourStore.open(stores).text_index
    assert BehaviourStore.open(store_copy).text_index is not BehaviourStore.open(stores).text_index
    assert isinstance(BehaviourStore.open(stores).text_index, TextIndex)


def test_a_refresh_failing_while_writing_the_index_keeps_the_parent_current(store_copy, model, tmp_path, monkeypatch):
    """A full disk while the new version's index is written: StoreWriteError naming the file, LATEST and the parent
    untouched, no half version; the same build run again publishes a complete one."""
    import errno

    from bahe.embeddings import build_io
    from bahe.embeddings.store import StoreWriteError

    (store_copy / "LATEST").write_text("v000001\n")
    shutil.rmtree(store_copy / "v000002")
    parent = {name: (store_copy / "v000001" / name).read_bytes() for name in FILES}
    class FullDisk:
        """A file whose writes fail as on a full disk."""

        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.handle, name)

    def fill_up(path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)  # noqa: SIM115 (the writer closes it)
        return FullDisk(handle) if Path(path).name == "text_hashes.npy" and "w" in mode else handle

    monkeypatch.setattr(build_io, "open", fill_up, raising=False)  # the index writer's files (build_io.NpyWriter)
    data = write_samples(tmp_path / "day2.parquet", SCHEMA, DAY2["liked"], DAY2["titles"])
    with pytest.raises(StoreWriteError, match=r"text_hashes.npy: No space left on device.*v000001 is intact"):
        build_store(store_copy, [data], config(model), chunk_texts=4, show_progress=False)
    assert (store_copy / "LATEST").read_text().strip() == "v000001" and not (store_copy / "v000002").exists()
    assert {name: (store_copy / "v000001" / name).read_bytes() for name in FILES} == parent
    monkeypatch.delattr(build_io, "open")
    build_store(store_copy, [data], config(model), chunk_texts=4, show_progress=False)
    store = BehaviourStore.open(store_copy)
    assert store.version == "v000002"
    store.verify()


@pytest.mark.parametrize("texts", [0, 1, 15, 16, 1000, 100_000])
def test_the_bucket_search_is_searchsorted(texts):
    """The search within buckets finds what numpy.searchsorted over the whole array finds, for hashes present,
    absent, at both ends and between buckets, with runs of equal hashes."""
    from bahe.embeddings.text_index import bucket_bits, bucket_starts

    rng = np.random.default_rng(texts)
    hashes = np.sort(rng.integers(0, 2**64, texts, dtype=np.uint64, endpoint=False))
    if texts > 10:
        hashes[5:9] = hashes[5]  # a run of equal hashes
    buckets = bucket_starts([hashes], texts)
    assert len(buckets) == 2 ** bucket_bits(texts) + 1 and buckets[-1] == texts
    index = TextIndex(Path("."), hashes, np.arange(texts), np.zeros(texts + 1, np.int64), np.zeros(0, np.uint8),
                      buckets, on_disk=False)
    edges = np.array([0, 1, 2**63, 2**64 - 1], dtype=np.uint64)
    wanted = np.concatenate([hashes, hashes + np.uint64(1), hashes - np.uint64(1), edges,
                             rng.integers(0, 2**64, 1000, dtype=np.uint64)])
    assert index._search(wanted).tolist() == np.searchsorted(hashes, wanted).tolist()


def test_the_text_lookup_bench_runs_and_its_tables_are_its_numbers(tmp_path):
    """bench/text_lookup_bench.py at toy sizes: every cell measured, the three resolvers give batches of the same
    size, and the page's ratios are those of the recorded numbers. Timings are not asserted."""
    import statistics
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "bench.text_lookup_bench", "--sizes", "300", "3000", "--batches", "2",
                           "--rounds", "1", "--batch-size", "16", "--seq-len", "5", "--distinct", "200", "--work",
                           str(tmp_path / "work"), "--out", str(tmp_path / "page")], cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads((tmp_path / "page.json").read_text())
    cells = {(c["size"], c["mode"]): c for c in found["cells"]}
    assert set(cells) == {(n, m) for n in (300, 3000) for m in ("before", "vocab_dict", "index")}
    for n in (300, 3000):
        assert len({cells[(n, m)]["values_per_batch"] for m in ("before", "vocab_dict", "index")}) == 1
    page = (tmp_path / "page.md").read_text()
    cpu = {int(n): statistics.median(v) for n, v in found["interleaved"]["cpu_s"].items()}
    assert f"| 3,000 | {statistics.median(found['interleaved']['wall_s']['3000']) * 1e3:.1f} |" in page
    assert f"{cpu[3000] / cpu[300]:.2f}x |" in page
    ratio = cells[(3000, "index")]["median_batch_s"] / cells[(300, "index")]["median_batch_s"]
    assert f"| 3,000 | index | {cells[(3000, 'index')]['median_batch_s'] * 1e3:.1f} | {ratio:.2f}x |" in page
