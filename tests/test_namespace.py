"""The package installs under one import namespace, ``bahe.*``: a user's own ``model.py``, ``training/``
or ``launchers/`` beside their trainer (dlrm_main.py's folder) never shadows it, and it never shadows
theirs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The rooms pyproject.toml installs under bahe.* (its [tool.setuptools] packages): read, not repeated
PACKAGES = tuple(re.findall(r'"bahe\.(\w+)"', (ROOT / "pyproject.toml").read_text().split("[tool.setuptools]")[1]
                            .split("[tool.setuptools.package-dir]")[0]))

USER_CODE = """
import model, training
assert model.WHO == "user" and training.WHO == "user", "the user's own modules were shadowed"
import bahe.model.bahe, bahe.training.loop, bahe.launchers.train, bahe.embeddings.cli, bahe.ctr_data.cli
print(bahe.model.bahe.__file__)
"""


def _user_folder(tmp_path: Path) -> Path:
    """A folder like dlrm_main.py's: its own model.py and training/ package."""
    folder = tmp_path / "user"
    (folder / "training").mkdir(parents=True)
    (folder / "model.py").write_text('WHO = "user"\n')
    (folder / "training" / "__init__.py").write_text('WHO = "user"\n')
    return folder


def _run_user_code(folder: Path, env_path: str | None = None) -> str:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    if env_path:
        env["PYTHONPATH"] = env_path
    done = subprocess.run([sys.executable, "-c", USER_CODE], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_the_installed_environment_imports_bahe_beside_a_users_own_model_py(tmp_path):
    where = _run_user_code(_user_folder(tmp_path))
    assert Path(where).resolve() == ROOT / "model" / "bahe.py"


@pytest.mark.integration
def test_a_built_wheel_holds_only_the_bahe_namespace_and_imports_beside_a_users_model_py(tmp_path):
    source, wheels = tmp_path / "source", tmp_path / "wheels"
    source.mkdir()  # build from a copy: building in the checkout would leave build/ and *.egg-info there
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", symlinks=True)  # src/bahe/<room> stay symlinks, as in git
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(wheels), str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("bahe_torchrec-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
    top_levels = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_levels == {"bahe"}, f"the wheel installs top-level packages besides bahe: {sorted(top_levels)}"
    for package in PACKAGES:
        assert f"bahe/{package}/__init__.py" in names
    where = _run_user_code(_user_folder(tmp_path), env_path=str(tmp_path / "site"))
    assert Path(where) == tmp_path / "site" / "bahe" / "model" / "bahe.py"
