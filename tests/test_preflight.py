"""Bad input the trainer must refuse before step 1 (training/preflight.py, TrainConfig), a corrupt store
it must refuse while loading the rows (model/behaviour_lookup.py), and a loss that turns NaN mid-run
(training/health.py): one clear line, exit 2 from bahe-train, and no run state written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from bahe.ctr_data.criteo import write_criteo_splits
from bahe.ctr_data.parquet_io import SampleWriter
from bahe.embeddings.row_chunks import ROW_CHUNKS, RowChunks
from bahe.embeddings.store import MANIFEST_DIGEST, BehaviourStore, StoreError, manifest_digest
from tests.conftest import CRITEO_SAMPLE, tiny_rows
from tests.model_fixtures import make_tiny_pipeline, split_by_time

DLRM = ["--arm", "dlrm", "--batch-size", "16", "--embedding-dim", "8", "--dense-arch", "16", "8", "--over-arch",
        "16", "1", "--table-rows", "64", "--log-every", "1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    pipeline = make_tiny_pipeline(root / "pipeline")
    return pipeline, split_by_time(pipeline, root / "data")


def train_main(capsys, *argv) -> tuple[int, str]:
    from bahe.launchers.train import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_nothing_written(out: Path) -> None:
    """No run state: no checkpoints, TensorBoard events or metrics (a lock file may exist)."""
    assert not any((out / name).exists() for name in ("checkpoints", "tensorboard", "metrics.json")), \
        sorted(p.name for p in out.iterdir())


def copy_data(data: Path, to: Path) -> Path:
    shutil.copytree(data, to)
    return to


def text_arm(pipeline) -> list[str]:
    return ["--store", pipeline.store, "--llm", pipeline.llm, "--max-behaviours", "6", *DLRM[2:]]


# A corrupt store --------------------------------------------------------------------------------------------
def corrupt_store(pipeline, to: Path, *, fix_manifest: bool) -> Path:
    """A copy of the store with row 5 set to NaN; ``fix_manifest``: with its checksum rewritten to match
    (a store built with NaN in it), else left as written (a file changed afterwards)."""
    shutil.copytree(pipeline.store, to)
    version = BehaviourStore.open(to).path
    vectors = np.load(version / "vectors.npy", mmap_mode="r+")
    vectors[5, 3] = np.nan
    vectors.flush()
    del vectors
    if fix_manifest:
        manifest = json.loads((version / "manifest.json").read_text())
        manifest["files"]["vectors.npy"]["sha256"] = hashlib.sha256((version / "vectors.npy").read_bytes()).hexdigest()
        if ROW_CHUNKS in manifest:  # the per-chunk digests too (issue 28, item 3): only the NaN is wrong
            rows, chunks = np.load(version / "vectors.npy", mmap_mode="r"), RowChunks.from_manifest(manifest, version)
            manifest[ROW_CHUNKS]["vectors_sha256"] = [
                hashlib.sha256(np.ascontiguousarray(rows[slice(*chunks.span(i))]).tobytes()).hexdigest()
                for i in range(len(chunks.stops))]
            del rows
        if MANIFEST_DIGEST in manifest:
            manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
        (version / "manifest.json").write_text(json.dumps(manifest))
    return to


def lookup_for(store: BehaviourStore):
    from bahe.model.behaviour_lookup import BehaviourLookup

    return BehaviourLookup(store.rows_count, store.dim, ["item_text"], {"item_text": 1})


def test_store_rows_that_are_not_finite_are_refused_naming_the_file_and_row(setup, tmp_path):
    """A store whose checksums match but which holds NaN (built with it) is refused when its rows load."""
    from bahe.model.behaviour_lookup import load_store_rows

    store = BehaviourStore.open(corrupt_store(setup[0], tmp_path / "store", fix_manifest=True))
    with pytest.raises(StoreError, match=r"vectors.npy: row 5 holds a non-finite value \(nan\): the store is corrupt"):
        load_store_rows(lookup_for(store), store)


def test_store_file_changed_after_writing_is_refused_when_its_rows_load(setup, tmp_path):
    """A vectors.npy changed after the store was written (a finite change: only the checksum sees it)."""
    from bahe.model.behaviour_lookup import load_store_rows

    root = tmp_path / "store"
    shutil.copytree(setup[0].store, root)
    store = BehaviourStore.open(root)
    vectors = np.load(store.path / "vectors.npy", mmap_mode="r+")
    vectors[7] += 1.0
    vectors.flush()
    del vectors
    with pytest.raises(StoreError, match=r"vectors.npy: rows \[0, \d+\) \(checksum chunk 1 of 1, rank 0's\): "
                                         r"sha256 .* does not match the manifest's"):
        load_store_rows(lookup_for(store), BehaviourStore.open(root))
    clean = BehaviourStore.open(setup[0].store)
    assert load_store_rows(lookup_for(clean), clean) == clean.rows_count


def test_bahe_train_on_a_nan_store_exits_2_naming_the_store_file(setup, tmp_path, capsys, one_rank):
    """The reported case: NaN written into vectors.npy used to train to NaN metrics, exit 0 and a NaN
    checkpoint. Now: exit 2, one line naming the file, no checkpoint."""
    pipeline, data = setup
    store = corrupt_store(pipeline, tmp_path / "store", fix_manifest=False)
    out = tmp_path / "run"
    code, err = train_main(capsys, "--data-dir", data, "--out", out, "--steps", "2", *text_arm(pipeline)[2:],
                           "--store", store, "--arm", "bahe")
    assert code == 2 and "vectors.npy" in err and str(store) in err, err
    assert err.startswith("bahe-train: error: ") and err.count("\n") == 1
    assert not (out / "checkpoints").exists()


# A store built for other data -------------------------------------------------------------------------------
def with_foreign_texts(data: Path, to: Path) -> Path:
    """A copy of the splits whose every behaviour and item text is one the store has never seen."""
    from bahe.ctr_data.parquet_io import SampleReader

    to.mkdir()
    for split in ("train", "valid", "test"):
        reader = SampleReader(data / f"{split}.parquet")
        table = reader.read_all()
        for name in table.column_names:
            column = table.column(name)
            if name == "item_text":
                column = pc.binary_join_element_wise(column, pa.scalar("elsewhere"), " ")
            elif name.startswith("seq_"):
                column = pa.chunked_array([pa.ListArray.from_arrays(chunk.offsets, pc.binary_join_element_wise(
                    chunk.flatten(), pa.scalar("elsewhere"), " ")) for chunk in column.chunks])
            else:
                continue
            table = table.set_column(table.column_names.index(name), name, column)
        with SampleWriter(to / f"{split}.parquet", reader.schema) as writer:
            writer.write(table)
    return to


def test_a_store_built_for_other_data_is_refused_naming_store_data_and_rate(setup, tmp_path, capsys, one_rank):
    pipeline, data = setup
    foreign = with_foreign_texts(data, tmp_path / "foreign")
    out = tmp_path / "run"
    code, err = train_main(capsys, "--data-dir", foreign, "--out", out, "--arm", "bahe", *text_arm(pipeline))
    assert code == 2 and err.count("\n") == 1, err
    for part in ("100.0% of the texts in the first 320 rows", str(foreign / "train.parquet"), str(pipeline.store),
                 "over the limit of 5.0% (--max-unknown-rate)", f"bahe-encode build --store {pipeline.store} --data"):
        assert part in err, (part, err)
    assert_nothing_written(out)


def test_unknown_rate_counts_behaviour_and_item_texts_against_the_limit(setup, tmp_path):
    """The data the store was built from: 0% unknown, accepted; foreign texts: 100%, accepted only with a
    limit of 1 (the flag's way out for a store meant to be partial)."""
    from bahe.training.config import TrainConfig
    from bahe.training.preflight import PreflightError, preflight, unknown_text_rate
    from bahe.training.sources import ParquetData

    pipeline, data = setup
    store = BehaviourStore.open(pipeline.store)
    assert unknown_text_rate(data / "train.parquet", store, list(pipeline.schema.sequences))[:2] == (0.0, 0)
    foreign = with_foreign_texts(data, tmp_path / "foreign")
    rate, unknown, total, rows = unknown_text_rate(foreign / "train.parquet", store, [], sample_rows=50)
    assert (rate, unknown, total, rows) == (1.0, 50, 50, 50)  # item texts alone, first 50 rows
    config = TrainConfig(data_dir=foreign, out_dir=tmp_path / "run", model=pipeline.config(), batch_size=16)
    with pytest.raises(PreflightError, match="the store was built for other data"):
        preflight(config, ParquetData(foreign), world=1)
    preflight(TrainConfig(data_dir=foreign, out_dir=tmp_path / "run", model=pipeline.config(), batch_size=16,
                          max_unknown_text_rate=1.0), ParquetData(foreign), world=1)
    preflight(TrainConfig(data_dir=data, out_dir=tmp_path / "run", model=pipeline.config(), batch_size=16),
              ParquetData(data), world=1)


# Data the run cannot use ------------------------------------------------------------------------------------
def empty_split(data: Path, to: Path, split: str) -> Path:
    from bahe.ctr_data.parquet_io import SampleReader

    copy_data(data, to)
    with SampleWriter(to / f"{split}.parquet", SampleReader(data / "train.parquet").schema):
        pass
    return to


def other_schema_split(data: Path, to: Path, split: str) -> Path:
    from bahe.ctr_data.schema import SampleSchema

    copy_data(data, to)
    schema = SampleSchema(categorical=("genre",), dense=("age",), sequences=("liked", "disliked"), dataset="tiny")
    with SampleWriter(to / f"{split}.parquet", schema) as writer:
        writer.write(tiny_rows(4))
    return to


@pytest.mark.parametrize(("make", "flags", "expect"), [
    (lambda d, t: empty_split(d, t, "valid"), [], r"valid.parquet has no rows: the valid split is evaluated"),
    (lambda d, t: empty_split(d, t, "test"), [], r"test.parquet has no rows"),
    (lambda d, t: other_schema_split(d, t, "valid"), [], r"valid.parquet has another schema than .*train.parquet "
                                                         r"\(categorical: train has \[.*\], valid has \['genre'\]"),
    (lambda d, t: other_schema_split(d, t, "test"), [], r"test.parquet has another schema"),
    (lambda d, t: copy_data(d, t), ["--batch-size", "400"], r"fewer than one global batch \(400 x 1 ranks\)"),
], ids=["valid-empty", "test-empty", "valid-other-schema", "test-other-schema", "train-below-one-batch"])
def test_splits_the_run_cannot_use_exit_2_before_step_1(setup, tmp_path, capsys, one_rank, make, flags, expect):
    """Found before step 1 (they used to surface only after training had finished), nothing written."""
    import re

    data = make(setup[1], tmp_path / "data")
    out = tmp_path / "run"
    code, err = train_main(capsys, "--data-dir", data, "--out", out, "--steps", "2", *DLRM, *flags)
    assert code == 2 and err.startswith("bahe-train: error: ") and re.search(expect, err), err
    assert err.count("\n") == 1
    assert_nothing_written(out)


def test_a_text_arm_on_converted_criteo_parquet_says_use_dlrm(setup, tmp_path, capsys, one_rank):
    """Criteo converted to Parquet has no seq_* columns; the BAHE arm used to fail deep in the model
    factory with 'TextConfig.sequences []: ... unknown: []'."""
    data = tmp_path / "criteo"
    write_criteo_splits([CRITEO_SAMPLE], data)
    out = tmp_path / "run"
    code, err = train_main(capsys, "--data-dir", data, "--out", out, *text_arm(setup[0]))
    assert code == 2 and f"{data}: this data has no behaviour texts" in err and "use --arm dlrm" in err, err
    assert_nothing_written(out)


@pytest.mark.parametrize(("flags", "expect"), [
    (["--eval-batches", "0"], r"eval_batches=0: evaluation needs at least 1 batch"),
    (["--stop-at", "-1"], r"stop_at=-1: --stop-at N ends this invocation after step N, so N must be >= 1"),
    (["--stop-at", "0"], r"stop_at=0: .* N must be >= 1"),
    (["--max-unknown-rate", "1.5"], r"max_unknown_text_rate=1.5: give a fraction in \[0, 1\]"),
], ids=["eval-batches-0", "stop-at-negative", "stop-at-0", "unknown-rate-above-1"])
def test_run_flags_that_mean_nothing_exit_2(setup, tmp_path, capsys, flags, expect):
    """--stop-at -1 used to exit 0 having done nothing, --stop-at 0 was ignored, --eval-batches 0 failed
    after training."""
    import re

    out = tmp_path / "run"
    code, err = train_main(capsys, "--data-dir", setup[1], "--out", out, *DLRM, *flags)
    assert code == 2 and re.search(expect, err), err
    assert not out.exists()


# A loss that turns NaN -----------------------------------------------------------------------------------------
def test_a_nan_loss_stops_at_its_step_keeping_the_last_good_checkpoint(setup, tmp_path, capsys, one_rank):
    """A learning rate of 1e30 blows the weights up after the first update: training stops at the first
    non-finite loss (exit 2, naming the step and what to check); the checkpoint before it stays LATEST
    and no checkpoint of the NaN state is written."""
    import re

    out = tmp_path / "run"
    code, err = train_main(capsys, "--data-dir", setup[1], "--out", out, "--steps", "8", "--checkpoint-every", "1",
                           "--dense-lr", "1e30", "--warmup-steps", "0", "--grad-clip", "0", *DLRM)
    found = re.search(r"step (\d+): the training loss is (nan|inf)", err)
    assert code == 2 and found, err
    step = int(found.group(1))
    assert step >= 2 and "bahe-encode verify" in err and "--dense-lr" in err
    latest = (out / "checkpoints" / "LATEST").read_text().strip()
    assert latest == f"step-{step - 1:07d}" and f"{latest} stays LATEST" in err
    assert not (out / "checkpoints" / f"step-{step:07d}").exists() and not (out / "metrics.json").exists()
