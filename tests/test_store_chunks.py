"""Issue 28, items 3 and 4: integrity that scales, half-precision stores.

Item 3: a store's manifest carries per-chunk checksums of its rows (embeddings/row_chunks.py); a refresh
carries its parent's over; a flipped byte is refused at load by the rank whose rows hold it and by
`bahe-encode verify`, naming the file and the chunk's rows; a rank hashes the chunks of its own rows only;
the run record's store digest comes from the manifest without reading a row, and still tells a changed
store; the process-group timeout reaches the group. Item 4: `--store-dtype float16 / bfloat16` stores
hold the float32 rows cast by torch bit for bit, a refresh keeps the dtype (refuses another), verify and
the table load accept them, and a few training steps run on a bfloat16 store.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bahe.embeddings import row_chunks
from bahe.embeddings.build import build_store
from bahe.embeddings.cli import main as bahe_encode
from bahe.embeddings.shard_reader import ShardReader
from bahe.embeddings.store import BehaviourStore, StoreError
from bahe.model.behaviour_lookup import BehaviourLookup, _integrity_problem, load_store_rows, table_dtype
from bahe.training.run_record import chunk_digest, lineage_problem, store_record
from tests.llm_fixtures import make_tiny_llama
from tests.test_store import config, texts, write_samples

SCHEMA = dict(categorical=("genre",), dense=("age",), sequences=("liked", "disliked"), dataset="tiny")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A store of 3-row digest chunks (v000001: 26 rows), refreshed (v000002), plus float16 / bfloat16 twins."""
    from bahe.ctr_data.schema import SampleSchema

    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("chunks")
    llm = make_tiny_llama(root / "llm")
    schema = SampleSchema(**SCHEMA)
    day1 = write_samples(root / "a.parquet", schema, [texts("Pay", 22), []], ["T1", "T2"])
    day2 = write_samples(root / "b.parquet", schema, [texts("Ride", 7)], ["T3"])
    mp.setattr(row_chunks, "DIGEST_CHUNK_BYTES", 3 * 32 * 4)  # 3 rows of the tiny LLM's 32 floats
    stores = {}
    for dtype in ("float32", "float16", "bfloat16"):
        stores[dtype] = root / f"store-{dtype}"
        build_store(stores[dtype], [day1], config(llm), show_progress=False, store_dtype=dtype)
        build_store(stores[dtype], [day2], config(llm), show_progress=False)  # a refresh: keeps the dtype
    mp.undo()
    return {"root": root, "llm": llm, "day1": day1, "day2": day2, **stores}


@pytest.fixture
def store(built, tmp_path) -> Path:
    shutil.copytree(built["float32"], tmp_path / "store")
    return tmp_path / "store"


def flip(store: BehaviourStore, row: int) -> None:
    """Flip one byte inside ``row`` of vectors.npy (in place; the manifest untouched)."""
    path = store.path / "vectors.npy"
    data = bytearray(path.read_bytes())
    header = len(data) - store.rows_count * store.dim * 4
    data[header + row * store.dim * 4 + 5] ^= 0x40
    path.write_bytes(bytes(data))


def test_the_manifest_cuts_the_rows_into_checksummed_chunks_and_a_refresh_carries_its_parents_over(built):
    one, two = BehaviourStore.open(built["float32"], "v000001"), BehaviourStore.open(built["float32"])
    assert one.rows_count == 26 and one.row_chunks.stops == (3, 6, 9, 12, 15, 18, 21, 24, 26)
    # the parent's chunks (its partial last one too) carried over; the new rows cut from the parent's last row
    assert two.row_chunks.stops[:9] == one.row_chunks.stops and two.row_chunks.vectors[:9] == one.row_chunks.vectors
    assert two.row_chunks.stops[9:] == (29, 32, 34) and two.rows_count == 34
    raw = np.load(two.path / "vectors.npy")
    for i, (start, stop) in enumerate(map(two.row_chunks.span, range(len(two.row_chunks.stops)))):
        assert row_chunks.hashlib.sha256(raw[start:stop].tobytes()).hexdigest() == two.row_chunks.vectors[i]
        assert row_chunks.texts_digest(two.texts(start, stop)) == two.row_chunks.texts[i]


def test_a_flipped_byte_is_refused_by_verify_naming_the_file_and_the_rows(store, capsys):
    assert bahe_encode(["verify", str(store)]) == 0
    assert "every checksum matches (12 row chunk(s) and every file)" in capsys.readouterr().out
    opened = BehaviourStore.open(store)
    flip(opened, 30)  # in chunk [29, 32)
    assert bahe_encode(["verify", str(store)]) == 2
    err = capsys.readouterr().err
    assert f"{opened.path / 'vectors.npy'}: rows [29, 32) (checksum chunk 11 of 12)" in err


def test_a_flipped_byte_is_refused_at_load_by_the_rank_holding_it_naming_the_file_and_the_rows(store):
    opened = BehaviourStore.open(store)
    flip(opened, 7)
    lookup = BehaviourLookup(opened.rows_count, opened.dim, ["item_text"], {"item_text": 1})
    with pytest.raises(StoreError) as refused:
        load_store_rows(lookup, opened)
    assert str(refused.value).startswith(f"{opened.path / 'vectors.npy'}: rows [6, 9) (checksum chunk 3 of 12, "
                                         "rank 0's): sha256 ")
    # the rank whose rows are [12, 34) (row-wise, 2 ranks) hashes only its own chunks and passes; rows [0, 12)'s refuses
    with ShardReader(opened) as reader:
        assert _integrity_problem(reader, opened, [(None, 12, 0, 22, opened.dim)], 0, 1) is None
        assert reader.delivered.verified == list(range(4, 12))
        assert reader.delivered.verified_bytes == 22 * opened.dim * 4  # its rows' bytes, no more
    with ShardReader(opened) as reader:
        assert "rows [6, 9)" in _integrity_problem(reader, opened, [(None, 0, 0, 12, opened.dim)], 0, 1)


def test_the_run_records_store_digest_reads_no_row_and_still_tells_a_changed_store(built, tmp_path, monkeypatch):
    one, two = BehaviourStore.open(built["float32"], "v000001"), BehaviourStore.open(built["float32"])
    for name in ("rows", "raw_rows", "texts"):  # the digest comes from the manifest alone
        monkeypatch.setattr(BehaviourStore, name, lambda *a, **k: pytest.fail("the store digest read the store"))
    recorded = store_record(one)
    assert {k: recorded[k] for k in ("texts_digest", "vectors_digest")} == chunk_digest(one, 26)
    assert "texts_sha256" not in recorded and lineage_problem(recorded, one) is None
    assert lineage_problem(recorded, two) is None  # a refresh holds the run's rows unchanged
    monkeypatch.undo()
    monkeypatch.setattr(row_chunks, "DIGEST_CHUNK_BYTES", 3 * 32 * 4)  # chunked as the run's store
    # the same texts, rows encoded otherwise (the manifest's digests of another store): refused
    other = tmp_path / "other"
    build_store(other, [built["day1"]], config(built["llm"], pooling="last"), show_progress=False)
    changed = BehaviourStore.open(other)
    assert "vectors of its first 26 rows are not the run's" in lineage_problem(
        {**recorded, "encoder": changed.encoding}, changed)
    # built from scratch over both days: other chunks, other ids
    both = tmp_path / "both"
    build_store(both, [built["day2"], built["day1"]], config(built["llm"]), show_progress=False)
    assert "neither that store nor a refresh of it" in lineage_problem(recorded, BehaviourStore.open(both))


def test_a_store_written_before_chunk_checksums_opens_and_verifies_as_before(store, capsys):
    path = store / "v000002" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["row_chunks"]
    from bahe.embeddings.store import manifest_digest

    manifest["manifest_sha256"] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest))
    old = BehaviourStore.open(store)
    assert old.row_chunks is None and "texts_sha256" in store_record(old)
    assert bahe_encode(["verify", str(store)]) == 0
    assert "written before per-chunk checksums" in capsys.readouterr().out
    lookup = BehaviourLookup(old.rows_count, old.dim, ["item_text"], {"item_text": 1})
    load_store_rows(lookup, old)
    assert "written before per-chunk checksums: rank 0 checks its whole files" in capsys.readouterr().out
    flip(old, 30)
    with pytest.raises(StoreError, match="vectors.npy: checksum"):
        load_store_rows(lookup, old)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_half_precision_store_holds_the_float32_rows_cast_by_torch_bit_for_bit(built, dtype, capsys):
    full, half = BehaviourStore.open(built["float32"]), BehaviourStore.open(built[dtype])
    assert half.store_dtype == dtype and half.manifest["parent"] == "v000001"  # the refresh kept it
    cast = torch.from_numpy(full.rows(0, full.rows_count)).to(getattr(torch, dtype))
    on_disk = np.load(half.path / "vectors.npy")
    assert on_disk.dtype == (np.uint16 if dtype == "bfloat16" else np.float16)
    assert np.array_equal(on_disk.view(np.uint16), cast.view(torch.uint16).numpy())
    assert torch.equal(torch.from_numpy(half.rows(0, half.rows_count)), cast.float())
    assert bahe_encode(["verify", str(built[dtype])]) == 0
    # the table: float16 as it is; bfloat16 upcast to float32 on CPU (fbgemm has no CPU bfloat16 lookup), one line
    want = table_dtype(dtype, "cpu")
    assert want == (torch.float16 if dtype == "float16" else torch.float32)
    lookup = BehaviourLookup(half.rows_count, half.dim, ["item_text"], {"item_text": 1}, dtype=want)
    capsys.readouterr()
    load_store_rows(lookup, half)
    weight = lookup.embedding_collection.embeddings["behaviours"].weight
    assert weight.dtype == want and torch.equal(weight.float(), cast.float())
    assert ("upcast to torch.float32" in capsys.readouterr().out) == (dtype == "bfloat16")


def test_a_refresh_refuses_another_store_dtype_naming_both(built, tmp_path):
    copy = tmp_path / "s"
    shutil.copytree(built["bfloat16"], copy)
    more = write_samples(tmp_path / "c.parquet", __import__("bahe.ctr_data.schema", fromlist=["x"]).SampleSchema(
        **SCHEMA), [texts("Fly", 3)], ["T9"])
    with pytest.raises(StoreError, match=r"\(store dtype bfloat16\) with --store-dtype float16"):
        build_store(copy, [more], config(built["llm"]), show_progress=False, store_dtype="float16")


def test_the_process_group_gets_the_configured_timeout(monkeypatch):
    import torch.distributed as dist

    from bahe.launchers.train import build_parser
    from bahe.training.loop import setup_distributed

    assert "--pg-timeout SECONDS" in build_parser().format_help()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.setenv(key, "0")  # recorded as it was (absent too), so the RANK=0 ... setup_distributed sets
        monkeypatch.delenv(key)       # for a plain process is undone after the test, for the worker's next tests
    setup_distributed("cpu", 123.0)
    try:
        backend = dist.group.WORLD._get_backend(torch.device("cpu"))
        assert backend.options._timeout == datetime.timedelta(seconds=123)
    finally:
        from bahe.embeddings.process_group import close_process_group

        close_process_group()


def test_a_few_training_steps_run_on_a_bfloat16_store(tmp_path, capsys):
    from bahe.ctr_data.synthetic import SyntheticConfig, write_synthetic
    from bahe.embeddings.encoder import EncoderConfig
    from tests.model_fixtures import TINY_HIDDEN, TINY_LAYERS, K, TinyPipeline, split_by_time
    from tests.test_init_from import MODEL, bahe_train

    llm = make_tiny_llama(tmp_path / "llm", layers=TINY_LAYERS, hidden=TINY_HIDDEN)
    write_synthetic(SyntheticConfig(num_users=200, num_items=60, num_samples=400, behaviours_per_sequence=8,
                                    tokens_per_behaviour=6, distinct_behaviours=40, num_topics=4), tmp_path / "s.parquet")
    build_store(tmp_path / "store", [tmp_path / "s.parquet"], EncoderConfig(model=str(llm), k=K, device="cpu",
                batch_tokens=64), show_progress=False, store_dtype="bfloat16")
    data = split_by_time(TinyPipeline(llm, tmp_path / "s.parquet", tmp_path / "store"), tmp_path / "data")
    assert bahe_train("--data-dir", data, "--store", tmp_path / "store", "--llm", llm, "--out", tmp_path / "run",
                      "--steps", "4", *MODEL) == 0
    out = capsys.readouterr().out
    assert "rows are upcast to torch.float32 chunk by chunk" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and 0.0 <= metrics["test"]["auc"] <= 1.0
