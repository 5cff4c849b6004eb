"""Writes that fail: a full disk or an unwritable folder while a store version or a checkpoint is
written. The previous version / checkpoint stays intact, current and loadable, nothing half-written
is left in the way, the error names the path and the OS's reason, and a rerun resumes.

A full disk is simulated honestly in a subprocess with ``RLIMIT_FSIZE`` (SIGXFSZ ignored): every
write past the limit fails with EFBIG exactly as a write on a disk that fills up fails with ENOSPC, at
a point chosen to fall in the middle of the new version's vectors or a checkpoint's shard. Where the
tests run as root with mount rights, a really full tmpfs gives ENOSPC itself.

An unwritable folder is a real ``chmod 0o500`` folder and a real EACCES from the kernel. ``chmod`` alone
cannot stop root (CAP_DAC_OVERRIDE), and sessions and CI run as root, so there the writing process runs
under ``setpriv --bounding-set=-all --inh-caps=-all``: still uid 0, the owner of the test's files and of
the interpreter (here under /root, 0o700, which ``nobody`` cannot enter), but without any capability, so
the kernel checks the folder's mode bits as for any user. A non-root user runs the process as it is.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bahe.embeddings.build import WORK, build_store
from bahe.embeddings.store import LATEST, BehaviourStore, StoreWriteError
from bahe.training.checkpoint import Checkpointer, CheckpointWriteError
from tests.llm_fixtures import make_tiny_llama
from tests.model_fixtures import make_tiny_pipeline
from tests.test_store import config, texts, vectors_by_text, write_samples
from tests.torchrun import torchrun

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# the writing process as an unprivileged user: root gives up every capability (CAP_DAC_OVERRIDE included)
DROP_ALL_CAPABILITIES = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]

# writes a file into the 0o500 folder argv[1]; exit 3 when the kernel refuses it (EACCES)
PROBE = """
import pathlib, sys
try:
    pathlib.Path(sys.argv[1], "probe").write_text("")
except PermissionError:
    sys.exit(3)
"""


@pytest.fixture(scope="module")
def unprivileged(tmp_path_factory) -> list[str]:
    """The command prefix that runs a process without the right to write into a chmod 0o500 folder: none for
    a non-root user; for root, ``setpriv`` dropping every capability. Checked once with a real write."""
    prefix = DROP_ALL_CAPABILITIES if os.geteuid() == 0 else []
    folder = tmp_path_factory.mktemp("read-only-probe")
    folder.chmod(0o500)
    try:
        done = subprocess.run([*prefix, sys.executable, "-c", PROBE, str(folder)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("root here, and no setpriv (util-linux) to run a process without CAP_DAC_OVERRIDE")
    finally:
        folder.chmod(0o700)
    if done.returncode != 3:
        pytest.skip(f"{' '.join(prefix) or 'this user'} still writes into a chmod 0o500 folder (exit "
                    f"{done.returncode}: {done.stderr.strip()[-300:]}); the file-in-the-way tests cover it")
    return prefix


# a build_store call whose outcome is printed as JSON (stdout is a pipe: not subject to the file size limit)
BUILD = """
import json, sys
from bahe.embeddings.build import build_store
from bahe.embeddings.encoder import EncoderConfig
root, data, model, chunk = sys.argv[1:]
try:
    build_store(root, [data], EncoderConfig(model=model, k=2, device="cpu", batch_tokens=64), chunk_texts=int(chunk),
                show_progress=False)
    print(json.dumps({"error": None}))
except Exception as err:
    print(json.dumps({"type": type(err).__name__, "message": str(err), "cause": repr(err.__cause__)}))
"""


def file_size_limit(limit: int):
    """preexec_fn: writes past ``limit`` bytes of any file fail with OSError EFBIG, as on a full disk."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` except unfinished builds, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and WORK not in p.relative_to(root).parts}


def leftovers(root: Path) -> list[str]:
    """Half-written files or folders: partial files, assembled staging, an unpublished version."""
    found = [p for p in root.rglob("*") if ".partial" in p.name or p.name == "assembled"]
    return sorted(str(p.relative_to(root)) for p in found + [root / "v000002"] if p.exists())


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def refresh(tmp_path, tiny_llama, tiny_schema):
    """A store with a complete v000001 (33 rows), and a day of 200 new texts: its refresh v000002 holds
    233 rows, 29,952 bytes of vectors; chunks of 8 texts are 1,152-byte files."""
    day1 = write_samples(tmp_path / "day1.parquet", tiny_schema, [texts("Pay", 30)], ["Title A"])
    day2 = write_samples(tmp_path / "day2.parquet", tiny_schema, [texts("Search", 200)], ["Title A"])
    root = tmp_path / "store"
    build_store(root, [day1], config(tiny_llama), chunk_texts=8, show_progress=False)
    return root, day1, day2


def assert_v1_intact(root: Path, before: dict[str, bytes]) -> None:
    assert (root / LATEST).read_text().strip() == "v000001"
    store = BehaviourStore.open(root)
    assert store.version == "v000001"
    store.verify()
    assert snapshot(root) == before  # byte for byte: LATEST, manifest, vocabulary, vectors
    assert leftovers(root) == []


def uninterrupted(tmp_path: Path, tiny_llama: Path, day1: Path, day2: Path, chunk_texts: int) -> Path:
    other = tmp_path / "uninterrupted"
    build_store(other, [day1], config(tiny_llama), chunk_texts=chunk_texts, show_progress=False)
    build_store(other, [day2], config(tiny_llama), chunk_texts=chunk_texts, show_progress=False)
    return other


def assert_same_store(root: Path, other: Path) -> None:
    mine, theirs = BehaviourStore.open(root), BehaviourStore.open(other)
    assert mine.version == theirs.version == "v000002" and mine.manifest["parent"] == "v000001"
    mine.verify()
    assert (mine.path / "vectors.npy").read_bytes() == (theirs.path / "vectors.npy").read_bytes()
    assert mine.vocabulary.texts == theirs.vocabulary.texts
    assert mine.manifest["files"] == theirs.manifest["files"]
    assert vectors_by_text(root) == vectors_by_text(other)


@pytest.mark.integration
def test_refresh_failing_mid_vectors_keeps_v1_and_the_rerun_resumes(tmp_path, tiny_llama, refresh):
    """The disk fills while v000002's vectors.npy is written (16 KiB of 29,952 bytes): StoreWriteError
    naming that file and EFBIG; v000001 stays LATEST and byte-identical; the rerun re-encodes nothing
    and gives the store an uninterrupted refresh gives."""
    root, day1, day2 = refresh
    before = snapshot(root)
    limit = 16_384
    failed = subprocess.run([sys.executable, "-c", BUILD, str(root), str(day2), str(tiny_llama), "8"], cwd=ROOT,
                            env=ENV, capture_output=True, text=True, timeout=300, preexec_fn=file_size_limit(limit))
    assert failed.returncode == 0, failed.stderr[-3000:]
    outcome = json.loads(failed.stdout.strip().splitlines()[-1])
    assert outcome["type"] == "StoreWriteError" and "File too large" in outcome["cause"], outcome
    staging = root / WORK / "v000002" / "assembled" / "vectors.npy"
    message = outcome["message"]
    assert f"cannot write {staging}: File too large (EFBIG)" in message, message
    assert f"building store version v000002 in {root} failed" in message
    assert "The previous version v000001 is intact and still current (LATEST)" in message
    assert "resumes from the 25 chunk(s) already encoded" in message
    assert_v1_intact(root, before)
    assert len(list((root / WORK / "v000002").glob("chunk-*.npy"))) == 25  # the work is kept for the rerun

    report = build_store(root, [day2], config(tiny_llama), chunk_texts=8, show_progress=False)
    assert report.version == "v000002" and report.resumed_chunks == 25
    v2_bytes = (root / "v000002" / "vectors.npy").stat().st_size
    assert (root / "v000001" / "vectors.npy").stat().st_size < limit < v2_bytes  # it did fail mid-file
    assert_same_store(root, uninterrupted(tmp_path, tiny_llama, day1, day2, chunk_texts=8))
    assert not (root / WORK / "v000002").exists()


@pytest.mark.integration
def test_bahe_encode_reports_a_full_disk_in_one_line(tmp_path, tiny_llama, refresh):
    """The CLI, the disk filling while the first chunk is written (800 of its 1,152 bytes): exit code 2,
    one line that names the chunk file and the reason, no traceback, no partial file left behind."""
    root, _, day2 = refresh
    before = snapshot(root)
    cmd = [sys.executable, "-m", "bahe.embeddings.cli", "build", "--store", str(root), "--data", str(day2), "--model",
           str(tiny_llama), "--k", "2", "--device", "cpu", "--batch-tokens", "64", "--chunk-texts", "8", "--quiet"]
    failed = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
                            preexec_fn=file_size_limit(800))
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr and failed.stdout == ""
    errors = [line for line in failed.stderr.splitlines() if line.startswith("bahe-encode: error:")]
    assert len(errors) == 1, failed.stderr
    chunk = root / WORK / "v000002" / "chunk-000000.npy"
    assert f"cannot write {chunk}: File too large (EFBIG)" in errors[0], errors[0]
    assert "The previous version v000001 is intact and still current (LATEST)" in errors[0]
    assert_v1_intact(root, before)
    assert list((root / WORK / "v000002").glob("chunk-*.npy")) == []  # no truncated chunk passes for a finished one

    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert BehaviourStore.open(root).version == "v000002"


@pytest.fixture
def small_filesystem(tmp_path):
    """A 4 MiB tmpfs (root with mount rights only): its writes really fail with ENOSPC."""
    mount = tmp_path / "small-fs"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                              text=True)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN): {done.stderr.strip()}")
    yield mount
    gc.collect()  # a store still open maps its vectors: the mount would be busy
    if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def fill(folder: Path, leave: int) -> Path:
    """Fill the filesystem of ``folder`` until ``leave`` bytes are free."""
    stats = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - leave))
    return filler


@pytest.mark.integration
def test_refresh_on_a_really_full_filesystem(tmp_path, tiny_llama, tiny_schema, small_filesystem):
    """ENOSPC from a full tmpfs: room for the refresh's chunks (15 pages of 4 KiB) and 4 more pages, so the
    29,952-byte vectors.npy fails at 16 KiB. v000001 stays current; freeing space and rerunning resumes."""
    day1 = write_samples(tmp_path / "day1.parquet", tiny_schema, [texts("Pay", 30)], ["Title A"])
    day2 = write_samples(tmp_path / "day2.parquet", tiny_schema, [texts("Search", 200)], ["Title A"])
    root = small_filesystem / "store"
    build_store(root, [day1], config(tiny_llama), chunk_texts=64, show_progress=False)
    before = snapshot(root)
    filler = fill(small_filesystem, (15 + 4) * 4096)
    # in a subprocess: vectors written into a memory map (as they once were) die of SIGBUS on a full disk
    failed = subprocess.run([sys.executable, "-c", BUILD, str(root), str(day2), str(tiny_llama), "64"], cwd=ROOT,
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 0, f"exit code {failed.returncode}: {failed.stderr[-3000:]}"
    outcome = json.loads(failed.stdout.strip().splitlines()[-1])
    staging = root / WORK / "v000002" / "assembled" / "vectors.npy"
    assert outcome["type"] == "StoreWriteError" and "No space left on device" in outcome["cause"], outcome
    assert f"cannot write {staging}: No space left on device (ENOSPC)" in outcome["message"], outcome["message"]
    assert "The previous version v000001 is intact" in outcome["message"]
    assert_v1_intact(root, before)
    filler.unlink()
    report = build_store(root, [day2], config(tiny_llama), chunk_texts=64, show_progress=False)
    assert report.resumed_chunks == 4
    assert_same_store(root, uninterrupted(tmp_path, tiny_llama, day1, day2, chunk_texts=64))


def test_a_store_folder_that_cannot_be_a_folder(tmp_path, tiny_llama, capsys):
    """The store path is a file, or lies under one (what an unwritable folder is for root): one clear line."""
    from bahe.embeddings.cli import main

    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    for root, expected in ((blocker, f"{blocker} is a file, not a store folder"),
                           (blocker / "store", f"cannot create the store folder {blocker / 'store'}: Not a directory "
                                               "(ENOTDIR)")):
        with pytest.raises(StoreWriteError) as error:
            build_store(root, [tmp_path / "unused.parquet"], config(tiny_llama), show_progress=False)
        assert expected in str(error.value)
        assert main(["build", "--store", str(root), "--data", str(tmp_path / "unused.parquet"), "--model",
                     str(tiny_llama), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bahe-encode: error: ") and expected in err and err.count("\n") == 1, err
    assert blocker.read_text() == "not a folder"


@pytest.mark.integration
def test_refresh_into_a_read_only_store_folder(tmp_path, tiny_llama, refresh, unprivileged):
    """The store folder is read-only for the user who refreshes it (chmod 0o500, a real EACCES): the chunks
    still go to the writable .work/, publishing v000002 is refused naming that folder and EACCES, v000001
    stays LATEST byte for byte, and once the folder is writable the rerun resumes from every chunk."""
    root, _, day2 = refresh
    before = snapshot(root)
    root.chmod(0o500)
    try:
        failed = subprocess.run([*unprivileged, sys.executable, "-c", BUILD, str(root), str(day2), str(tiny_llama),
                                 "8"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        root.chmod(0o700)
    assert failed.returncode == 0, failed.stderr[-3000:]
    outcome = json.loads(failed.stdout.strip().splitlines()[-1])
    assert outcome["type"] == "StoreWriteError" and "PermissionError" in outcome["cause"], outcome
    message = outcome["message"]
    assert f"cannot publish {root / 'v000002'}: Permission denied (EACCES)" in message, message
    assert f"building store version v000002 in {root} failed" in message
    assert "The previous version v000001 is intact and still current (LATEST)" in message
    assert "resumes from the 25 chunk(s) already encoded" in message
    assert_v1_intact(root, before)
    assert len(list((root / WORK / "v000002").glob("chunk-*.npy"))) == 25

    report = build_store(root, [day2], config(tiny_llama), chunk_texts=8, show_progress=False)
    assert report.version == "v000002" and report.resumed_chunks == 25  # nothing encoded twice
    BehaviourStore.open(root).verify()


def test_a_failed_latest_write_unpublishes_the_new_version(tmp_path, tiny_llama, refresh, monkeypatch):
    """The disk fills exactly when LATEST is replaced (after v000002 was renamed into place): v000002 is
    taken back, so no version stands beside a LATEST that does not name it, and the rerun publishes it
    as v000002 again from the kept chunks."""
    import errno

    import bahe.embeddings.build as build

    root, _, day2 = refresh
    before = snapshot(root)
    real = build.write_text_atomic

    def full_at_latest(path: Path, text: str) -> None:
        if path.name == LATEST:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, text)

    monkeypatch.setattr(build, "write_text_atomic", full_at_latest)
    with pytest.raises(StoreWriteError, match=f"cannot write {root / LATEST}: No space left on device"):
        build_store(root, [day2], config(tiny_llama), chunk_texts=8, show_progress=False)
    assert_v1_intact(root, before)
    monkeypatch.setattr(build, "write_text_atomic", real)
    report = build_store(root, [day2], config(tiny_llama), chunk_texts=8, show_progress=False)
    assert report.version == "v000002" and report.resumed_chunks == 25


# ---- checkpoints -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("ckpt-pipeline"))


def worker(mode: str, pipeline, ckpt: Path, pg: Path, *extra: str) -> dict:
    cmd = [sys.executable, str(ROOT / "tests" / "dist" / "checkpoint_write_worker.py"), mode, str(pipeline.llm),
           str(pipeline.data), str(pipeline.store), str(ckpt), str(pg), *extra]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_step10_survives(ckpt: Path, saved: dict, pipeline, pg: Path) -> None:
    assert (ckpt / "LATEST").read_text() == "step-0000010\n"
    assert sorted(p.name for p in ckpt.iterdir()) == ["LATEST", "step-0000010"]  # no partial folder in the way
    assert Checkpointer(ckpt).latest() == ckpt / "step-0000010"
    restored = worker("restore", pipeline, ckpt, pg)
    assert restored["before"] != saved["step10"]  # a fresh model: the restore must do the work
    assert restored["step"] == 10 and restored["rows_seen"] == 320 and restored["last_epochs"] == [1, 1]
    assert restored["restored"] == saved["step10"]  # every tensor of the model and the optimiser, bit for bit
    assert (ckpt / "LATEST").read_text() == "step-0000020\n"  # and saving works again once there is room


def check_checkpoint_error(saved: dict, ckpt: Path, reason: str) -> None:
    assert saved["step10"] != saved["step20"] and saved["limit"] < saved["shard_bytes"]
    assert saved["error_type"] == "CheckpointWriteError" and saved["is_os_error"], saved.get("error")
    message = saved["error"]
    assert message.startswith(f"cannot write checkpoint step-0000020 into {ckpt / '.partial-step-0000020'} "
                              f"(rank 0: {reason}); the partial folder was removed."), message
    assert "The last complete checkpoint step-0000010 is intact and still LATEST" in message
    assert "free space" in message and "--out" in message


@pytest.mark.integration
def test_checkpoint_failing_mid_shard_keeps_the_last_complete_one(tmp_path, pipeline):
    """The real BAHE (DMP, the trainer's optimisers) saves step 10, then step 20 fails half-way through its
    shard file (RLIMIT_FSIZE): the error names the folder and EFBIG, LATEST still names step 10 and a
    fresh model restores it with identical tensors."""
    ckpt = tmp_path / "checkpoints"
    saved = worker("save", pipeline, ckpt, tmp_path / "pg-save", "limit")
    check_checkpoint_error(saved, ckpt, "File too large (EFBIG)")
    assert_step10_survives(ckpt, saved, pipeline, tmp_path / "pg-restore")


@pytest.mark.integration
def test_checkpoint_on_a_really_full_filesystem(tmp_path, pipeline, small_filesystem):
    """The same on a tmpfs filled to half a shard of free space: ENOSPC itself (the restore is the test above's)."""
    ckpt = small_filesystem / "checkpoints"
    saved = worker("save", pipeline, ckpt, tmp_path / "pg-save", "fill")
    check_checkpoint_error(saved, ckpt, "No space left on device (ENOSPC)")
    assert sorted(p.name for p in ckpt.iterdir()) == ["LATEST", "step-0000010"]
    assert Checkpointer(ckpt).latest() == ckpt / "step-0000010"


@pytest.mark.integration
def test_two_ranks_both_raise_and_neither_waits(tmp_path):
    """torchrun, 2 gloo ranks: rank 0 cannot create the folder (a file is in the way), then rank 1 alone
    runs out of space in its shard; each time both ranks raise the same error (no rank is left in a
    barrier), and step 10 stays LATEST."""
    (tmp_path / "blocked").write_text("a file")
    torchrun(ROOT / "tests" / "dist" / "checkpoint_write_worker.py", "two_ranks", tmp_path, env=ENV,
             timeout=240)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0]["file_error"] == results[1]["file_error"]
    assert results[0]["file_error"].startswith(f"cannot create the checkpoint folder for step-0000005: "
                                               f"{tmp_path / 'blocked'}: a file, not a folder (ENOTDIR). ")
    assert results[0]["write_error"] == results[1]["write_error"]
    ckpt = tmp_path / "checkpoints"
    assert f"into {ckpt / '.partial-step-0000020'} (rank 1: File too large (EFBIG))" in results[0]["write_error"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["LATEST", "step-0000010"]
    assert (ckpt / "LATEST").read_text() == "step-0000010\n"
    assert (tmp_path / "blocked").read_text() == "a file"


def plain_state():
    module = torch.nn.Linear(8, 8)
    return module, torch.optim.SGD(module.parameters(), lr=0.1)


def test_a_checkpoint_folder_that_cannot_be_a_folder(tmp_path):
    """The checkpoint folder is a file, or lies under one: CheckpointWriteError (an OSError) naming it."""
    module, optimizer = plain_state()
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(CheckpointWriteError, match=f"^cannot create the checkpoint folder for step-0000001: {blocker}: "
                                                   "a file, not a folder \\(ENOTDIR\\)"):
        Checkpointer(blocker).save(1, module, optimizer, [], rows_seen=0)
    with pytest.raises(CheckpointWriteError, match="Not a directory \\(ENOTDIR\\)") as error:
        Checkpointer(blocker / "checkpoints").save(1, module, optimizer, [], rows_seen=0)
    assert str(blocker / "checkpoints" / ".partial-step-0000001") in str(error.value)
    assert "There is no earlier complete checkpoint" in str(error.value)
    assert blocker.read_text() == "x"


# saves a Linear(8, 8) and its SGD state (seeded by the step) as step argv[2] into argv[1]; prints the outcome
SAVE = """
import json, sys, torch
from bahe.training.checkpoint import Checkpointer
folder, step = sys.argv[1], int(sys.argv[2])
torch.manual_seed(step)
module = torch.nn.Linear(8, 8)
try:
    Checkpointer(folder).save(step, module, torch.optim.SGD(module.parameters(), lr=0.1), [], rows_seen=0)
    print(json.dumps({"error": None}))
except Exception as err:
    print(json.dumps({"type": type(err).__name__, "message": str(err), "is_os_error": isinstance(err, OSError)}))
"""


def test_a_read_only_checkpoint_folder(tmp_path, unprivileged):
    """The checkpoint folder is read-only for the user who trains (chmod 0o500, a real EACCES):
    CheckpointWriteError naming the partial folder and EACCES; step 1 stays LATEST, loads with its own
    tensors, and nothing of step 2 is left."""
    import torch.distributed.checkpoint as dcp

    module, optimizer = plain_state()
    ckpt = tmp_path / "ckpt"
    checkpointer = Checkpointer(ckpt)
    checkpointer.save(1, module, optimizer, [], rows_seen=0)
    expected = {k: v.clone() for k, v in module.state_dict().items()}
    ckpt.chmod(0o500)
    try:
        done = subprocess.run([*unprivileged, sys.executable, "-c", SAVE, str(ckpt), "2"], cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=120)
    finally:
        ckpt.chmod(0o700)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["type"] == "CheckpointWriteError" and outcome["is_os_error"], outcome
    assert outcome["message"].startswith(f"cannot create the checkpoint folder for step-0000002: "
                                         f"{ckpt / '.partial-step-0000002'}: Permission denied (EACCES). "), outcome
    assert "step-0000001 is intact and still LATEST" in outcome["message"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["LATEST", "step-0000001"]
    assert checkpointer.latest() == ckpt / "step-0000001"
    loaded = {"model": {k: torch.zeros_like(v) for k, v in expected.items()}}
    dcp.load(loaded, checkpoint_id=str(checkpointer.latest()), no_dist=True)
    assert all(torch.equal(loaded["model"][k], v) for k, v in expected.items())


# bahe-train, the DLRM-only arm on the Criteo fixture in one process: 92 training rows, 10 steps of 8 (one pass,
# no validation needed), a 678 KB checkpoint shard
CRITEO_SAMPLE = ROOT / "tests" / "fixtures" / "criteo" / "sample.tsv"
TRAIN = ["-m", "bahe.launchers.train", "--arm", "dlrm", "--criteo-tsv", str(CRITEO_SAMPLE), "--batch-size", "8",
         "--drop-id-features", "user_id", "item_id", "--steps", "10", "--embedding-dim", "8", "--dense-arch", "16",
         "8", "--over-arch", "16", "1", "--table-rows", "500", "--log-every", "5"]


def bahe_train(out: Path, *extra: str, prefix: tuple[str, ...] = (), preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, *TRAIN, "--out", str(out), *extra], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300, preexec_fn=preexec_fn)


def assert_one_line_and_step5_kept(failed: subprocess.CompletedProcess, ckpt: Path, before: dict[str, bytes],
                                   reason: str) -> None:
    assert failed.returncode == 2, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert "resumed from checkpoint step-0000005" in failed.stdout  # it trained, then failed to save step 10
    lines = failed.stderr.splitlines()
    assert len(lines) == 1, failed.stderr  # no traceback, no library noise
    assert lines[0].startswith(f"bahe-train: error: {reason}"), lines[0]
    assert "The last complete checkpoint step-0000005 is intact and still LATEST" in lines[0]
    assert f"make {ckpt} a writable folder" in lines[0] and "training resumes from the last complete" in lines[0]
    assert snapshot(ckpt) == before  # LATEST still names step 5, whose files are untouched; no partial folder
    assert Checkpointer(ckpt).latest() == ckpt / "step-0000005"
    assert not (ckpt.parent / "metrics.json").exists()


@pytest.mark.integration
def test_bahe_train_reports_a_failed_checkpoint_write_in_one_line_and_keeps_the_last_one(tmp_path, unprivileged):
    """bahe-train pauses at step 5 (--stop-at 5), then resumes and cannot write its step-10 checkpoint: first
    the disk fills half-way through the shard (RLIMIT_FSIZE, EFBIG), then the checkpoint folder is read-only
    for the user who trains (chmod 0o500, a real EACCES). Each time: exit code 2 and one line on stderr
    naming the folder and the reason, no traceback; step 5 stays LATEST byte for byte and no partial
    folder is left. The rerun, once there is room and the right to write, resumes from step 5."""
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    partial = ckpt / ".partial-step-0000010"
    first = bahe_train(out, "--stop-at", "5")
    assert first.returncode == 0 and not first.stderr, first.stdout[-3000:] + first.stderr[-3000:]
    assert (ckpt / "LATEST").read_text() == "step-0000005\n"
    before = snapshot(ckpt)

    limit = (ckpt / "step-0000005" / "__0_0.distcp").stat().st_size // 2
    full = bahe_train(out, preexec_fn=file_size_limit(limit))
    assert_one_line_and_step5_kept(full, ckpt, before, f"cannot write checkpoint step-0000010 into {partial} (rank 0: "
                                                       "File too large (EFBIG)); the partial folder was removed. ")
    ckpt.chmod(0o500)
    try:
        read_only = bahe_train(out, prefix=tuple(unprivileged))
    finally:
        ckpt.chmod(0o700)
    assert_one_line_and_step5_kept(read_only, ckpt, before, "cannot create the checkpoint folder for step-0000010: "
                                                            f"{partial}: Permission denied (EACCES). ")

    again = bahe_train(out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["resumed_from_step"] == 5 and summary["steps"] == 10
    assert (ckpt / "LATEST").read_text() == "step-0000010\n"


def test_a_failed_latest_write_leaves_the_previous_checkpoint_current(tmp_path, monkeypatch):
    """The disk fills exactly when LATEST is replaced: the new, complete but unnamed checkpoint is removed
    (it would only take space) and the previous one stays LATEST."""
    import errno

    import bahe.training.checkpoint as checkpoint

    module, optimizer = plain_state()
    checkpointer = Checkpointer(tmp_path / "ckpt")
    checkpointer.save(1, module, optimizer, [], rows_seen=0)
    expected = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        module.weight.add_(1.0)

    def full(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint, "write_text_atomic", full)
    with pytest.raises(CheckpointWriteError, match=f"cannot publish checkpoint step-0000002 in {tmp_path / 'ckpt'}: "
                                                   f"{tmp_path / 'ckpt' / 'LATEST'}: No space left on device"):
        checkpointer.save(2, module, optimizer, [], rows_seen=0)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["LATEST", "step-0000001"]
    import torch.distributed.checkpoint as dcp

    loaded = {"model": {k: torch.zeros_like(v) for k, v in expected.items()}}
    dcp.load(loaded, checkpoint_id=str(checkpointer.latest()), no_dist=True)
    assert all(torch.equal(loaded["model"][k], v) for k, v in expected.items())


def test_a_failure_that_is_not_a_write_error_is_not_dressed_as_one(tmp_path, monkeypatch):
    """Only OSErrors become CheckpointWriteError ('free space ...'); a bug surfaces as DCP raised it. The
    partial folder goes either way."""
    import torch.distributed.checkpoint as dcp

    import bahe.training.checkpoint as checkpoint

    module, optimizer = plain_state()
    checkpointer = Checkpointer(tmp_path / "ckpt")
    checkpointer.save(1, module, optimizer, [], rows_seen=0)

    def broken(self, plan, planner):
        raise ValueError("a bug, not a full disk")

    monkeypatch.setattr(checkpoint.dcp.FileSystemWriter, "write_data", broken)
    with pytest.raises(dcp.CheckpointException, match="a bug, not a full disk") as error:
        checkpointer.save(2, module, optimizer, [], rows_seen=0)
    assert not isinstance(error.value, CheckpointWriteError)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["LATEST", "step-0000001"]


def test_a_latest_naming_a_missing_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    """Restarting from step 0 when LATEST names a folder that is gone would silently throw a run away."""
    from bahe.training.checkpoint import Checkpointer

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert Checkpointer(ckpt).latest() is None  # a fresh run
    (ckpt / "LATEST").write_text("step-0000040\n")
    with pytest.raises(FileNotFoundError, match="names step-0000040, which is not in"):
        Checkpointer(ckpt).latest()
