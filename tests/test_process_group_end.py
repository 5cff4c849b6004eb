"""A rank ends its process group while the interpreter is alive (embeddings/process_group.close_process_group).

Protected: when bahe-train's main() returns, the gloo backend it created is gone, its worker and transport threads
joined. ``destroy_process_group`` alone leaves them running: DistributedModelParallel's module graph holds the
backend in reference cycles, so it would be destroyed during interpreter finalization, where a 2-rank run that had
finished its work intermittently aborted ("terminate called without an active exception", exit -6)."""

from __future__ import annotations

import gc
import os

import pytest
import torch.distributed as dist

from bahe.embeddings import process_group
from bahe.embeddings.process_group import backend_threads, close_process_group
from tests.model_fixtures import make_tiny_pipeline, split_by_time

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"),
                                reason="threads are read from /proc (Linux)")
SMALL = ["--batch-size", "16", "--embedding-dim", "8", "--dense-arch", "16", "8", "--over-arch", "16", "1",
         "--table-rows", "64", "--max-behaviours", "6", "--steps", "2", "--eval-every", "0"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("group_end")
    tiny = make_tiny_pipeline(root / "pipeline")
    return tiny, split_by_time(tiny, root / "data")


def train(pipeline, out) -> int:
    from bahe.launchers.train import main

    tiny, data = pipeline
    return main([str(a) for a in ("--data-dir", data, "--store", tiny.store, "--llm", tiny.llm, "--out", out, *SMALL)])


def test_bahe_train_leaves_no_gloo_thread_behind_when_main_returns(pipeline, tmp_path, one_rank):
    gc.collect()
    before = set(backend_threads())
    assert train(pipeline, tmp_path / "run") == 0
    assert not dist.is_initialized()
    assert set(backend_threads()) - before == set(), backend_threads()


def test_destroy_process_group_alone_leaves_the_backend_alive_in_dmps_cycles(pipeline, tmp_path, one_rank,
                                                                            monkeypatch):
    """Why close_process_group collects: with destroy alone, the threads of the backend main() created outlive
    main() (collected only when the garbage collector next runs; at exit, during finalization)."""
    gc.collect()
    before = set(backend_threads())
    monkeypatch.setattr(process_group.gc, "collect", lambda *a: 0)  # close_process_group without its collection
    gc.disable()  # and no automatic collection in between
    try:
        assert train(pipeline, tmp_path / "run") == 0
        assert not dist.is_initialized()
        left = set(backend_threads()) - before
    finally:
        gc.enable()
        monkeypatch.undo()
    assert left, "the backend was freed without a collection: the cycles this guards against are gone"
    close_process_group()
    assert set(backend_threads()) - before == set()
