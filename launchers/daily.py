"""`bahe-daily`: one day of the production loop -- refresh the store, warm-start, evaluate, guard, publish.

  bahe-daily run --home prod --day 2026-11-30 --data days/2026-11-30 -- --epochs 1 --batch-size 256
  bahe-daily run --home prod --day 2026-11-30 --data /shared/days/2026-11-30 --profile slurm -- ...
  bahe-daily status --home prod
  bahe-daily rollback --home prod [--to 2026-11-28]

A day, in order (its DATA folder holds train.parquet, valid.parquet -- the day's held-out last rows --
and test.parquet, the rows to report on: the next day's in a replay, else the valid rows again):

1. refresh: ``bahe-encode build`` appends the day's NEW texts (train and valid) to HOME/store as a new
   version; old rows stay byte-identical, so yesterday's model reads the grown store unchanged;
2. train: ``bahe-train --init-from`` the current run, on the day's rows only (the first day trains
   from scratch); everything after ``--`` goes to bahe-train, the same every day;
3. evaluate: the current (yesterday's) model on the same day's valid and test rows;
4. guard: today's model is NOT published when its valid AUC is below yesterday's on the same rows by
   more than --margin (it is kept in HOME/runs/DAY; exit code 3);
5. publish: HOME/CURRENT names today's run (an atomic rename);
6. report: HOME/reports/DAY.json and .md (rows, new texts and their cost, seconds per step, AUC / NE /
   log loss / calibration of today's and yesterday's model on the same rows).

A day that fails at any step (a crash, bad data, a NaN loss, a full disk) leaves CURRENT and the
store's earlier versions as they were, says so in one line (exit code 1), and the same command run
again resumes: finished steps are not redone (HOME/runs/DAY/day.json) and training resumes from its
last checkpoint. day.json records the day's inputs (data digests, train flags): a rerun with others is
refused, unless --restart starts the day over (its run folder moved to HOME/runs/.restarted first).
CURRENT is re-checked under the home's lock (which a rollback takes too) right before publishing. Every step's output is in HOME/runs/DAY/logs/. With --profile the encode, train and
evaluate steps are TorchX jobs of that torchx.yaml profile (python -m bahe.launchers.submit); the rest
runs here. See docs/daily.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bahe.daily.records import (
    DAY_FILES,
    DAY_NAME,
    RecordError,
    check_run_path,
    day_inputs,
    differences,
    read_day_record,
)
from bahe.daily.state import (
    ChainMoved,
    DailyError,
    DailyHome,
    chain_moved,
    check_day_name,
    day_report,
    guard,
    same_run,
)

FAULT_ENV = "BAHE_DAILY_KILL_AT"  # tests: SIGKILL this driver at the start of that step
GUARD_REFUSED = 3
ENCODE_CHUNK_TEXTS = 4096  # bahe-encode's texts per chunk, its unit of work across ranks


class Day:
    """One day's run of the chain in a :class:`DailyHome`; its progress lives in runs/DAY/day.json."""

    def __init__(self, home: DailyHome, day: str, data: Path, args: argparse.Namespace):
        self.home, self.day, self.data, self.args = home, check_day_name(day), Path(data), args
        self.run = home.run_dir(day)
        try:  # runs/DAY a link out of the home: refused like a run path in a record
            check_run_path(home.root, f"runs/{self.day}")
        except RecordError:
            raise DailyError(f"{self.run} is a link to {self.run.resolve()}, outside {home.runs}: a day's run folder "
                             "stays inside its home; remove the link (or use another --day name)") from None
        self.state_file = self.run / "day.json"
        self.state = read_day_record(home.root, self.state_file, self.day)

    def save(self) -> None:
        from bahe.embeddings.store import write_text_atomic

        self.run.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.state_file, json.dumps(self.state, indent=2))

    # -- running a program: here (torchrun for several ranks) or as a TorchX job of a profile ------------------
    def command(self, module: str, component: str, args: list[str], component_args: list[str],
                nproc: int | None = None) -> list[str]:
        """``python -m module args`` (torchrun for several ranks), or the TorchX ``component`` of --profile."""
        nproc = self.args.nproc if nproc is None else nproc
        if self.args.profile:
            return [sys.executable, "-m", "bahe.launchers.submit", "--profile", self.args.profile, "--wait",
                    component, "--", *component_args]
        if nproc > 1:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                    str(nproc), "-m", module, *args]
        return [sys.executable, "-m", module, *args]

    def launch(self, step: str, module: str, component: str, args: list[str], component_args: list[str],
               nproc: int | None = None) -> None:
        """Run :meth:`command` (``nproc`` local ranks instead of --nproc); its output goes to logs/STEP.log."""
        command = self.command(module, component, args, component_args, nproc)
        logs = self.run / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{step}.log"
        with open(log_path, "a") as log:
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if done.returncode != 0:
            raise DailyError(f"{step} failed ({_last_error(log_path)}; whole log: {log_path})")

    def timed(self, step: str, work) -> dict:
        """Run a step unless day.json says it finished; records its result and seconds."""
        if step in self.state.get("done", {}):
            print(f"day {self.day}: {step} already done (day.json), skipped", flush=True)
            return self.state["done"][step]
        _maybe_killed(step)
        print(f"day {self.day}: {step} ...", flush=True)
        start = time.perf_counter()
        try:
            result = work() or {}
        except DailyError:
            raise
        except (OSError, ValueError) as err:  # bad data, a full disk: named by the step it stopped
            raise DailyError(f"{step} failed ({err})") from err
        result["seconds"] = round(time.perf_counter() - start, 2)
        self.state.setdefault("done", {})[step] = result
        self.save()
        print(f"day {self.day}: {step} done in {result['seconds']:.1f} s", flush=True)
        return result

    # -- the steps -------------------------------------------------------------------------------------------
    def refresh(self) -> dict:
        import pyarrow as pa

        from bahe.embeddings.store import BehaviourStore, latest_version
        from bahe.embeddings.vocabulary import RESERVED, UNKNOWN_ID, count_texts

        files = [self.data / "train.parquet", self.data / "valid.parquet"]
        before = latest_version(self.home.store) if self.home.store.is_dir() else None
        counts = count_texts(files)  # the day's texts (a bad file stops here, named)
        day_texts = pa.array(list(counts), pa.string())
        rows_before = 0
        if before:  # the day's texts resolved through the store's text index: memory follows the day, not the store
            old = BehaviourStore.open(self.home.store)
            rows_before = old.rows_count
            unseen = [text for text, row in zip(counts, old.text_index.lookup_array(day_texts, count=False))
                      if row == UNKNOWN_ID]
        else:
            unseen = list(counts)
        if unseen:  # nothing new: no encoder to start. A few new texts: one process (a chunk is the unit of work)
            encoder = _encoder_flags(self.home.store, self.args)
            ranks = self.args.nproc if len(unseen) > ENCODE_CHUNK_TEXTS else 1
            self.launch("refresh", "bahe.embeddings.cli", "encode", *encode_args(self.home.store, files, encoder),
                        nproc=ranks)
        store = BehaviourStore.open(self.home.store)
        new = store.version != before
        stats = store.manifest.get("stats", {}) if new else {}
        rows = store.text_index.lookup_array(day_texts, count=False)  # a text is new when its row is past the old rows
        total = sum(counts.values())
        share = round(sum(c for c, row in zip(counts.values(), rows) if row >= max(rows_before, len(RESERVED))) / total, 4) if total else 0.0
        return {"version": store.version, "previous_version": before, "rows": store.rows_count,
                "new_texts": store.rows_count - rows_before, "tokens": stats.get("tokens", 0),
                "encode_seconds": stats.get("encode_seconds", 0.0), "new_occurrence_share": share}

    def train(self, init_from: str | None) -> dict:
        self.launch("train", "bahe.launchers.train", "train",
                    *train_args(self.data, self.run / "train", self.home.store, init_from, self.args.train_flags))
        metrics = json.loads((self.run / "train" / "metrics.json").read_text())
        return {"init_from": init_from, "selected_step": metrics.get("selected_step"), "steps": metrics["steps"],
                "valid": metrics["valid"], "test": metrics["test"]}

    def evaluate_previous(self, previous_run: Path) -> dict:
        out = self.run / "yesterday"
        self.launch("evaluate", "bahe.launchers.evaluate", "evaluate",
                    *evaluate_args(previous_run, self.data, self.home.store, out))
        result = json.loads((out / "evaluation.json").read_text())
        return {"run": str(previous_run), "valid": result["valid"], "test": result["test"]}


# Each step's program arguments, twice: for ``python -m MODULE`` and for the TorchX component of the same
# name (launchers/components.py) -- tests/test_daily.py checks the two parse to the same options.
def encode_args(store: Path, files: list[Path], encoder: list[str]) -> tuple[list[str], list[str]]:
    return (["build", "--store", str(store), "--data", *map(str, files), *encoder, "--quiet"],
            ["--store", str(store), "--data", ",".join(map(str, files)), "--", *encoder])


def train_args(data: Path, out: Path, store: Path, init_from: str | None, flags: list[str]
               ) -> tuple[list[str], list[str]]:
    rest = [*(["--init-from", init_from] if init_from else []), *flags]
    return (["--data-dir", str(data), "--out", str(out), "--store", str(store), *rest],
            ["--data_dir", str(data), "--out", str(out), "--store", str(store), "--", *rest])


def evaluate_args(run: Path, data: Path, store: Path, out: Path) -> tuple[list[str], list[str]]:
    return (["--checkpoint", str(run), "--data-dir", str(data), "--store", str(store), "--out", str(out)],
            ["--checkpoint", str(run), "--data_dir", str(data), "--store", str(store), "--out", str(out)])


def _maybe_killed(step: str) -> None:
    if os.environ.get(FAULT_ENV) == step:
        print(f"{FAULT_ENV}: the daily driver kills itself with SIGKILL at {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def _last_error(log_path: Path) -> str:
    """The most telling line of a failed program's log: its own error line, else the last line."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if "error:" in line.lower() or line.startswith(("ValueError", "RuntimeError", "OSError", "DataError")):
            return line[:400]
    return lines[-1][:400] if lines else "no output"


def _encoder_flags(store_root: Path, args: argparse.Namespace) -> list[str]:
    """The first build's --model/--k from the flags; later builds repeat the store's own encoder settings."""
    from bahe.embeddings.store import BehaviourStore, latest_version

    if store_root.is_dir() and latest_version(store_root):
        manifest = BehaviourStore.open(store_root).manifest
        encoder = manifest["encoder"]
        flags = ["--model", manifest["model"]["dir"], "--k", str(encoder["k"]), "--pooling", encoder["pooling"],
                 "--dtype", encoder["dtype"], "--max-tokens", str(encoder["max_tokens"]),
                 "--batch-tokens", str(encoder["batch_tokens"])]
        return flags + ([] if encoder["fixed_shapes"] else ["--dynamic-shapes"])
    return ["--model", args.llm, "--k", str(args.k)]


def run_day(args: argparse.Namespace) -> int:
    home = DailyHome(args.home)
    for name in DAY_FILES:
        if not (Path(args.data) / name).is_file():
            raise ValueError(f"--data {args.data} has no {name}: a day's folder holds train.parquet, "
                             "valid.parquet (its held-out last rows) and test.parquet (rows to report on)")
    home.root.mkdir(parents=True, exist_ok=True)
    with home.lock():
        if args.restart:
            aside = home.set_aside(check_day_name(args.day))
            print(f"day {args.day}: started over" + (f"; the earlier attempt's run folder is now {aside} (delete it "
                                                     "when it is not needed)" if aside else ""), flush=True)
        current = home.current()
        day = Day(home, args.day, Path(args.data), args)
        inputs = day_inputs(day.data, args.train_flags)
        if "inputs" in day.state and (changed := differences(day.state["inputs"], inputs)):
            raise DailyError(f"day {day.day} was started with other inputs ({'; '.join(changed)}); a day's data and "
                             "train flags stay the same across its reruns: run it with the first ones, or add "
                             "--restart to start the day over with these")
        done = day.state.get("done", {})
        if current and current["day"] == day.day:
            return already_current(home, day, current)
        if "publish" in done:  # published once; a rollback or a later day has moved CURRENT since
            print(f"day {day.day}: nothing to do: it was published before, but CURRENT names "
                  f"{current['day'] if current else 'nothing'} now (a rollback or a later day); its report is left "
                  f"as it is. To serve {day.day} again: bahe-daily rollback --home {home.root} --to {day.day}",
                  flush=True)
            return 0
        if "inputs" not in day.state or "previous" not in day.state:  # the day's first attempt: its chain is fixed
            day.state.setdefault("inputs", inputs)
            day.state.setdefault("previous", current)
            day.save()
        previous = day.state["previous"]
        if "train" not in done and not same_run(current, previous):  # would train from a run no longer current
            raise ChainMoved(chain_moved(home, day.day, previous, current))
        try:
            refresh = day.timed("refresh", day.refresh)
            init_from = str(home.root / previous["run"]) if previous else None
            new = day.timed("train", lambda: day.train(init_from))
            old = day.timed("evaluate", lambda: day.evaluate_previous(home.root / previous["run"])) if previous \
                else None
            refused = guard(day.data, new, old, args.margin, previous)
            if refused:
                status, reason = "kept, not published", refused + f"; today's run is kept in {day.run / 'train'}"
            else:
                day.timed("publish", lambda: home.publish(day.day, {
                    "run": str((day.run / "train").relative_to(home.root)), "store_version": refresh["version"],
                    "valid_auc": new["valid"]["auc"], "init_from": init_from}, over=previous) or {})
                status, reason = "published", f"{day.day} is current (CURRENT -> {day.run / 'train'})"
            _maybe_killed("report")
            home.write_report(day.day, day_report(day.day, day.state, day.data, status, reason))
            print(f"day {day.day}: {status}: {reason} (report: {home.reports / day.day}.md)", flush=True)
            return GUARD_REFUSED if refused else 0
        except ChainMoved as err:  # CURRENT moved under the day (re-checked right before publishing)
            with contextlib.suppress(OSError, DailyError):
                home.write_report(day.day, day_report(day.day, day.state, day.data, "not published", str(err)))
            raise
        except (DailyError, OSError, ValueError) as err:
            try:
                now = home.current()
            except DailyError:
                now = previous
            serving = f"{now['day']} is still current" if now else "nothing is published yet"
            line = (f"day {day.day} failed: {err}. {serving}, and the store's earlier versions are intact; run the "
                    "same command again to resume")
            with contextlib.suppress(OSError, DailyError):  # a full disk: the line below still says it
                home.write_report(day.day, day_report(day.day, day.state, day.data, "failed", line))
            raise DailyError(line) from None


def already_current(home: DailyHome, day: Day, current: dict) -> int:
    """A rerun of the day that is current: nothing to do, except a report the publishing run did not get to
    write (it stopped between publish and report) -- written now from day.json."""
    note = ""
    if home.report_status(day.day) != "published" and {"refresh", "train"} <= set(day.state.get("done", {})):
        home.write_report(day.day, day_report(day.day, day.state, day.data, "published", (
            f"{day.day} is current (CURRENT -> {home.root / current['run']}); this report was written by a rerun, "
            "the run that published the day stopped before its report")))
        note = f"; its report was missing or out of date and is written now ({home.reports / day.day}.md)"
    print(f"day {day.day} is already current in {home.root}; nothing to do{note}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from bahe.embeddings.pretrained import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="bahe-daily", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) one day of the chain")
    run.add_argument("--home", type=Path, required=True, help="the deployment's folder (store, runs, CURRENT, reports)")
    run.add_argument("--day", required=True, help="the day's name, e.g. 2026-11-30 (names its run folder)")
    run.add_argument("--data", type=Path, required=True, help="the day's folder: train/valid/test.parquet")
    run.add_argument("--margin", type=float, default=0.002,
                     help="regression guard: refuse to publish when today's valid AUC is below yesterday's on the "
                          "same rows by more than this (default 0.002)")
    run.add_argument("--nproc", type=int, default=1, help="local ranks per step (torchrun; default 1)")
    run.add_argument("--profile", default=None,
                     help="run encode / train / evaluate as TorchX jobs of this torchx.yaml profile instead")
    run.add_argument("--llm", default=DEFAULT_MODEL, help=f"the store's LLM at its first build (default {DEFAULT_MODEL})")
    run.add_argument("--k", type=int, default=8, help="the store's shallow layers at its first build (default 8, the demo's)")
    run.add_argument("--restart", action="store_true",
                     help="start the day over (other data or train flags): its run folder is moved to "
                          "HOME/runs/.restarted first; refused for a published day. CURRENT and the store stay")
    run.add_argument("train_flags", nargs=argparse.REMAINDER, help="after --: bahe-train flags, the same every day")
    status = sub.add_parser("status", help="print CURRENT and the published days")
    status.add_argument("--home", type=Path, required=True)
    back = sub.add_parser("rollback", help="make an earlier published day current again")
    back.add_argument("--home", type=Path, required=True)
    back.add_argument("--to", default=None, help="the day to make current (default: the one before the current)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            args.train_flags = args.train_flags[1:] if args.train_flags[:1] == ["--"] else args.train_flags
            if args.nproc < 1:
                raise ValueError(f"--nproc {args.nproc}: give >= 1 local ranks")
            return run_day(args)
        home = DailyHome(args.home)
        if args.command == "rollback":
            if args.to is not None and not DAY_NAME.match(args.to):
                raise ValueError(f"--to {args.to!r}: give a day's name, as `bahe-daily status` lists them")
            record = home.rollback(args.to)
            print(f"{home.root}: {record['day']} is current again ({record['run']})")
            return 0
        print(json.dumps({"current": home.current(), "published": home.published()}, indent=2))
        return 0
    except (DailyError, ValueError, OSError) as err:
        print(f"bahe-daily: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
