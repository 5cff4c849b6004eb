"""The house's layout: static tools follow ``bahe.*`` to the files in the repository, no import climbs
against the data flow, and no room's file outgrows one job.

- ``bahe.*`` resolves without running an import hook: src/bahe/ holds one symlink per top-level room and
  the editable install is a plain path entry (a .pth naming src/), so jedi (what IDEs use for
  go-to-definition) finds ``bahe.model.bahe.BAHE`` in ``model/bahe.py``.
- The rooms import only earlier rooms of the flow (ctr_data -> embeddings -> model -> training -> serving
  -> daily -> launchers): module-level and function-level imports both count.
"""

from __future__ import annotations

import ast
import re
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOW = ("ctr_data", "embeddings", "model", "training", "serving", "daily", "launchers")
MAX_LINES = 425  # "one job per file (under ~400 lines)"


def test_pyproject_installs_exactly_the_rooms_of_the_flow_and_src_bahe_links_each_one():
    pyproject = (ROOT / "pyproject.toml").read_text()
    installed = re.findall(r'"bahe\.(\w+)"', pyproject.split("[tool.setuptools]")[1].split("[tool.setuptools.package-dir]")[0])
    assert tuple(installed) == FLOW
    held = sorted(p.name for p in (ROOT / "src").iterdir() if not p.name.endswith(".egg-info"))  # the install's metadata
    assert held == ["bahe"], f"src/ holds the namespace and nothing else, not {held}"
    for room in FLOW:
        link = ROOT / "src" / "bahe" / room
        assert link.is_symlink() and link.resolve() == ROOT / room, f"src/bahe/{room} is not a symlink to {room}/"
        assert (ROOT / room / "__init__.py").is_file()


def test_the_editable_install_is_a_plain_path_entry_not_an_import_hook():
    site = Path(sysconfig.get_paths()["purelib"])
    pths = list(site.glob("__editable__*bahe_torchrec*.pth"))
    assert pths, f"no editable install of bahe-torchrec in {site} (run `make env`)"
    for pth in pths:
        lines = [line for line in pth.read_text().splitlines() if line.strip()]
        assert lines == [str(ROOT / "src")], f"{pth} is not a plain path entry naming src/: {lines}"
    assert not list(site.glob("__editable__*bahe_torchrec*finder.py")), "the editable install runs an import hook"


@pytest.mark.parametrize(("code", "expected"), [
    ("from bahe.model.bahe import BAHE\nBAHE", ("model/bahe.py", "BAHE")),
    ("import bahe.training.loop\nbahe.training.loop.run_training", ("training/loop.py", "run_training")),
    ("from bahe.serving import export\nexport.ExportConfig", ("serving/export.py", "ExportConfig")),
    ("from bahe.serving.scoring import score_files\nscore_files", ("serving/scoring.py", "score_files")),
])
def test_a_static_resolver_follows_bahe_imports_to_the_files_in_the_repository(tmp_path, code, expected):
    """jedi, run against this environment's interpreter the way an IDE runs it, from a user's file outside the
    repository: go-to-definition lands in the room's file (through src/bahe/<room>)."""
    jedi = pytest.importorskip("jedi")
    user = tmp_path / "user.py"
    user.write_text(code + "\n")
    environment = jedi.create_environment(sys.executable, safe=False)
    project = jedi.Project(tmp_path, environment_path=sys.executable)
    script = jedi.Script(path=user, project=project, environment=environment)
    lines = code.splitlines()
    (definition,) = script.goto(len(lines), len(lines[-1]) - 1, follow_imports=True)
    relative, name = expected
    assert definition.module_path is not None and definition.module_path.resolve() == ROOT / relative, definition
    assert definition.name == name and definition.type in ("class", "function")


def _bahe_imports(path: Path) -> set[str]:
    """The rooms a module imports from (``bahe.<room>...``), at any depth of the file."""
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
            [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        rooms.update(name.split(".")[1] for name in names if name.startswith("bahe.") and name.count(".") >= 1)
    return rooms


def test_no_import_climbs_against_the_data_flow():
    climbs = []
    for rank, room in enumerate(FLOW):
        for path in sorted((ROOT / room).glob("*.py")):
            later = sorted(r for r in _bahe_imports(path) if r in FLOW and FLOW.index(r) > rank)
            climbs += [f"{room}/{path.name} imports bahe.{r}" for r in later]
    assert not climbs, "imports against the flow " + " -> ".join(FLOW) + ":\n" + "\n".join(climbs)


def test_the_climb_check_sees_a_function_level_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from bahe.serving.scoring import score_files\n")
    assert _bahe_imports(module) == {"serving"}


def test_no_file_of_a_room_outgrows_one_job():
    long = [f"{path.relative_to(ROOT)}: {n} lines" for room in FLOW for path in sorted((ROOT / room).glob("*.py"))
            if (n := len(path.read_text().splitlines())) > MAX_LINES]
    assert not long, f"files over {MAX_LINES} lines (split them by job):\n" + "\n".join(long)
