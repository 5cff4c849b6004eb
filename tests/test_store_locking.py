"""One writer per store and per run folder: a second `bahe-encode build` of a store, or a second
`bahe-train` into a run folder, is refused at once naming the first (PID, host, start time) and touches
nothing of it; a lock left by a killed process blocks nobody; under torchrun every rank fails together.
A build of another plan never deletes or mixes in an interrupted build's chunks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bahe.embeddings import build as build_module
from bahe.embeddings.build import WORK, build_store
from bahe.embeddings.folder_lock import LOCK_FILE, FolderBusyError, FolderLock
from bahe.embeddings.store import LATEST, BehaviourStore, StoreWriteError
from tests.llm_fixtures import make_tiny_llama
from tests.test_store import _encode_cli, config, texts, write_samples

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

# holds FolderLock(argv[1]) until its stdin closes; with argv[2] == "die" it SIGKILLs itself while holding it
HOLD = """
import os, signal, sys
from bahe.embeddings.folder_lock import FolderLock
FolderLock(sys.argv[1], "held").acquire()
print("held", flush=True)
if sys.argv[2] == "die":
    os.kill(os.getpid(), signal.SIGKILL)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def hold_lock(folder: Path, then: str = "wait") -> subprocess.Popen:
    """Another process that holds ``folder``'s lock (it has printed 'held' when this returns)."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), then], cwd=ROOT, env=ENV,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def holder():
    procs: list[subprocess.Popen] = []

    def start(folder: Path, then: str = "wait") -> subprocess.Popen:
        procs.append(hold_lock(folder, then))
        return procs[-1]

    yield start
    for proc in procs:
        proc.stdin.close()
        proc.wait(timeout=30)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


@pytest.mark.integration
def test_a_second_build_while_one_is_running_is_refused_and_the_first_ends_as_if_alone(tmp_path, tiny_llama,
                                                                                         tiny_schema):
    """A real build runs in another process; a second build of the same store (other data) is refused
    naming its PID and host, and the first publishes exactly the store it builds alone. Before the lock
    both planned v000001 in one work folder and the first published a mix of their vectors."""
    data_a = write_samples(tmp_path / "a.parquet", tiny_schema, [texts("Pay", 160)], ["T"])
    data_b = write_samples(tmp_path / "b.parquet", tiny_schema, [texts("Search", 160)], ["T"])
    root = tmp_path / "store"
    first = subprocess.Popen(_encode_cli(root, data_a, tiny_llama), cwd=ROOT, env=ENV, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 120
    while not list(root.glob(f"{WORK}/v000001/chunk-*.npy")) and time.time() < deadline and first.poll() is None:
        time.sleep(0.01)
    with pytest.raises(FolderBusyError) as refused:
        build_store(root, [data_b], config(tiny_llama), chunk_texts=8, show_progress=False)
    assert first.poll() is None, "the first build must still be running for this test to mean anything"
    assert f"store {root} is being built by PID {first.pid} on host " in str(refused.value)
    assert "(since " in str(refused.value) and "wait for it or use another store" in str(refused.value)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    store = BehaviourStore.open(root)
    store.verify()
    build_store(tmp_path / "alone", [data_a], config(tiny_llama), chunk_texts=8, show_progress=False)
    alone = BehaviourStore.open(tmp_path / "alone")
    assert store.vocabulary.texts == alone.vocabulary.texts
    assert (store.path / "vectors.npy").read_bytes() == (alone.path / "vectors.npy").read_bytes()


def test_bahe_encode_refuses_a_held_store_in_one_line_and_touches_nothing(tmp_path, tiny_llama, tiny_schema,
                                                                          holder):
    data = write_samples(tmp_path / "a.parquet", tiny_schema, [texts("Pay", 6)], ["T"])
    root = tmp_path / "store"
    build_store(root, [data], config(tiny_llama), show_progress=False)
    more = write_samples(tmp_path / "b.parquet", tiny_schema, [texts("Search", 6)], ["T"])
    before = files(root)
    proc = holder(root)
    done = subprocess.run(_encode_cli(root, more, tiny_llama), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("bahe-encode: error:")]
    assert len(errors) == 1 and f"store {root} is being built by PID {proc.pid} on host " in errors[0], done.stderr
    assert files(root) == before and BehaviourStore.open(root).version == "v000001"


def test_a_lock_left_by_a_killed_build_blocks_nobody(tmp_path, tiny_llama, tiny_schema, holder):
    """The holder is SIGKILLed while holding the lock: its lock file (naming it) stays, yet the next build
    runs, because the OS dropped the lock with the process (a PID file would block it)."""
    root = tmp_path / "store"
    dead = holder(root, then="die")
    assert dead.wait(timeout=30) == -signal.SIGKILL
    assert f'"pid": {dead.pid}' in (root / LOCK_FILE).read_text()  # what a dead holder leaves behind
    data = write_samples(tmp_path / "a.parquet", tiny_schema, [texts("Pay", 6)], ["T"])
    report = build_store(root, [data], config(tiny_llama), show_progress=False)
    assert report.version == "v000001" and (root / LOCK_FILE).read_text() == ""  # released: names nobody


@pytest.mark.integration
def test_under_torchrun_every_rank_fails_together_when_the_store_is_held(tmp_path, tiny_llama, tiny_schema,
                                                                         holder):
    """Rank 0 cannot take the lock: both ranks exit 2 at once (none waits at a barrier), nothing is built."""
    data = write_samples(tmp_path / "a.parquet", tiny_schema, [texts("Pay", 20)], ["T"])
    root = tmp_path / "store"
    proc = holder(root)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           *_encode_cli(root, data, tiny_llama)[1:]]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    assert f"store {root} is being built by PID {proc.pid}" in out
    assert "(reported by rank 0)" in out and out.count("bahe-encode: error:") == 2, out[-3000:]
    assert sorted(p.name for p in root.iterdir()) == [LOCK_FILE]  # no version, no LATEST, no work folder


@pytest.mark.integration
def test_a_second_trainer_into_a_run_folder_is_refused_on_every_rank(tmp_path, holder):
    """`bahe-train --out RUN` while another process writes RUN: both ranks exit 2 naming the holder, and
    the run folder's files are left as they were."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "LATEST").write_text("step-0000010\n")
    (run / "metrics.json").write_text('{"steps": 10}')
    before = files(run)
    proc = holder(run)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "bahe.launchers.train", "--out", str(run), "--arm", "dlrm",
           "--random-data", "--steps", "4", "--batch-size", "8", "--embedding-dim", "8", "--dense-arch", "16", "8",
           "--over-arch", "16", "1", "--table-rows", "100"]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    assert f"run folder {run} is being written by PID {proc.pid} on host " in out, out[-3000:]
    assert "wait for it or pass another --out" in out and "(reported by rank 0)" in out, out[-3000:]
    assert out.count("bahe-train: error:") == 2, out[-3000:]
    assert files(run) == before


def test_a_build_of_another_plan_parks_an_interrupted_build_and_it_resumes_later(tmp_path, tiny_llama, tiny_schema,
                                                                                  monkeypatch):
    """Build A encodes every chunk, then fails to publish; build B (other data, same version v000001)
    runs and fails too. B neither reuses nor deletes A's chunks: A's rerun resumes all of them and equals
    a build of A alone; once A publishes v000001, B's parked build (which can never resume) is removed."""
    data_a = write_samples(tmp_path / "a.parquet", tiny_schema, [texts("Pay", 30)], ["T"])
    data_b = write_samples(tmp_path / "b.parquet", tiny_schema, [texts("Search", 30)], ["T"])
    root = tmp_path / "store"
    real = build_module._assemble

    def full_disk(*args, **kwargs):
        raise StoreWriteError("cannot write vectors.npy: No space left on device (ENOSPC)")

    monkeypatch.setattr(build_module, "_assemble", full_disk)
    for data in (data_a, data_b):
        with pytest.raises(StoreWriteError):
            build_store(root, [data], config(tiny_llama), chunk_texts=8, show_progress=False)
    parked = [p.name for p in (root / WORK).iterdir()]
    assert sorted(parked)[0] == "v000001" and len(parked) == 2 and parked[1 - parked.index("v000001")].startswith(
        "v000001-")  # B's chunks are in v000001, A's parked beside them
    monkeypatch.setattr(build_module, "_assemble", real)
    report = build_store(root, [data_a], config(tiny_llama), chunk_texts=8, show_progress=False)
    assert report.resumed_chunks == 4 and report.version == "v000001"
    build_store(tmp_path / "alone", [data_a], config(tiny_llama), chunk_texts=8, show_progress=False)
    assert (root / "v000001" / "vectors.npy").read_bytes() == \
        (tmp_path / "alone" / "v000001" / "vectors.npy").read_bytes()
    assert list((root / WORK).iterdir()) == []
    assert (root / LATEST).read_text().strip() == "v000001"


def test_the_lock_is_exclusive_between_processes_and_released_on_exit(tmp_path, holder):
    proc = holder(tmp_path / "folder")
    with pytest.raises(FolderBusyError, match=rf"busy: PID {proc.pid} on host .* \(since "):
        FolderLock(tmp_path / "folder", "busy: {holder}").acquire()
    proc.stdin.close()
    proc.wait(timeout=30)
    with FolderLock(tmp_path / "folder", "busy: {holder}"):
        assert f'"pid": {os.getpid()}' in (tmp_path / "folder" / LOCK_FILE).read_text()
