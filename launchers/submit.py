"""Launch a BAHE component (encode, train, evaluate, predict) with a named profile of torchx.yaml.

  python -m bahe.launchers.submit --list
  python -m bahe.launchers.submit --profile local encode -- --store runs/store --data a.parquet,b.parquet
  python -m bahe.launchers.submit --profile k8s --dryrun train -- --data_dir /data/ml --out /data/runs/bahe
  python -m bahe.launchers.submit --profile slurm --cfg partition=a100 --cfg time=2:00:00 train -- \\
      --data_dir /shared/ml --out /shared/runs/bahe -- --batch-size 64

Everything after the component name (an optional first `--` is dropped) is the component's own
arguments, as `torchx run launchers/components.py:COMPONENT --help` lists them: lists are
comma-separated, maps are K=V,K2=V2, and the program's pass-through flags follow a second `--`.
The profile fills j (nodes x processes per node), image, cpu, gpu, memMB, env, mounts and max_retries;
the component's arguments override them. Submission goes through TorchX's Runner API; a local run is
waited for with its logs streamed, and the exit code is 0 only if the job SUCCEEDED. `--dryrun` prints
the AppDef and the scheduler's request without contacting any cluster.
"""

from __future__ import annotations

import argparse
import os
import pprint
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from torchx import specs
from torchx.runner import Runner, get_runner

from bahe.launchers.profiles import (
    CHECKOUT_SCHEDULERS,
    COMPONENTS,
    DEFAULT_PROFILES,
    ProfileError,
    load_profiles,
    render,
)


def _parse_cfg(items: list[str]) -> dict[str, str]:
    cfg = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ProfileError(f"--cfg takes KEY=VALUE, got {item!r}")
        cfg[key.strip()] = value.strip()
    return cfg


def format_profiles(profiles) -> str:
    """One line per profile: name, scheduler, nodes x processes, resources, image."""
    lines = []
    for p in profiles.values():
        lines.append(f"{p.name:10s} {p.scheduler:13s} {p.j:5s} {p.accelerator} cpu={p.cpu} gpu={p.gpu} "
                     f"memMB={p.memMB} image={p.image} {p.scheduler_args or ''}\n{'':10s} {p.description}")
    return "\n".join(lines)


def _stream(runner: Runner, handle: str, role: str, replica: int, out: TextIO, prefix: str) -> None:
    try:
        for line in runner.log_lines(handle, role, replica, should_tail=True):
            out.write(f"{prefix}{line if line.endswith(chr(10)) else line + chr(10)}")
            out.flush()
    except Exception as err:  # logs are a convenience: never fail the launch over them
        out.write(f"{prefix}(logs unavailable: {err})\n")


def wait_for(runner: Runner, handle: str, app: specs.AppDef, *, stream: TextIO | None = None,
             interval: float = 0.5) -> specs.AppStatus | None:
    """Wait until the app ends; with ``stream``, copy every replica's log lines into it meanwhile."""
    threads = []
    if stream is not None:
        for role in app.roles:
            for replica in range(role.num_replicas):
                prefix = f"{role.name}/{replica} " if role.num_replicas > 1 else ""
                thread = threading.Thread(target=_stream, args=(runner, handle, role.name, replica, stream, prefix),
                                          daemon=True)
                thread.start()
                threads.append(thread)
    status = runner.wait(handle, wait_interval=interval)
    for thread in threads:
        thread.join(timeout=10)
    return status


def submit(runner: Runner, app: specs.AppDef, scheduler: str, cfg: dict, *, wait: bool,
           stream: TextIO | None) -> int:
    """Run ``app`` through the Runner API; with ``wait``, block until it ends. Returns the exit code."""
    handle = runner.run(app, scheduler=scheduler, cfg=cfg)
    print(handle, flush=True)
    if not wait:
        status = runner.status(handle)
        print(f"submitted; state {status.state.name if status else 'unknown'}. Follow it with: torchx status {handle} "
              f"and torchx log {handle}", file=sys.stderr)
        return 0
    status = wait_for(runner, handle, app, stream=stream)
    state = status.state if status else specs.AppState.UNKNOWN
    print(f"{handle}: {state.name}", file=sys.stderr)
    if state != specs.AppState.SUCCEEDED:
        detail = status and (status.structured_error_msg if status.structured_error_msg != "<NONE>" else status.msg)
        if detail and detail != "<NONE>":
            print(detail, file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bahe.launchers.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="local", help="profile name in the profiles file (default local)")
    parser.add_argument("--profiles", type=Path, default=DEFAULT_PROFILES,
                        help="profiles file (default: the repository's torchx.yaml)")
    parser.add_argument("--cfg", action="append", default=[], metavar="KEY=VALUE",
                        help="override one of the profile's scheduler_args (repeatable), e.g. --cfg queue=research")
    parser.add_argument("--dryrun", action="store_true",
                        help="print the AppDef and the scheduler request; submit nothing")
    parser.add_argument("--wait", action="store_true", help="wait for a remote job too (local ones always wait)")
    parser.add_argument("--no-logs", action="store_true", help="do not stream the replicas' logs while waiting")
    parser.add_argument("--list", action="store_true", help="list the profiles and exit")
    parser.add_argument("component", nargs="?", choices=sorted(COMPONENTS), help="what to launch")
    parser.add_argument("component_args", nargs=argparse.REMAINDER,
                        help="the component's arguments (after an optional --)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        profiles = load_profiles(args.profiles)
        if args.list:
            print(format_profiles(profiles))
            return 0
        if args.component is None:
            parser.error(f"a component is required ({', '.join(sorted(COMPONENTS))})")
        if args.profile not in profiles:
            raise ProfileError(f"no profile {args.profile!r} in {args.profiles} (profiles: {', '.join(profiles)})")
        profile = profiles[args.profile]
        component_args = args.component_args[1:] if args.component_args[:1] == ["--"] else args.component_args
        app, cfg = render(profile, args.component, component_args, _parse_cfg(args.cfg))
        with get_runner() as runner:
            if args.dryrun:
                info = runner.dryrun(app, profile.scheduler, cfg=cfg)
                print(f"=== APPLICATION ===\n{pprint.pformat(asdict(app), indent=2, width=100)}\n")
                print(f"=== SCHEDULER REQUEST ({profile.scheduler}) ===\n{info}")
                return 0
            wait = args.wait or profile.scheduler.startswith("local")
            saved_path = os.environ.get("PATH")
            if profile.scheduler in CHECKOUT_SCHEDULERS:
                # sbatch hands its own environment to the job, and srun's --export=ALL,PATH=... does not replace
                # a PATH that is already set (Slurm 22.05): the ranks' PATH must be this process's too.
                os.environ["PATH"] = app.roles[0].env["PATH"]
            try:
                return submit(runner, app, profile.scheduler, cfg, wait=wait,
                              stream=None if args.no_logs else sys.stdout)
            finally:
                if saved_path is not None:
                    os.environ["PATH"] = saved_path
    except (ProfileError, ValueError, specs.InvalidRunConfigException) as err:
        print(f"bahe.launchers.submit: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:  # torchx imports a scheduler's client library only when it is used
        print(f"bahe.launchers.submit: error: the {args.profile!r} profile's scheduler needs the Python package "
              f"{err.name!r}: pip install {err.name}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
