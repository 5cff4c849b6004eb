"""What a daily-update home keeps: which run serves (CURRENT), every run ever published, day reports.

A home folder (``bahe-daily --home HOME``)::

    HOME/store/                 the behaviour store; each day appends a version (old rows byte-identical)
    HOME/runs/DAY/              the day's training run (bahe-train --out); kept whether published or not
    HOME/runs/DAY/yesterday/    the serving model evaluated on the day's valid and test rows
    HOME/CURRENT                JSON: the published day, its run folder and store version (atomic rename)
    HOME/published.jsonl        every publish and rollback, one JSON line each (append-only)
    HOME/reports/DAY.json, .md  the day's report (written for a failed or a refused day too)

CURRENT moves only by an atomic rename of a complete file, so a reader sees yesterday's or today's
run, never a half-written pointer; a day that fails before publishing leaves it as it was.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import time
from pathlib import Path

from bahe.daily.records import (  # noqa: F401  (DailyError, check_day_name: this module's API too)
    DAY_NAME,
    DailyError,
    check_day_name,
    check_run_path,
    read_current,
    read_published,
)
from bahe.embeddings.store import write_text_atomic

BUSY = "{folder} is being updated by {holder}: one bahe-daily (run or rollback) per home at a time; wait for it"


class ChainMoved(DailyError):
    """CURRENT no longer names the run a day warm-started from: the day must not be published."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def same_run(a: dict | None, b: dict | None) -> bool:
    """Two CURRENT records name the same published run (a rollback to it again is the same run)."""
    return (a is None) == (b is None) and (a is None or (a["day"], a["run"]) == (b["day"], b["run"]))


class DailyHome:
    """One deployment's folder (see the module doc). Every record is read through
    :mod:`bahe.daily.records`, so a damaged one is one line naming its file."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.store = self.root / "store"
        self.runs = self.root / "runs"
        self.reports = self.root / "reports"
        self.current_file = self.root / "CURRENT"
        self.log_file = self.root / "published.jsonl"

    def run_dir(self, day: str) -> Path:
        return self.runs / check_day_name(day)

    @contextlib.contextmanager
    def lock(self):
        """The home's lock (``HOME/.lock``), held by ``bahe-daily run`` for the whole day and by a rollback;
        a second holder is refused at once, naming the first (PID, host, since when)."""
        from bahe.embeddings.folder_lock import FolderLock

        if not self.root.is_dir():
            raise DailyError(f"{self.root} is not a bahe-daily home (no such folder)")
        with FolderLock(self.root, BUSY):
            yield self

    def current(self) -> dict | None:
        """The published run: {"day", "run", "store_version", "valid_auc", "published_utc"}; None before the first."""
        return read_current(self.root)

    def publish(self, day: str, record: dict, over: dict | None) -> None:
        """Make ``day``'s run current (atomic), then log it -- only if CURRENT still names ``over``, the run
        the day warm-started from (hold :meth:`lock`); else :class:`ChainMoved` and nothing changes."""
        now = self.current()
        if not same_run(now, over):
            raise ChainMoved(chain_moved(self, day, over, now))
        record = {"day": day, "run": str(Path("runs") / day), **record, "published_utc": _now()}
        check_run_path(self.root, record["run"])
        write_text_atomic(self.current_file, json.dumps(record, indent=2))
        self._log({"event": "publish", **record})

    def published(self) -> list[dict]:
        """Every publish / rollback event, oldest first."""
        return read_published(self.root)

    def published_days(self) -> list[str]:
        days = []
        for event in self.published():
            if event["event"] == "publish" and event["day"] not in days:
                days.append(event["day"])
        return days

    def rollback(self, to_day: str | None = None) -> dict:
        """Make an earlier published day current again: ``to_day``, or the one published before the current
        one. Takes the home's lock. With ``to_day`` a damaged CURRENT is not read, only replaced."""
        with self.lock():
            try:
                current = self.current()
            except DailyError:
                if to_day is None:
                    raise
                current = None  # damaged: --to repairs it
            days = self.published_days()
            if to_day is None:
                if current is None:
                    raise DailyError(f"{self.root} has no published run to roll back")
                earlier = days[:days.index(current["day"])] if current["day"] in days else days
                if not earlier:
                    raise DailyError(f"{current['day']} is the first published day of {self.root}: nothing to roll "
                                     "back to")
                to_day = earlier[-1]
            chosen = [e for e in self.published() if e["event"] == "publish" and e["day"] == to_day]
            if not chosen:
                raise DailyError(f"day {to_day!r} was never published in {self.root}; published days: "
                                 f"{', '.join(days) or 'none'}")
            if not (self.root / chosen[-1]["run"] / "checkpoints" / "LATEST").is_file():
                raise DailyError(f"day {to_day}'s run {self.root / chosen[-1]['run']} has no checkpoint any more")
            record = {k: v for k, v in chosen[-1].items() if k not in ("event", "published_utc", "rolled_back_from")}
            source = current and current["day"]
            write_text_atomic(self.current_file, json.dumps(
                {**record, "published_utc": _now(), "rolled_back_from": source}, indent=2))
            self._log({"event": "rollback", "day": to_day, "from": source})
            return self.current()

    def _log(self, event: dict) -> None:
        """Append one line to published.jsonl; a torn last line (a crash mid-write) is ended first, so the
        new event stays a line of its own."""
        with open(self.log_file, "a+b") as log:
            log.seek(0, os.SEEK_END)
            torn = False
            if log.tell():
                log.seek(-1, os.SEEK_END)
                torn = log.read(1) != b"\n"
            log.write((("\n" if torn else "") + json.dumps(event) + "\n").encode())
            log.flush()
            os.fsync(log.fileno())

    def write_report(self, day: str, report: dict) -> Path:
        """reports/DAY.json and a readable DAY.md beside it (atomic each)."""
        self.reports.mkdir(parents=True, exist_ok=True)
        path = self.reports / f"{check_day_name(day)}.json"
        write_text_atomic(path, json.dumps(report, indent=2))
        write_text_atomic(path.with_suffix(".md"), format_report(report))
        return path

    def report_status(self, day: str) -> str | None:
        """The status the day's report gives (None: no report, or not one this module wrote)."""
        with contextlib.suppress(OSError, ValueError, AttributeError):
            return json.loads((self.reports / f"{check_day_name(day)}.json").read_text()).get("status")
        return None

    def set_aside(self, day: str) -> Path | None:
        """Move the day's run folder to runs/.restarted/DAY-<utc> (one rename: never half gone), for a
        restart; None when there was none. Refused for a published day (CURRENT or a rollback may need it)
        and while a trainer still holds the day's run folder."""
        from bahe.embeddings.folder_lock import FolderLock

        current = self.current()
        if current and current["day"] == day:
            raise DailyError(f"day {day} is current: --restart would move away the run that serves; roll back "
                             f"first (bahe-daily rollback --home {self.root}), or run the day under another --day name")
        if day in self.published_days():
            raise DailyError(f"day {day} was published before (published.jsonl): a rollback may need its run; run "
                             "the new attempt under another --day name")
        folder = self.run_dir(day)
        if not folder.is_symlink() and not folder.exists():
            return None
        aside = self.runs / ".restarted" / f"{day}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        train = folder / "train"
        holder = FolderLock(train, "day " + day + "'s run {folder} is still being trained by {holder}; stop it first")
        with holder if train.is_dir() and not train.is_symlink() else contextlib.nullcontext():
            os.rename(folder, aside)
        return aside


def chain_moved(home: DailyHome, day: str, over: dict | None, now: dict | None) -> str:
    started = f"{over['day']}'s run ({over['run']})" if over else "nothing (the first day)"
    names = f"names {now['day']}" if now else "names nothing"
    return (f"day {day} was started from {started}, but CURRENT {names} now (a rollback or another day since): "
            f"not published; {now['day'] + ' stays current' if now else 'nothing is published'}. To train the day "
            f"from what is current, run it again with --restart (its run folder is moved to {home.runs}/.restarted; "
            "CURRENT and the store stay as they are)")


def guard(data: Path, new: dict, old: dict | None, margin: float, previous: dict | None) -> str | None:
    """Why today's model must not be published (None: publish): its valid AUC undefined (a valid split
    of one class, a non-finite AUC) or, with a yesterday, below yesterday's by more than ``margin``."""
    positives, rows = _label_counts(data / "valid.parquet")
    if positives in (0, rows):
        return (f"guard: {data / 'valid.parquet'} holds {rows:,} rows of one class only (all "
                f"{'non-clicks' if positives == 0 else 'clicks'}): valid AUC is undefined, so today's model cannot be "
                "checked; not published. Give the day a valid split with both classes and run it with --restart")
    aucs = [new["valid"]["auc"], *([old["valid"]["auc"]] if old else [])]
    if not all(math.isfinite(auc) for auc in aucs):
        return f"guard: valid AUC is undefined ({', '.join(map(str, aucs))}); not published"
    if old and new["valid"]["auc"] < old["valid"]["auc"] - margin:
        return (f"regression guard: today's valid AUC {new['valid']['auc']:.4f} is below yesterday's "
                f"{old['valid']['auc']:.4f} on the same rows by more than --margin {margin}; {previous['day']} stays "
                "current")
    return None


def day_report(day: str, state: dict, data: Path, status: str, reason: str) -> dict:
    """The day's report from its record (day.json) and data folder: what finished, both models' metrics."""
    done, previous = state.get("done", {}), state.get("previous")
    report = {"day": day, "status": status, "reason": reason, "previous_day": previous and previous["day"],
              "data": str(data)}
    if "refresh" in done:
        report["refresh"] = {k: v for k, v in done["refresh"].items() if k != "seconds"}
    with contextlib.suppress(OSError, ValueError):  # a bad data file: the reason already names it
        report["rows"] = _rows(data)
    if "train" in done:
        report["new"] = {split: done["train"][split] for split in ("valid", "test")}
    if "evaluate" in done:
        report["yesterday"] = {split: done["evaluate"][split] for split in ("valid", "test")}
    report["seconds"] = {step: result["seconds"] for step, result in done.items()}
    return report


def _label_counts(path: Path) -> tuple[int, int]:
    """(clicks, rows) of a sample file's label column."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    labels = pq.ParquetFile(path).read(columns=["label"]).column("label")
    return int(pc.sum(labels).as_py() or 0), len(labels)


def _rows(data: Path) -> dict:
    from bahe.ctr_data.parquet_io import SampleReader

    return {split: SampleReader(data / f"{split}.parquet").num_rows for split in ("train", "valid", "test")}


def _metric_row(name: str, result: dict | None) -> str:
    if not result:
        return f"| {name} | - | - | - | - |"
    return (f"| {name} | {result['auc']:.4f} | {result['ne']:.4f} | {result['logloss']:.4f} | "
            f"{result['calibration']:.3f} |")


def format_report(report: dict) -> str:
    """The day's report as Markdown."""
    lines = [f"# Day {report['day']}: {report['status']}", "", report.get("reason") or "", ""]
    refresh = report.get("refresh") or {}
    if refresh:
        lines += [f"Store {refresh.get('version')} ({refresh.get('rows'):,} rows): {refresh.get('new_texts', 0):,} new "
                  f"texts encoded in {refresh.get('encode_seconds', 0):.1f} s of encoding ({refresh.get('tokens', 0):,} tokens), "
                  f"{refresh.get('new_occurrence_share', 0):.1%} of the day's text occurrences.", ""]
    rows = report.get("rows") or {}
    if rows:
        lines += ["Rows: " + ", ".join(f"{split} {count:,}" for split, count in rows.items()), ""]
    seconds = report.get("seconds") or {}
    if seconds:
        lines += ["Seconds: " + ", ".join(f"{step} {value:.1f}" for step, value in seconds.items()), ""]
    for split in ("valid", "test"):
        new, old = (report.get("new") or {}).get(split), (report.get("yesterday") or {}).get(split)
        if new or old:
            lines += [f"{split} (the day's {'held-out rows' if split == 'valid' else 'next-day rows'}):", "",
                      "| model | AUC | NE | log loss | calibration |", "|---|---|---|---|---|",
                      _metric_row(f"today's ({report['day']})", new),
                      _metric_row(f"yesterday's ({report.get('previous_day') or '-'})", old), ""]
    return "\n".join(lines)
