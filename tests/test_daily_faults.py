"""`bahe-daily` on an operator's bad day: stale reruns, changed inputs, rollbacks racing a day, kills between
publish and report, one-class valid splits, damaged or hostile records (issue 27).

Most cases need no training: a home is built with the daily code's own writers (``DailyHome.publish``, day
records as ``bahe-daily run`` writes them) over real sample files, and ``bahe-daily`` (its ``main``, or the
command in a subprocess for the SIGKILL hooks) is run on it. Each case checks the clear outcome: one line
naming the file / line / day and what to do, the exit code, and that nothing is published or lost.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bahe.ctr_data.parquet_io import SampleWriter
from bahe.ctr_data.schema import SampleSchema
from bahe.daily.records import day_inputs
from bahe.daily.state import DailyHome
from bahe.launchers.daily import FAULT_ENV, main
from tests.conftest import tiny_rows
from tests.torchrun import ROOT

FLAGS = ["--steps", "8", "--batch-size", "4"]
SCHEMA = SampleSchema(categorical=("genre",), dense=("age",), sequences=("liked", "disliked"), dataset="tiny")


def write_day(folder: Path, rows: int, *, valid_labels: int | None = None) -> Path:
    """A day's folder of real sample files; ``valid_labels`` 0 or 1 makes its valid split one class."""
    folder.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        columns = tiny_rows(rows)
        if split == "valid" and valid_labels is not None:
            columns["label"] = [valid_labels] * rows
        with SampleWriter(folder / f"{split}.parquet", SCHEMA) as writer:
            writer.write(columns)
    return folder


@pytest.fixture(scope="module")
def days(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("days")
    write_day(root / "a", 8)
    write_day(root / "b", 10)
    write_day(root / "one-class", 8, valid_labels=0)
    return root


def metrics(auc: float) -> dict:
    return {"auc": auc, "ne": 0.9, "logloss": 0.6, "calibration": 1.0, "samples": 8}


def day_record(home: DailyHome, day: str, data: Path, previous: dict | None, steps: tuple, *, auc=0.7, old_auc=0.7):
    """runs/DAY/day.json as ``bahe-daily run`` leaves it once ``steps`` finished, and the run's checkpoint."""
    done = {"refresh": {"version": "v000001", "previous_version": None, "rows": 30, "new_texts": 3, "tokens": 9,
                        "encode_seconds": 0.1, "new_occurrence_share": 0.1, "seconds": 0.5},
            "train": {"init_from": previous and str(home.root / previous["run"]), "selected_step": 8, "steps": 8,
                      "valid": metrics(auc), "test": metrics(auc), "seconds": 2.0},
            "evaluate": {"run": previous and str(home.root / previous["run"]), "valid": metrics(old_auc),
                         "test": metrics(old_auc), "seconds": 1.0},
            "publish": {"seconds": 0.0}}
    run = home.run_dir(day)
    (run / "train" / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "train" / "checkpoints" / "LATEST").write_text("step-0000008")
    state = {"previous": previous, "inputs": day_inputs(data, FLAGS),
             "done": {step: done[step] for step in steps if previous or step != "evaluate"}}
    (run / "day.json").write_text(json.dumps(state, indent=2))
    return state


def publish(home: DailyHome, day: str, data: Path) -> None:
    """A day run to the end: its record, CURRENT and the log (DailyHome.publish), its report."""
    previous = home.current()
    state = day_record(home, day, data, previous, ("refresh", "train", "evaluate", "publish"))
    home.publish(day, {"run": f"runs/{day}/train", "store_version": "v000001", "valid_auc": 0.7}, over=previous)
    home.write_report(day, {"day": day, "status": "published", "reason": f"{day} is current",
                            "previous_day": previous and previous["day"], "new": {"valid": metrics(0.7)},
                            "seconds": {s: r["seconds"] for s, r in state["done"].items()}})


@pytest.fixture
def home(tmp_path, days) -> DailyHome:
    """d1 then d2 published (CURRENT d2); a store version whose files must never change."""
    home = DailyHome(tmp_path / "home")
    (home.store / "v000001").mkdir(parents=True)
    (home.store / "v000001" / "rows.bin").write_bytes(b"rows")
    publish(home, "d1", days / "a")
    publish(home, "d2", days / "a")
    return home


def snapshot(home: DailyHome) -> dict:
    """Every file that publishing or a rollback may change, and the store's, byte for byte."""
    files = [home.current_file, home.log_file, *sorted(home.reports.glob("*")), *sorted(home.store.rglob("*"))]
    return {str(p): p.read_bytes() for p in files if p.is_file()}


def daily(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def run_day(capsys, home, day, data, *extra, flags=FLAGS):
    return daily(capsys, "run", "--home", home.root, "--day", day, "--data", data, *extra, "--", *flags)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bahe-daily: error: ") and "Traceback" not in err, err
    return lines[0]


def killed_at(step: str, home, day, data, *extra) -> subprocess.CompletedProcess:
    """``bahe-daily run`` in its own process, SIGKILLed at ``step`` (FAULT_ENV)."""
    command = [sys.executable, "-m", "bahe.launchers.daily", "run", "--home", str(home.root), "--day", day, "--data",
               str(data), *extra, "--", *FLAGS]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), FAULT_ENV: step})
    assert done.returncode == -9 and f"SIGKILL at {step}" in done.stdout, done.stdout + done.stderr
    return done


def current_day(home) -> str:
    return json.loads(home.current_file.read_text())["day"]


# -- 1. a rerun of a day that is no longer current -----------------------------------------------------------------
@pytest.mark.parametrize("moved_by", ["a later day", "a rollback"])
def test_rerun_of_a_day_no_longer_current_claims_nothing_and_names_the_current_day(home, days, capsys, moved_by):
    rerun, current = "d1", "d2"
    if moved_by == "a rollback":
        assert daily(capsys, "rollback", "--home", home.root, "--to", "d1")[0] == 0
        rerun, current = "d2", "d1"
    before = snapshot(home)
    code, out, err = run_day(capsys, home, rerun, days / "a")
    assert code == 0 and err == ""
    assert f"day {rerun}: nothing to do" in out and f"CURRENT names {current} now" in out, out
    assert "published:" not in out and f"{rerun} is current" not in out
    assert f"bahe-daily rollback --home {home.root} --to {rerun}" in out
    assert snapshot(home) == before  # its report, CURRENT and the log as they were


# -- 2. a resume with other inputs -----------------------------------------------------------------------------------
def test_a_day_records_its_inputs_when_it_starts(home, days):
    killed_at("refresh", home, "d3", days / "a")
    state = json.loads((home.run_dir("d3") / "day.json").read_text())
    assert state["inputs"] == day_inputs(days / "a", FLAGS) and state["previous"]["day"] == "d2"
    assert state["inputs"]["files"]["train.parquet"]["sha256"] and "done" not in state


@pytest.mark.parametrize("change", ["data", "flags"])
def test_a_resume_with_other_inputs_is_refused_naming_both_sides(home, days, capsys, change):
    day_record(home, "d3", days / "a", home.current(), ("refresh", "train", "evaluate"))
    record = (home.run_dir("d3") / "day.json").read_bytes()
    before = snapshot(home)
    if change == "data":
        code, out, err = run_day(capsys, home, "d3", days / "b")
    else:
        code, out, err = run_day(capsys, home, "d3", days / "a", flags=[*FLAGS, "--dense-lr", "0.1"])
    line = one_line(err)
    assert code == 1 and "day d3 was started with other inputs" in line and "--restart" in line, line
    if change == "data":
        assert f"{(days / 'a').resolve()}/train.parquet" in line and f"{(days / 'b').resolve()}/train.parquet" in line
    else:
        assert "-- --steps 8 --batch-size 4," in line and "-- --steps 8 --batch-size 4 --dense-lr 0.1" in line
    assert snapshot(home) == before and (home.run_dir("d3") / "day.json").read_bytes() == record


def test_restart_sets_the_day_aside_and_starts_it_over_with_the_new_inputs(home, days, capsys):
    day_record(home, "d3", days / "a", home.current(), ("refresh", "train"))
    before = snapshot(home)
    done = killed_at("refresh", home, "d3", days / "b", "--restart")
    assert "day d3: started over; the earlier attempt's run folder is now" in done.stdout
    (aside,) = (home.runs / ".restarted").iterdir()
    assert aside.name.startswith("d3-") and (aside / "train" / "checkpoints" / "LATEST").is_file()
    assert json.loads((aside / "day.json").read_text())["inputs"] == day_inputs(days / "a", FLAGS)
    state = json.loads((home.run_dir("d3") / "day.json").read_text())
    assert state["inputs"] == day_inputs(days / "b", FLAGS) and "done" not in state
    assert not (home.run_dir("d3") / "train").exists()
    assert snapshot(home) == before  # CURRENT, the log, the reports and the store untouched


@pytest.mark.parametrize("day", ["d2", "d1"])
def test_restart_of_a_published_day_is_refused_and_moves_nothing(home, days, capsys, day):
    before = snapshot(home)
    code, out, err = run_day(capsys, home, day, days / "b", "--restart")
    line = one_line(err)
    assert code == 1 and f"day {day} " in line and "another --day name" in line, line
    assert snapshot(home) == before and (home.run_dir(day) / "train" / "checkpoints" / "LATEST").is_file()
    assert not (home.runs / ".restarted").exists()


# -- 3. rollback under the home's lock; CURRENT re-checked before publishing ----------------------------------------
def test_rollback_while_a_day_holds_the_home_is_refused_naming_the_holder(home, capsys):
    before = snapshot(home)
    with home.lock():  # what a running `bahe-daily run` holds for its whole day
        code, out, err = daily(capsys, "rollback", "--home", home.root, "--to", "d1")
    line = one_line(err)
    assert code == 1 and f"PID {os.getpid()}" in line and "one bahe-daily (run or rollback) per home" in line, line
    assert snapshot(home) == before
    assert daily(capsys, "rollback", "--home", home.root, "--to", "d1")[0] == 0 and current_day(home) == "d1"


@pytest.mark.parametrize("steps", [("refresh", "train", "evaluate"), ("refresh",)],
                         ids=["checked-right-before-publish", "checked-before-training"])
def test_a_day_started_from_a_run_that_is_no_longer_current_is_not_published(home, days, capsys, steps):
    """d3 started when d1 was current (its warm start and yesterday are d1's); d2 was published since."""
    d1 = [e for e in home.published() if e["day"] == "d1"][0]
    day_record(home, "d3", days / "a", {k: v for k, v in d1.items() if k != "event"}, steps)
    log, current = home.log_file.read_bytes(), home.current_file.read_bytes()
    code, out, err = run_day(capsys, home, "d3", days / "a")
    line = one_line(err)
    assert code == 1 and "day d3 was started from d1's run (runs/d1/train), but CURRENT names d2 now" in line, line
    assert "not published; d2 stays current" in line and "--restart" in line
    assert home.current_file.read_bytes() == current and home.log_file.read_bytes() == log
    if len(steps) == 3:  # refused at publish: the report says so
        report = json.loads((home.reports / "d3.json").read_text())
        assert report["status"] == "not published" and "CURRENT names d2" in report["reason"]


def test_a_day_whose_chain_is_unchanged_publishes(home, days, capsys):
    day_record(home, "d3", days / "a", home.current(), ("refresh", "train", "evaluate"))
    code, out, err = run_day(capsys, home, "d3", days / "a")
    assert code == 0 and "day d3: published: d3 is current" in out, out + err
    assert current_day(home) == "d3" and home.published()[-1]["day"] == "d3"


# -- 4. killed between publish and report -----------------------------------------------------------------------------
def test_a_day_killed_between_publish_and_report_gets_its_report_on_the_rerun(home, days, capsys):
    day_record(home, "d3", days / "a", home.current(), ("refresh", "train", "evaluate"), auc=0.71)
    home.write_report("d3", {"day": "d3", "status": "failed", "reason": "an earlier attempt failed at train"})
    killed_at("report", home, "d3", days / "a")
    assert current_day(home) == "d3" and json.loads((home.reports / "d3.json").read_text())["status"] == "failed"
    code, out, err = run_day(capsys, home, "d3", days / "a")
    assert code == 0 and "day d3 is already current" in out and "report was missing or out of date" in out, out + err
    report = json.loads((home.reports / "d3.json").read_text())
    assert report["status"] == "published" and report["new"]["valid"]["auc"] == 0.71
    assert report["yesterday"]["valid"]["auc"] == 0.7 and report["previous_day"] == "d2"
    assert report["rows"] == {"train": 8, "valid": 8, "test": 8}
    assert (home.reports / "d3.md").read_text().startswith("# Day d3: published")
    code, out, _ = run_day(capsys, home, "d3", days / "a")  # once repaired, a rerun leaves it
    assert code == 0 and "report was missing" not in out


# -- 5. a valid split of one class -------------------------------------------------------------------------------------
@pytest.mark.parametrize("first_day", [False, True])
def test_a_valid_split_of_one_class_is_not_published(tmp_path, home, days, capsys, first_day):
    if first_day:
        home = DailyHome(tmp_path / "fresh")
    previous = home.current()
    day_record(home, "d3", days / "one-class", previous, ("refresh", "train", "evaluate"), auc=0.0, old_auc=0.0)
    before = snapshot(home)
    code, out, err = run_day(capsys, home, "d3", days / "one-class")
    assert code == 3 and err == "", out + err
    assert f"{days / 'one-class' / 'valid.parquet'} holds 8 rows of one class only" in out
    assert "valid AUC is undefined" in out and "--restart" in out
    report = json.loads((home.reports / "d3.json").read_text())
    assert report["status"] == "kept, not published" and "one class only" in report["reason"]
    assert {k: v for k, v in snapshot(home).items() if "d3." not in k} == before  # CURRENT, log, store as they were
    assert not home.current_file.exists() if first_day else current_day(home) == "d2"


# -- 6. damaged CURRENT: the advised rollback works ------------------------------------------------------------------
def test_damaged_current_the_advised_rollback_repairs_it_end_to_end(home, capsys):
    home.current_file.write_text('{"day": "d2", "run": ')  # torn
    code, out, err = daily(capsys, "status", "--home", home.root)
    line = one_line(err)
    assert code == 1 and f"{home.current_file} is damaged" in line
    advice = re.search(r"`(bahe-daily rollback [^`]+)`", line).group(1)
    assert advice == f"bahe-daily rollback --home {home.root} --to DAY"
    refused = daily(capsys, "rollback", "--home", home.root)  # without --to it must read CURRENT: refused
    assert refused[0] == 1 and f"{home.current_file} is damaged" in one_line(refused[2])
    log = home.log_file.read_bytes()
    command = [sys.executable, "-m", "bahe.launchers.daily", *advice.split()[1:]]
    command[-1] = "d1"  # DAY: a day `published.jsonl` lists
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and "d1 is current again" in done.stdout, done.stdout + done.stderr
    current = json.loads(home.current_file.read_text())
    assert current["day"] == "d1" and current["run"] == "runs/d1/train" and current["rolled_back_from"] is None
    assert home.log_file.read_bytes().startswith(log) and home.published()[-1] == {"event": "rollback", "day": "d1",
                                                                                  "from": None}
    assert daily(capsys, "status", "--home", home.root)[0] == 0


# -- 7 and 8. damaged or hostile records: one line naming the file (and line) at every entry point -----------------
def _outside(home: DailyHome) -> Path:
    """A run folder outside the home, with a checkpoint: what a hostile link would lead to."""
    out = home.root.parent / "elsewhere" / "train"
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "checkpoints" / "LATEST").write_text("step-0000008")
    return out


def _link_out(home: DailyHome, day: str) -> None:
    (home.runs / day).symlink_to(_outside(home).parent, target_is_directory=True)


def _current(**fields):
    return lambda home: home.current_file.write_text(json.dumps({"day": "d2", "run": "runs/d2/train", **fields}))


def _log_line(line: int, text: str):
    def damage(home):
        lines = home.log_file.read_text().splitlines()
        lines[line - 1] = text
        home.log_file.write_text("\n".join(lines) + "\n")
    return damage


def _day_json(text: str):
    def damage(home):
        (home.run_dir("d3")).mkdir(parents=True, exist_ok=True)
        (home.run_dir("d3") / "day.json").write_text(text)
    return damage


def _linked_current(home):
    _link_out(home, "d9")
    _current(run="runs/d9/train")(home)


def _linked_publish(home):
    _link_out(home, "d9")
    _log_line(1, json.dumps({"event": "publish", "day": "d1", "run": "runs/d9/train"}))(home)


D1 = {"day": "d1", "run": "runs/d1/train"}
CASES = {  # name: (damage, file, line of published.jsonl or None, what the line must say)
    "current-torn": (lambda h: h.current_file.write_text('{"day": "d2", "ru'), "CURRENT", None, "not JSON"),
    "current-a-list": (lambda h: h.current_file.write_text("[]"), "CURRENT", None, "not a JSON object"),
    "current-run-a-number": (_current(run=5), "CURRENT", None, "field 'run' is 5"),
    "current-run-absolute": (_current(run="/etc"), "CURRENT", None, "'/etc': a run is named relative to the home"),
    "current-run-dotdot": (_current(run="runs/../../x/train"), "CURRENT", None, "without '..'"),
    "current-run-outside-runs": (_current(run="store"), "CURRENT", None, "under runs/"),
    "current-run-links-out": (_linked_current, "CURRENT", None, "outside"),
    "current-day-a-path": (_current(day="../x"), "CURRENT", None, "field 'day' is '../x', not a day name"),
    "current-not-utf8": (lambda h: h.current_file.write_bytes(b'{"day": "\xff"}'), "CURRENT", None, "not UTF-8"),
    "current-a-folder": (lambda h: (h.current_file.unlink(), h.current_file.mkdir()), "CURRENT", None,
                         "not a regular file"),
    "log-torn-line": (_log_line(2, '{"event": "publish", "day": "d2", "ru'), "published.jsonl", 2, "not JSON"),
    "log-a-list": (_log_line(1, "[1, 2]"), "published.jsonl", 1, "not a JSON object"),
    "log-odd-event": (_log_line(2, '{"event": "promote", "day": "d2"}'), "published.jsonl", 2, "'promote'"),
    "log-run-absolute": (_log_line(1, json.dumps({**D1, "event": "publish", "run": "/tmp/x"})), "published.jsonl", 1,
                         "'/tmp/x'"),
    "log-run-links-out": (_linked_publish, "published.jsonl", 1, "outside"),
    "log-rollback-day-a-number": (_log_line(2, '{"event": "rollback", "day": 5}'), "published.jsonl", 2,
                                  "field 'day' is 5"),
    "day-not-json": (_day_json("{\"done\": {\"refr"), "runs/d3/day.json", None, "not JSON"),
    "day-a-list": (_day_json("[]"), "runs/d3/day.json", None, "not a JSON object"),
    "day-done-a-number": (_day_json('{"done": 5}'), "runs/d3/day.json", None, "field 'done' is 5"),
    "day-metric-a-text": (_day_json(json.dumps({"done": {"train": {"seconds": 1, "valid": {"auc": "high"}}}})),
                          "runs/d3/day.json", None, "field 'done.train.valid.auc' is 'high'"),
    "day-previous-links-out": (lambda h: (_link_out(h, "d9"), _day_json(json.dumps(
        {"previous": {"day": "d9", "run": "runs/d9/train"}}))(h)), "runs/d3/day.json", None,
        "field 'previous.run' 'runs/d9/train' is a link to"),
    "day-previous-absolute": (_day_json(json.dumps({"previous": {"day": "d2", "run": "/abs/train"}})),
                              "runs/d3/day.json", None, "field 'previous.run' is '/abs/train'"),
    "day-inputs-odd": (_day_json(json.dumps({"inputs": {"data": "x", "files": {}, "train_flags": []}})),
                       "runs/d3/day.json", None, "field 'inputs.files'"),
    "day-folder-links-out": (lambda h: _link_out(h, "d3"), "runs/d3", None, "is a link to"),
}
ENTRY_POINTS = {  # which commands read each file
    "CURRENT": ["status", "run", "rollback"],
    "published.jsonl": ["status", "rollback --to d1", "run --restart"],
    "runs/d3/day.json": ["run"],
    "runs/d3": ["run"],
}


@pytest.mark.parametrize("case,entry", [(case, entry) for case, (_, file, _, _) in CASES.items()
                                        for entry in ENTRY_POINTS[file]])
def test_a_damaged_or_hostile_record_is_one_line_naming_its_file(home, days, capsys, case, entry):
    damage, file, line_number, says = CASES[case]
    damage(home)
    before = snapshot(home)
    command, *extra = entry.split()
    if command == "run":
        code, out, err = run_day(capsys, home, "d3", days / "a", *extra)
    else:
        code, out, err = daily(capsys, command, "--home", home.root, *extra)
    line = one_line(err)
    where = f"{home.root / file} line {line_number} is damaged" if line_number else str(home.root / file)
    assert code == 1 and where in line and says in line, line
    assert snapshot(home) == before  # nothing published, rolled back or reported
    assert not (home.runs / ".restarted").exists() and not (home.runs / "d3" / "logs").exists()


def test_a_torn_last_line_of_the_log_does_not_swallow_the_next_event(home, days, capsys):
    """A crash mid-append leaves a torn last line: the next event starts a line of its own, so only the
    torn line is named (and removing it repairs the log)."""
    with open(home.log_file, "a") as log:
        log.write('{"event": "publish", "day": "d3", "ru')
    assert daily(capsys, "rollback", "--home", home.root, "--to", "d1")[0] == 1  # the log is read first: refused
    home.publish("d3", {"run": "runs/d2/train"}, over=home.current())
    lines = home.log_file.read_text().splitlines()
    assert json.loads(lines[-1])["day"] == "d3" and lines[-2].endswith('"ru')
    line = one_line(daily(capsys, "status", "--home", home.root)[2])
    assert f"{home.log_file} line {len(lines) - 1} is damaged" in line


def test_rollback_to_a_path_is_refused_before_anything_is_read(home, capsys):
    before = snapshot(home)
    code, out, err = daily(capsys, "rollback", "--home", home.root, "--to", "../d1")
    assert code == 1 and "--to '../d1': give a day's name" in one_line(err)
    assert snapshot(home) == before
