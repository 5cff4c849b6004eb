"""tools/cluster/slurm_up.sh does no harm to the machine it runs on (issue 27).

* A slurm.conf / slurmdbd.conf it did not write is refused (one line, exit 1, the file untouched) unless
  --force; every file it replaces is kept beside it as FILE.bak-DATE.
* apt-get's output goes to a fresh private file (mktemp), never through a link planted at the old fixed
  name /tmp/slurm_up.apt.log.
* Its daemons listen on the loopback address only (they listened on 0.0.0.0:6817-6819 while the docs
  said localhost); the script checks that after every start.

The conf-writing and logging functions live in tools/cluster/slurm_lib.sh and run here on scratch folders
with a fake apt-get; the running cluster is only read (and slurm_up.sh rerun, a no-op when it is up).
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "tools" / "cluster" / "slurm_lib.sh"
UP = ROOT / "tools" / "cluster" / "slurm_up.sh"
OLD_LOG = Path("/tmp/slurm_up.apt.log")  # the fixed name the script wrote before
MARKER = "# Written by tools/cluster/slurm_up.sh"
ME = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()


def lib(script: str, *, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``script`` run by bash with slurm_lib.sh sourced (set -euo pipefail, as slurm_up.sh runs)."""
    prelude = f"set -euo pipefail\nSCRIPT_DIR={shlex.quote(str(LIB.parent))}\nsource {shlex.quote(str(LIB))}\n"
    return subprocess.run(["bash", "-c", prelude + script], input=stdin, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def write_conf(path: Path, content: str, *, force: bool = False) -> subprocess.CompletedProcess:
    return lib(f'FORCE={int(force)}\nwrite_conf {shlex.quote(str(path))} {ME} 0640 \necho "CHANGED=$CHANGED"',
               stdin=content)


def leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != name)


def test_a_conf_the_script_did_not_write_is_refused_and_left_as_it_is(tmp_path):
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=theirs\n# an administrator's own cluster\n")
    done = write_conf(conf, f"{MARKER}\nClusterName=bahe\n")
    assert done.returncode == 1
    line = done.stderr.strip()
    assert "\n" not in line and line.startswith(f"slurm_up: FAILED: {conf} exists and was not written by this script")
    assert "run again with --force to replace it" in line
    assert conf.read_text() == "ClusterName=theirs\n# an administrator's own cluster\n"
    assert leftovers(tmp_path, "slurm.conf") == []  # no backup, no temporary file


def test_force_replaces_a_foreign_conf_and_keeps_a_copy(tmp_path):
    conf = tmp_path / "slurmdbd.conf"
    conf.write_text("StorageHost=db.example\n")
    done = write_conf(conf, f"{MARKER}\nStorageHost=localhost\n", force=True)
    assert done.returncode == 0, done.stderr
    assert conf.read_text() == f"{MARKER}\nStorageHost=localhost\n"
    (backup,) = [p for p in tmp_path.iterdir() if p.name.startswith("slurmdbd.conf.bak-")]
    assert re.fullmatch(r"slurmdbd\.conf\.bak-\d{8}-\d{6}", backup.name)
    assert backup.read_text() == "StorageHost=db.example\n"
    assert f"kept the previous {conf} as {backup}" in done.stdout and "CHANGED= slurmdbd.conf " in done.stdout
    assert stat.S_IMODE(conf.stat().st_mode) == 0o640


def test_its_own_conf_is_replaced_with_a_copy_kept_and_an_equal_one_is_left_alone(tmp_path):
    conf = tmp_path / "slurm.conf"
    old = f"{MARKER}: a one-node cluster (an older release of the script)\nNodeName=vm CPUs=2\n"
    conf.write_text(old)
    done = write_conf(conf, f"{MARKER}\nNodeName=vm CPUs=4\n")
    assert done.returncode == 0, done.stderr
    assert conf.read_text() == f"{MARKER}\nNodeName=vm CPUs=4\n"
    backups = [p for p in tmp_path.iterdir() if ".bak-" in p.name]
    assert [b.read_text() for b in backups] == [old]
    again = write_conf(conf, f"{MARKER}\nNodeName=vm CPUs=4\n")  # the same content: nothing happens
    assert again.returncode == 0 and "CHANGED= \n" in again.stdout + "\n" and "kept" not in again.stdout
    assert len([p for p in tmp_path.iterdir() if ".bak-" in p.name]) == 1
    assert leftovers(tmp_path, "slurm.conf") == [b.name for b in backups]  # no temporary file left


def test_a_second_replacement_in_the_same_second_keeps_both_copies(tmp_path):
    conf = tmp_path / "slurm.conf"
    conf.write_text(f"{MARKER}\nA\n")
    assert write_conf(conf, f"{MARKER}\nB\n").returncode == 0
    assert write_conf(conf, f"{MARKER}\nC\n").returncode == 0
    copies = sorted(p.read_text() for p in tmp_path.iterdir() if ".bak-" in p.name)
    assert copies == [f"{MARKER}\nA\n", f"{MARKER}\nB\n"]


@pytest.fixture
def fake_apt(tmp_path):
    """A bin folder with an apt-get that prints a line and exits with $FAKE_APT_RC."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    apt = bin_dir / "apt-get"
    apt.write_text('#!/bin/sh\necho "fake apt-get $*"\nexit "${FAKE_APT_RC:-0}"\n')
    apt.chmod(0o755)
    return bin_dir


@pytest.fixture
def planted(tmp_path):
    """Links at the old fixed log name (in /tmp, when that name is free) and in TMPDIR to a victim file."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    (tmpdir / "slurm_up.apt.log").symlink_to(victim)
    ours = False
    if not OLD_LOG.exists() and not OLD_LOG.is_symlink():
        OLD_LOG.symlink_to(victim)
        ours = True
    before = None if ours else OLD_LOG.lstat()
    yield victim, tmpdir
    if ours:
        OLD_LOG.unlink(missing_ok=True)
    else:
        after = OLD_LOG.lstat()
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns), "the old log was written"


@pytest.mark.parametrize("rc", [0, 100], ids=["apt-succeeds", "apt-fails"])
def test_apt_output_goes_to_a_fresh_private_file_never_through_a_planted_link(fake_apt, planted, rc):
    victim, tmpdir = planted
    env = {"PATH": f"{fake_apt}:{os.environ['PATH']}", "TMPDIR": str(tmpdir), "FAKE_APT_RC": str(rc)}
    done = lib("install_packages munge slurmd", env=env)
    assert victim.read_text() == "precious\n"
    logs = [p for p in tmpdir.iterdir() if p.name != "slurm_up.apt.log"]
    if rc == 0:
        assert done.returncode == 0, done.stderr
        assert logs == []  # removed once the install succeeded
        return
    assert done.returncode == 1
    (log,) = logs
    assert re.fullmatch(r"slurm_up\.apt\.\w{10}", log.name) and not log.is_symlink()
    assert stat.S_IMODE(log.stat().st_mode) == 0o600 and log.stat().st_uid == os.getuid()
    assert log.read_text() == "fake apt-get update -qq\n"
    assert done.stderr.strip() == f"slurm_up: FAILED: apt-get update (see {log})"


def test_a_listener_beyond_loopback_fails_the_start_naming_it(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_ss = bin_dir / "ss"
    fake_ss.write_text("#!/bin/sh\necho 'LISTEN 0 4096 127.0.0.1:6817 0.0.0.0:*'\n"
                       "echo 'LISTEN 0 4096 0.0.0.0:6818 0.0.0.0:*'\necho 'LISTEN 0 4096 [::]:6819 [::]:*'\n"
                       "echo 'LISTEN 0 80 0.0.0.0:2024 0.0.0.0:*'\n")
    fake_ss.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = lib("check_loopback_only 6817 6818 6819", env=env)
    assert done.returncode == 1
    assert done.stderr.startswith("slurm_up: FAILED: a Slurm daemon listens beyond this host: 0.0.0.0:6818 [::]:6819 ")
    fake_ss.write_text("#!/bin/sh\necho 'LISTEN 0 4096 127.0.0.1:6817 0.0.0.0:*'\n"
                       "echo 'LISTEN 0 4096 127.0.1.1:6818 0.0.0.0:*'\necho 'LISTEN 0 80 0.0.0.0:2024 0.0.0.0:*'\n")
    assert lib("check_loopback_only 6817 6818 6819", env=env).returncode == 0


def test_a_host_name_that_is_not_loopback_gives_no_address(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    getent = bin_dir / "getent"
    getent.write_text('#!/bin/sh\ncase "$2" in lan) echo "10.1.2.3 STREAM lan";; *) echo "127.0.1.1 STREAM $2";; esac\n')
    getent.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    assert lib('echo "[$(loopback_address lan)]"', env=env).stdout == "[]\n"
    assert lib('echo "[$(loopback_address box)]"', env=env).stdout == "[127.0.1.1]\n"


@pytest.mark.integration
def test_the_running_cluster_listens_on_loopback_only_and_a_rerun_changes_nothing():
    """slurm_up.sh (a no-op when the cluster is up; it starts it otherwise, as `make test` does): slurmctld,
    slurmd and slurmdbd each listen on 6817-6819 of a loopback address and nowhere else, as their configuration
    says; the rerun keeps no new copy of a configuration. Never skips: a cluster that cannot start fails here."""
    conf = Path("/etc/slurm")
    copies = sorted(conf.glob("*.bak-*")) if conf.is_dir() else []
    done = subprocess.run(["bash", str(UP)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(conf.glob("*.bak-*")) == copies
    listening = lib("listeners 6817 6818 6819").stdout.split()
    assert sorted(int(a.rsplit(":", 1)[1]) for a in listening) == [6817, 6818, 6819], listening
    assert all(a.startswith("127.") for a in listening), listening
    slurm_conf, dbd_conf = (conf / "slurm.conf").read_text(), (conf / "slurmdbd.conf").read_text()
    assert slurm_conf.startswith(MARKER) and dbd_conf.startswith(MARKER)
    assert "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny" in slurm_conf
    assert re.search(r"^SlurmctldHost=\S+\(127\.[\d.]+\)$", slurm_conf, flags=re.M)
    assert re.search(r"^NodeName=\S+ NodeAddr=127\.[\d.]+ ", slurm_conf, flags=re.M)
    assert "CommunicationParameters=NoInAddrAny" in dbd_conf
    sinfo = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    assert sinfo.returncode == 0 and sinfo.stdout.strip() in ("idle", "mixed", "allocated", "completing")
