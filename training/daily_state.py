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

import datetime
import json
import os
import re
from pathlib import Path

from bahe.embeddings.store import write_text_atomic

DAY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class DailyError(RuntimeError):
    """A day of the daily loop failed; the message is the one line the operator reads."""


def check_day_name(day: str) -> str:
    if not DAY_NAME.match(day or "") or day in (".", ".."):
        raise ValueError(f"--day {day!r}: give a name of letters, digits, '.', '_' or '-' (e.g. 2026-11-30), "
                         "at most 64 characters; it names the day's run folder")
    return day


class DailyHome:
    """One deployment's folder (see the module doc)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.store = self.root / "store"
        self.runs = self.root / "runs"
        self.reports = self.root / "reports"
        self.current_file = self.root / "CURRENT"
        self.log_file = self.root / "published.jsonl"

    def run_dir(self, day: str) -> Path:
        return self.runs / check_day_name(day)

    def current(self) -> dict | None:
        """The published run: {"day", "run", "store_version", "valid_auc", "published_utc"}; None before the first."""
        if not self.current_file.is_file():
            return None
        try:
            record = json.loads(self.current_file.read_text())
            if not isinstance(record, dict) or not {"day", "run"} <= set(record):
                raise ValueError("not a CURRENT record")
        except ValueError as err:
            raise DailyError(f"{self.current_file} is damaged ({err}); restore it with `bahe-daily rollback --home "
                             f"{self.root} --to DAY` (published.jsonl lists the days)") from None
        return record

    def publish(self, day: str, record: dict) -> None:
        """Make ``day``'s run current (atomic), then log it."""
        record = {"day": day, "run": str(Path("runs") / day), **record,
                  "published_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        write_text_atomic(self.current_file, json.dumps(record, indent=2))
        self._log({"event": "publish", **record})

    def published(self) -> list[dict]:
        """Every publish / rollback event, oldest first."""
        if not self.log_file.is_file():
            return []
        return [json.loads(line) for line in self.log_file.read_text().splitlines() if line.strip()]

    def rollback(self, to_day: str | None = None) -> dict:
        """Make an earlier published day current again: ``to_day``, or the one published before the current one."""
        current = self.current()
        if current is None:
            raise DailyError(f"{self.root} has no published run to roll back")
        days = []
        for event in self.published():
            if event["event"] == "publish" and event["day"] not in days:
                days.append(event["day"])
        if to_day is None:
            earlier = days[:days.index(current["day"])] if current["day"] in days else days
            if not earlier:
                raise DailyError(f"{current['day']} is the first published day of {self.root}: nothing to roll back to")
            to_day = earlier[-1]
        chosen = [e for e in self.published() if e["event"] == "publish" and e["day"] == to_day]
        if not chosen:
            raise DailyError(f"day {to_day!r} was never published in {self.root}; published days: {', '.join(days)}")
        if not (self.root / chosen[-1]["run"] / "checkpoints" / "LATEST").is_file():
            raise DailyError(f"day {to_day}'s run {self.root / chosen[-1]['run']} has no checkpoint any more")
        record = {k: v for k, v in chosen[-1].items() if k not in ("event", "published_utc")}
        write_text_atomic(self.current_file, json.dumps(
            {**record, "published_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "rolled_back_from": current["day"]}, indent=2))
        self._log({"event": "rollback", "day": to_day, "from": current["day"]})
        return self.current()

    def _log(self, event: dict) -> None:
        with open(self.log_file, "a") as log:
            log.write(json.dumps(event) + "\n")
            log.flush()
            os.fsync(log.fileno())

    def write_report(self, day: str, report: dict) -> Path:
        """reports/DAY.json and a readable DAY.md beside it (atomic each)."""
        self.reports.mkdir(parents=True, exist_ok=True)
        path = self.reports / f"{check_day_name(day)}.json"
        write_text_atomic(path, json.dumps(report, indent=2))
        write_text_atomic(path.with_suffix(".md"), format_report(report))
        return path


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
