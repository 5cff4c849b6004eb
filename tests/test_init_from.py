"""Warm start (`bahe-train --init-from RUN_OR_CHECKPOINT [--init-optimizer]`), the daily update: a run
trained on day 1 and its store, then day 2's new texts appended to the store as new rows (bahe-encode
build), then day 2 trained from day 1's selected checkpoint.

Protected: every trainable weight equals the checkpoint's exactly, the frozen behaviour table equals
the GROWN store (nothing of it from the checkpoint), the optimizer is fresh unless --init-optimizer
(then equal to the checkpoint's), step / data position / schedules start at 0, on 1 and on 2 ranks;
the run records its store and start; a store whose shared rows differ, changed model flags, a missing
path or a folder that is no run are refused before step 1 with one line naming both sides."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from bahe.ctr_data.synthetic import SyntheticConfig, write_synthetic
from bahe.embeddings.build import build_store
from bahe.embeddings.encoder import EncoderConfig
from bahe.embeddings.store import BehaviourStore
from bahe.launchers import train
from bahe.training.run_record import RECORD, lineage_problem, store_record
from tests.dist.init_from_worker import frozen_differs_from_store, is_fresh, mismatches, tensors
from tests.llm_fixtures import make_tiny_llama
from tests.model_fixtures import K, TinyPipeline, make_tiny_pipeline, split_by_time
from tests.torchrun import torchrun

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--batch-size", "16", "--embedding-dim", "8", "--dense-arch", "16", "8", "--over-arch", "16", "1",
         "--table-rows", "64", "--max-behaviours", "6", "--log-every", "2"]
DAY2 = {"num_users": 200, "num_items": 60, "num_samples": 200, "behaviours_per_sequence": 8,
        "tokens_per_behaviour": 6, "distinct_behaviours": 40, "num_topics": 4, "seed": 1}  # other texts
# what the whole trainer touches: ID tables, dense and over arch, deep LLM layers, norms and projections
TRAINABLE_PARTS = ("embedding_bags.t_item_id.weight", "embedding_bags.t_user_id.weight", "dense_arch.",
                   "over_arch.", "aggregator.decoder.layers.0.", "aggregator.decoder.norm", "user_norm",
                   "item_projection")


@contextlib.contextmanager
def single_process():
    """bahe-train's code in this process as a 1-rank gloo group (environment restored, group destroyed)."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "TORCHELASTIC_RESTART_COUNT", "BAHE_TRACEBACK")
    saved = {key: os.environ.pop(key, None) for key in keys}
    try:
        yield
    finally:
        if dist.is_initialized():
            from bahe.embeddings.process_group import close_process_group

            close_process_group()
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def bahe_train(*argv) -> int:
    with single_process():
        return train.main([str(a) for a in argv])


def start(*argv):
    """The model as bahe-train starts it (flags defaulted and checked as its main() does), before step 1."""
    from bahe.training.loop import open_source, setup_distributed, start_model

    argv = [str(a) for a in argv]
    args = train.build_parser().parse_args(argv)
    train._init_from_defaults(args, argv)
    config = train.config_from_args(args)
    train._check_init_from(config)
    _, _, device = setup_distributed("cpu")
    return start_model(config, open_source(config, 0), 0, device), config


@dataclass
class Days:
    root: Path
    pipeline: TinyPipeline
    data1: Path
    data2: Path
    run1: Path
    best: Path  # run1's selected checkpoint
    reference: dict  # its tensors, read whole
    rows1: int  # store rows on day 1


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def days(tmp_path_factory) -> Days:
    root = tmp_path_factory.mktemp("init-from")
    pipeline = make_tiny_pipeline(root / "p")
    data1 = split_by_time(pipeline, _dir(root / "data1"))
    run1 = root / "run1"
    assert bahe_train("--data-dir", data1, "--store", pipeline.store, "--llm", pipeline.llm, "--out", run1,
                      "--steps", "4", "--eval-every", "2", "--eval-batches", "1", *MODEL) == 0
    rows1 = BehaviourStore.open(pipeline.store).rows_count
    # day 2: new samples with new texts, appended to the same store as a new version (the daily refresh)
    write_synthetic(SyntheticConfig(**DAY2), root / "day2.parquet")
    report = build_store(pipeline.store, [root / "day2.parquet"],
                         EncoderConfig(model=str(pipeline.llm), k=K, device="cpu", batch_tokens=64), show_progress=False)
    assert report.parent == "v000001" and report.rows > rows1
    data2 = split_by_time(TinyPipeline(pipeline.llm, root / "day2.parquet", pipeline.store), _dir(root / "data2"))
    best = run1 / "checkpoints" / f"step-{json.loads((run1 / 'checkpoints' / 'BEST.json').read_text())['step']:07d}"
    dcp_to_torch_save(best, root / "reference.pt")
    return Days(root, pipeline, data1, data2, run1, best, torch.load(root / "reference.pt", weights_only=True), rows1)


def test_warm_start_restores_every_trainable_weight_and_the_frozen_table_is_the_grown_store(days, tmp_path):
    """No model flag and no --store given: both default to day 1's (its store root, whose LATEST is now
    the refresh). Every trainable tensor equals the checkpoint's bit for bit; the behaviour table holds
    the grown store's rows, new ones included; the optimizer and the schedules are fresh."""
    with single_process():
        started, config = start("--init-from", days.run1, "--data-dir", days.data2, "--out", tmp_path / "day2")
        model_state, optimizer_state = started.dmp.state_dict(), started.optimizer.state_dict()
        assert mismatches(model_state, days.reference["model"]) == []
        compared = [key for key in model_state if "embeddings.behaviours." not in key]
        assert all(any(part in key for key in compared) for part in TRAINABLE_PARTS), compared
        store = BehaviourStore.open(days.pipeline.store)
        assert store.rows_count > days.rows1 and not frozen_differs_from_store(model_state, store)
        assert is_fresh(optimizer_state) and not is_fresh(days.reference["optimizer"])
        assert (started.start, started.checkpointer.rows_seen) == (0, 0)
        assert [s.last_epoch for s in started.schedulers] == [0, 0]
        assert started.initialized == {"run": str(days.run1), "checkpoint": str(days.best),
                                       "step": int(days.best.name[5:]), "optimizer": False}
    record = json.loads((tmp_path / "day2" / RECORD).read_text())  # recorded before step 1
    assert record["store"]["version"] == "v000002" and record["store"]["rows"] == store.rows_count
    assert record["store"]["root"] == str(days.pipeline.store) and record["initialized_from"] == started.initialized
    assert record["model"] == json.loads((days.run1 / RECORD).read_text())["model"]
    assert config.batch_size == 16  # a default taken from day 1's record too


def test_init_optimizer_loads_the_optimizer_state_and_keeps_this_runs_learning_rates(days, tmp_path):
    with single_process():
        started, config = start("--init-from", days.best, "--init-optimizer", "--dense-lr", "0.002",
                                "--data-dir", days.data2, "--out", tmp_path / "day2")
        optimizer_state = started.optimizer.state_dict()
        assert mismatches(optimizer_state, days.reference["optimizer"]) == []
        assert len(tensors(optimizer_state)) == len(tensors(days.reference["optimizer"])) and not is_fresh(
            optimizer_state)
        assert mismatches(started.dmp.state_dict(), days.reference["model"]) == []
        # the schedule starts at its step 0 (10% warm-up) from this run's --dense-lr, not the checkpoint's
        assert started.groups["dense"].param_groups[0]["lr"] == pytest.approx(0.1 * 0.002)


def test_bahe_train_init_from_trains_records_the_start_and_a_rerun_resumes(days, tmp_path, capsys):
    out = tmp_path / "day2"
    assert bahe_train("--init-from", days.run1, "--data-dir", days.data2, "--out", out, "--steps", "2") == 0
    log = capsys.readouterr().out
    assert f"initialized from {days.best}" in log and "optimizer state fresh" in log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["initialized_from"]["checkpoint"] == str(days.best) and metrics["resumed_from_step"] == 0
    assert metrics["steps_run"] == 2
    # the same command again, longer (a rerun of the day): the run's own checkpoint wins
    assert bahe_train("--init-from", days.run1, "--data-dir", days.data2, "--out", out, "--steps", "3") == 0
    log = capsys.readouterr().out
    assert "not applied" in log and "own checkpoint step-0000002, which wins" in log
    assert "resumed from checkpoint step-0000002" in log and "initialized from" not in log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 2 and metrics["initialized_from"]["checkpoint"] == str(days.best)
    assert json.loads((out / RECORD).read_text())["initialized_from"] == metrics["initialized_from"]


def refused(capsys, out: Path, *argv) -> str:
    """bahe-train refuses: exit 2, one line, nothing of a run (no checkpoint, no record) in ``out``."""
    assert bahe_train(*argv, "--out", out, "--steps", "2") == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("bahe-train: error: ")]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err[-3000:]
    assert not (out / "checkpoints").exists() and not (out / RECORD).exists()
    return lines[0]


@pytest.mark.parametrize("flags, expect", [
    (["--embedding-dim", "16", "--dense-arch", "16", "16"], "--embedding-dim: run has 8, now 16"),
    (["--deep-layers", "1"], "--deep-layers: run has the default, now 1"),
    (["--table-rows-for", "item_id=32"], "--table-rows-for: run has [], now ['item_id=32']"),
])
def test_a_model_that_differs_from_the_checkpoints_is_refused_naming_each_flag(days, tmp_path, capsys, flags, expect):
    line = refused(capsys, tmp_path / "day2", "--init-from", days.run1, "--data-dir", days.data2, *flags)
    assert expect in line and f"--init-from {days.best} was trained with other model flags" in line


def test_a_missing_path_a_folder_that_is_no_run_and_a_run_without_checkpoint_are_refused(days, tmp_path, capsys):
    common = ["--data-dir", days.data2, "--store", days.pipeline.store, "--llm", days.pipeline.llm]
    line = refused(capsys, tmp_path / "a", "--init-from", tmp_path / "nowhere", *common)
    assert f"--init-from {tmp_path / 'nowhere'} does not exist" in line
    line = refused(capsys, tmp_path / "b", "--init-from", days.data2, *common)
    assert f"--init-from {days.data2} is no run folder" in line
    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    line = refused(capsys, tmp_path / "c", "--init-from", tmp_path / "unfinished", *common)
    assert "holds no checkpoint yet" in line


def _store(root: Path, files: list[Path], llm: Path, k: int = K) -> Path:
    build_store(root, files, EncoderConfig(model=str(llm), k=k, device="cpu", batch_tokens=64), show_progress=False)
    return root


@pytest.mark.parametrize("which", ["another_k", "another_llm", "rebuilt_from_scratch"])
def test_a_store_whose_shared_rows_differ_is_refused_naming_both_stores(days, tmp_path, capsys, which):
    """Day 2 on a store that holds both days' texts but is not day 1's store or a refresh of it: encoded
    with another k, by another LLM, or built from scratch over both days (every text sorted anew, so the
    ids of day 1's texts moved)."""
    day1, day2, llm = days.pipeline.data, days.root / "day2.parquet", days.pipeline.llm
    if which == "another_llm":
        llm = make_tiny_llama(tmp_path / "llm2", layers=4, hidden=32, seed=1)
    store = _store(tmp_path / "store", [day1, day2], llm, k=1 if which == "another_k" else K)
    line = refused(capsys, tmp_path / "day2", "--init-from", days.run1, "--data-dir", days.data2, "--store", store,
                   "--llm", llm)
    new = BehaviourStore.open(store)
    assert f"was trained on store {days.pipeline.store} v000001 (llm {days.pipeline.llm}, k {K}, {days.rows1:,} rows)" \
        in line
    assert f"this run's store {store} v000001 (llm {llm}, k {new.manifest['encoder']['k']}, {new.rows_count:,} rows)" \
        in line
    assert {"another_k": "another k (1, the run's 2)", "another_llm": "encoded by another LLM",
            # another store's checksummed chunks do not end at day 1's rows (run_record.chunk_digest)
            "rebuilt_from_scratch": "neither that store nor a refresh of it"}[which] in line


def test_a_resume_on_a_store_that_does_not_hold_the_runs_rows_is_refused(days, tmp_path, capsys):
    run = tmp_path / "run1"
    shutil.copytree(days.run1, run)
    store = _store(tmp_path / "store", [days.root / "day2.parquet", days.pipeline.data], days.pipeline.llm)
    assert bahe_train("--data-dir", days.data1, "--store", store, "--llm", days.pipeline.llm, "--out", run,
                      "--steps", "6", *MODEL) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bahe-train: error: ")]
    assert f"{run} was trained on store {days.pipeline.store} v000001" in line and "nor a refresh of it" in line
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step-0000004"


def test_store_lineage_accepts_the_store_and_its_refresh_and_names_fewer_rows_and_other_vectors(days):
    day1 = BehaviourStore.open(days.pipeline.store, "v000001")
    grown = BehaviourStore.open(days.pipeline.store)
    recorded = store_record(day1)
    assert lineage_problem(recorded, day1) is None and lineage_problem(recorded, grown) is None
    assert lineage_problem(store_record(grown), day1) == f"it has fewer rows ({day1.rows_count:,}, the run's " \
                                                         f"{grown.rows_count:,})"
    assert "vectors of its first" in lineage_problem({**recorded, "vectors_digest": "0" * 64}, grown)


def test_a_dlrm_only_run_warm_starts_without_a_store(days, tmp_path):
    dlrm = ["--arm", "dlrm", *MODEL]
    assert bahe_train("--data-dir", days.data1, "--out", tmp_path / "dlrm1", "--steps", "2", *dlrm) == 0
    dcp_to_torch_save(tmp_path / "dlrm1" / "checkpoints" / "step-0000002", tmp_path / "ref.pt")
    with single_process():
        started, _ = start("--init-from", tmp_path / "dlrm1", "--data-dir", days.data2, "--out", tmp_path / "day2")
        reference = torch.load(tmp_path / "ref.pt", weights_only=True)
        assert mismatches(started.dmp.state_dict(), reference["model"]) == []
    assert json.loads((tmp_path / "day2" / RECORD).read_text())["store"] is None


@pytest.mark.integration
def test_two_ranks_warm_start_from_a_one_rank_run_with_its_optimizer_state(days, tmp_path):
    """DCP reshards the 1-rank checkpoint onto 2 ranks' sharding plan: every local shard equals the
    checkpoint's, optimizer state included, and the behaviour table is the grown store on every rank."""
    torchrun(ROOT / "tests" / "dist" / "init_from_worker.py", days.root / "reference.pt", tmp_path, "--",
             "--init-from", days.run1, "--init-optimizer", "--data-dir", days.data2, "--out", tmp_path / "day2",
             "--batch-size", "8", timeout=300)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for result in results:
        assert result["world"] == 2 and result["start"] == 0 and result["initialized"]["optimizer"] is True
        assert result["model"] == [] and result["optimizer"] == [] and not result["optimizer_fresh"]
        assert not result["frozen_differs_from_store"]
    full = results[0]["full"]  # the tables are split between the ranks, each compared its own part
    assert {key: results[0]["local"][key] + results[1]["local"][key] for key in full} == full
    assert any(results[0]["local"][key] < full[key] for key in full)  # not all on rank 0


def test_init_optimizer_without_init_from_is_refused(days, tmp_path, capsys):
    assert bahe_train("--init-optimizer", "--data-dir", days.data2, "--store", days.pipeline.store, "--out",
                      tmp_path / "day2") == 2
    err = capsys.readouterr().err.strip()
    assert err == ("bahe-train: error: TrainConfig.init_optimizer loads the optimizer state of the run given by "
                   "init_from: add --init-from RUN_OR_CHECKPOINT, or leave out --init-optimizer")
