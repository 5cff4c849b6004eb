"""Named launch profiles: ``torchx.yaml`` -> a TorchX AppDef and its scheduler run config.

A profile says where and how wide a job runs::

    profiles:
      k8s:
        description: multi-node on Kubernetes with Volcano
        scheduler: kubernetes                  # a TorchX scheduler (torchx schedulers)
        accelerator: gpu                       # gpu: resources.gpu >= nproc_per_node; cpu: no gpu
        nodes: 4                               # replicas of the role, one per node
        nproc_per_node: 8                      # torchrun ranks per node
        resources: {cpu: 64, memMB: 512000, gpu: 8}   # per node
        image: ghcr.io/your-org/bahe-torchrec:latest  # container image; a directory for Slurm
        scheduler_args: {queue: default, namespace: default}   # TorchX run config of that scheduler
        env: {OMP_NUM_THREADS: "8"}            # optional: environment of every rank
        mounts: [type=volume,src=bahe-data,dst=/data]    # optional: volumes (container schedulers)
        max_retries: 0                         # optional
        rdzv_port: 29500                       # optional: rendezvous port on the first node

``render(profile, component, args)`` fills a component's launch arguments (``j``, ``image``, ``cpu``,
``gpu``, ``memMB``, ``env``, ``mounts``, ``max_retries``, ``rdzv_port``) from the profile; ``args``
are the component's own arguments in ``torchx run`` syntax and may override any of them.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torchx import specs
from torchx.schedulers import get_scheduler_factories
from torchx.specs.builders import materialize_appdef

from bahe.launchers import components

DEFAULT_PROFILES = Path(__file__).resolve().parents[1] / "torchx.yaml"
COMPONENTS = {"encode": components.encode, "train": components.train, "evaluate": components.evaluate,
              "predict": components.predict}
# Run options this project requires beyond what TorchX itself marks required: a Slurm job without a
# partition lands wherever the cluster's default sends it, a Volcano job needs its queue.
REQUIRED_SCHEDULER_ARGS = {"slurm": ("partition",), "kubernetes": ("queue",), "kubernetes_mcad": ("queue",)}
# Schedulers that run a container image: the image must name one, not a directory.
CONTAINER_SCHEDULERS = {"local_docker", "kubernetes", "kubernetes_mcad", "aws_batch", "aws_sagemaker", "gcp_batch"}
# Schedulers that run from this checkout (Slurm: a checkout on a file system every node shares): the running
# interpreter's bin folder (torchrun) goes first on the ranks' PATH, so the venv need not be activated (for
# Slurm, launchers/submit.py also sets it in the environment that sbatch hands the job).
CHECKOUT_SCHEDULERS = {"local_cwd", "slurm"}
REQUIRED_KEYS = ("scheduler", "accelerator", "nodes", "nproc_per_node", "resources", "image")
OPTIONAL_KEYS = ("description", "scheduler_args", "env", "mounts", "max_retries", "rdzv_port")
ACCELERATORS = ("cpu", "gpu")


class ProfileError(ValueError):
    """A profile (or the file that holds it) is missing a key or has an invalid value."""


@dataclass(frozen=True)
class Profile:
    """One validated profile of ``torchx.yaml``; resources are per node."""

    name: str
    scheduler: str
    accelerator: str
    nodes: int
    nproc_per_node: int
    cpu: int
    gpu: int
    memMB: int
    image: str
    scheduler_args: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    mounts: list[str] = field(default_factory=list)
    max_retries: int = 0
    rdzv_port: int | None = None
    description: str = ""

    @property
    def j(self) -> str:
        """TorchX's ``-j``: ``{nodes}x{nproc_per_node}``."""
        return f"{self.nodes}x{self.nproc_per_node}"

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    def component_defaults(self) -> dict[str, Any]:
        """The launch arguments this profile gives every component (the user's arguments override them)."""
        defaults: dict[str, Any] = {"j": self.j, "image": self.image, "cpu": self.cpu, "gpu": self.gpu,
                                    "memMB": self.memMB, "max_retries": self.max_retries}
        if self.env:
            defaults["env"] = dict(self.env)
        if self.mounts:
            defaults["mounts"] = list(self.mounts)
        if self.rdzv_port is not None:
            defaults["rdzv_port"] = self.rdzv_port
        return defaults


def _fail(name: str, message: str) -> ProfileError:
    return ProfileError(f"profile {name!r}: {message}")


def _int(name: str, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, f"{key} must be an integer, got {value!r}")
    if value < minimum:
        raise _fail(name, f"{key} must be >= {minimum}, got {value}")
    return value


def _str_map(name: str, key: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(name, f"{key} must be a mapping, got {value!r}")
    out = {}
    for k, v in value.items():
        if isinstance(v, (Mapping, list)) or v is None:
            raise _fail(name, f"{key}.{k} must be a string or number, got {v!r}")
        out[str(k)] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


@functools.cache
def scheduler_runopts(scheduler: str) -> specs.runopts:
    """The run options TorchX's ``scheduler`` accepts (no cluster is contacted).

    TorchX's local scheduler takes over SIGINT and SIGTERM when it is created; reading its options
    must not, so the handlers are put back.
    """
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return get_scheduler_factories()[scheduler](session_name="profiles").run_opts()
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in saved.items():
                signal.signal(sig, handler)


def _scheduler_args(name: str, scheduler: str, raw: Any) -> dict[str, Any]:
    """Check ``scheduler_args`` against the scheduler's run options: known keys, types, required ones."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise _fail(name, f"scheduler_args must be a mapping, got {raw!r}")
    opts = scheduler_runopts(scheduler)
    known = dict(iter(opts))
    args = dict(raw)
    for key, value in args.items():
        if key not in known:
            raise _fail(name, f"scheduler_args.{key} is not a run option of {scheduler} "
                              f"(it takes: {', '.join(sorted(known))})")
        if value is not None and not specs.runopts.is_type(value, known[key].opt_type):
            raise _fail(name, f"scheduler_args.{key} must be of type {getattr(known[key].opt_type, '__name__', known[key].opt_type)}, "
                              f"got {value!r}")
    required = {key for key, opt in known.items() if opt.is_required} | set(REQUIRED_SCHEDULER_ARGS.get(scheduler, ()))
    missing = sorted(key for key in required if args.get(key) in (None, ""))
    if missing:
        raise _fail(name, f"scheduler {scheduler} requires scheduler_args {', '.join(missing)}, "
                          f"which {'is' if len(missing) == 1 else 'are'} missing")
    return args


def parse_profile(name: str, raw: Any) -> Profile:
    """Validate one profile's mapping; every error names the profile and the key."""
    if not isinstance(raw, Mapping):
        raise _fail(name, f"must be a mapping of keys ({', '.join(REQUIRED_KEYS)}), got {raw!r}")
    unknown = sorted(set(raw) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise _fail(name, f"unknown key(s) {', '.join(unknown)} (known: {', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)})")
    missing = [key for key in REQUIRED_KEYS if raw.get(key) is None]
    if missing:
        raise _fail(name, f"missing required key(s) {', '.join(missing)}")
    scheduler = raw["scheduler"]
    factories = get_scheduler_factories()
    if scheduler not in factories:
        raise _fail(name, f"unknown scheduler {scheduler!r} (TorchX has: {', '.join(sorted(factories))})")
    accelerator = raw["accelerator"]
    if accelerator not in ACCELERATORS:
        raise _fail(name, f"accelerator must be one of {', '.join(ACCELERATORS)}, got {accelerator!r}")
    nodes = _int(name, "nodes", raw["nodes"], 1)
    nproc = _int(name, "nproc_per_node", raw["nproc_per_node"], 1)
    resources = raw["resources"]
    if not isinstance(resources, Mapping):
        raise _fail(name, f"resources must be a mapping {{cpu, memMB, gpu}}, got {resources!r}")
    extra = sorted(set(resources) - {"cpu", "memMB", "gpu"})
    if extra:
        raise _fail(name, f"unknown resources key(s) {', '.join(extra)} (known: cpu, memMB, gpu)")
    for key in ("cpu", "memMB"):
        if key not in resources:
            raise _fail(name, f"missing resources.{key}")
    cpu = _int(name, "resources.cpu", resources["cpu"], 1)
    mem = _int(name, "resources.memMB", resources["memMB"], 1)
    gpu = _int(name, "resources.gpu", resources.get("gpu", 0), 0)
    if accelerator == "gpu" and gpu < 1:
        raise _fail(name, "accelerator gpu needs resources.gpu >= 1 (GPUs per node)")
    if accelerator == "gpu" and nproc > gpu:
        raise _fail(name, f"nproc_per_node {nproc} exceeds resources.gpu {gpu}: one rank per GPU")
    if accelerator == "cpu" and gpu:
        raise _fail(name, f"accelerator cpu with resources.gpu {gpu}: set accelerator: gpu or gpu: 0")
    image = raw["image"]
    if not isinstance(image, str) or not image.strip():
        raise _fail(name, f"image must be a non-empty string, got {image!r}")
    if scheduler in CONTAINER_SCHEDULERS and (image in (".", "..") or image.startswith(("/", "./"))):
        raise _fail(name, f"scheduler {scheduler} runs a container: image must name one, not the path {image!r}")
    mounts = raw.get("mounts") or []
    if not isinstance(mounts, list) or not all(isinstance(m, str) for m in mounts):
        raise _fail(name, f"mounts must be a list of strings like type=volume,src=NAME,dst=/PATH, got {mounts!r}")
    rdzv_port = raw.get("rdzv_port")
    return Profile(name=name, scheduler=scheduler, accelerator=accelerator, nodes=nodes, nproc_per_node=nproc, cpu=cpu,
                   gpu=gpu, memMB=mem, image=image,
                   scheduler_args=_scheduler_args(name, scheduler, raw.get("scheduler_args")),
                   env=_str_map(name, "env", raw.get("env")), mounts=list(mounts),
                   max_retries=_int(name, "max_retries", raw.get("max_retries", 0), 0),
                   rdzv_port=None if rdzv_port is None else _int(name, "rdzv_port", rdzv_port, 1),
                   description=str(raw.get("description", "")))


def load_profiles(path: str | os.PathLike | None = None) -> dict[str, Profile]:
    """Read and validate every profile of ``path`` (default: the repository's ``torchx.yaml``)."""
    path = Path(path) if path is not None else DEFAULT_PROFILES
    try:
        document = yaml.safe_load(path.read_text())
    except FileNotFoundError as err:
        raise ProfileError(f"{path}: no such profiles file") from err
    except yaml.YAMLError as err:
        raise ProfileError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(document, Mapping) or not isinstance(document.get("profiles"), Mapping):
        raise ProfileError(f"{path}: needs a top-level 'profiles:' mapping of name -> profile")
    if not document["profiles"]:
        raise ProfileError(f"{path}: 'profiles:' is empty")
    return {str(name): parse_profile(str(name), raw) for name, raw in document["profiles"].items()}


def get_profile(name: str, path: str | os.PathLike | None = None) -> Profile:
    """One validated profile by name."""
    profiles = load_profiles(path)
    if name not in profiles:
        raise ProfileError(f"no profile {name!r} in {path or DEFAULT_PROFILES} (profiles: {', '.join(profiles)})")
    return profiles[name]


def scheduler_cfg(profile: Profile, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The profile's scheduler run config with ``overrides`` (strings are cast to the option's type)."""
    cfg = dict(profile.scheduler_args)
    if overrides:
        opts = scheduler_runopts(profile.scheduler)
        for key, value in overrides.items():
            if opts.get(key) is None:
                raise _fail(profile.name, f"{key} is not a run option of {profile.scheduler}")
            cfg.update(opts.cfg_from_str(f"{key}={value}") if isinstance(value, str) else {key: value})
    return cfg


def build_app(profile: Profile, component: str, args: Sequence[str] = ()) -> specs.AppDef:
    """The component's AppDef with the profile's launch arguments as defaults for ``args``."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r} (components: {', '.join(COMPONENTS)})")
    app = materialize_appdef(COMPONENTS[component], list(args), profile.component_defaults())
    if profile.scheduler in CHECKOUT_SCHEDULERS:
        for role in app.roles:  # `torchrun` of the interpreter that launches, even if its venv is not activated
            rest = role.env.get("PATH") or os.environ.get("PATH")  # a whole PATH: the venv's bin, then the rest
            role.env["PATH"] = os.pathsep.join(p for p in (os.path.dirname(sys.executable), rest) if p)
    return app


def render(profile: Profile, component: str, args: Sequence[str] = (),
           cfg_overrides: Mapping[str, Any] | None = None) -> tuple[specs.AppDef, dict[str, Any]]:
    """(AppDef, scheduler run config) for ``component`` launched with ``profile``."""
    return build_app(profile, component, args), scheduler_cfg(profile, cfg_overrides)
