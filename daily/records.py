"""The daily loop's records, validated: one check per record type, used by every reader.

Three records drive ``bahe-daily`` and each is read only through this module:

- ``HOME/CURRENT`` (:func:`read_current`): the published day, its run folder, store version, valid AUC;
- ``HOME/published.jsonl`` (:func:`read_published`): every publish and rollback, one JSON object a line;
- ``HOME/runs/DAY/day.json`` (:func:`read_day_record`): a day's inputs, the run it warm-starts from
  (a copy of CURRENT at its start) and its finished steps.

A record that is not what the loop writes -- torn JSON, a field of another type, a day name that is not
one, a run path that leaves ``HOME/runs`` (absolute, ``..``, a link out of the folder) -- raises
:class:`DailyError` with one line naming the file (and the line of published.jsonl) and what to do. No
reader follows a run path that has not passed :func:`check_run_path`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath

DAY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DAY_FILES = ("train.parquet", "valid.parquet", "test.parquet")
STEPS = ("refresh", "train", "evaluate", "publish", "report")


class DailyError(RuntimeError):
    """A day of the daily loop failed; the message is the one line the operator reads."""


class RecordError(ValueError):
    """What is wrong inside one record (the reader adds the file and what to do)."""


def check_day_name(day: str) -> str:
    if not isinstance(day, str) or not DAY_NAME.match(day) or day in (".", ".."):
        raise ValueError(f"--day {day!r}: give a name of letters, digits, '.', '_' or '-' (e.g. 2026-11-30), "
                         "at most 64 characters; it names the day's run folder")
    return day


# -- field checks ---------------------------------------------------------------------------------------------
def _short(value) -> str:
    """repr(value), cut to 60 characters: a message stays one short line whatever a record holds."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _text(record: dict, key: str, prefix: str = "", *, optional: bool = False) -> str | None:
    value = record.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise RecordError(f"field '{prefix}{key}' is {_short(value)}, not a text" if key in record
                          else f"field '{prefix}{key}' is missing")
    return value


def _number(value, what: str, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"{what} is {_short(value)}, not a number")
    return value


def _day(record: dict, key: str, prefix: str = "", *, optional: bool = False) -> str | None:
    value = _text(record, key, prefix, optional=optional)
    if value is not None and (not DAY_NAME.match(value) or value in (".", "..")):
        raise RecordError(f"field '{prefix}{key}' is {_short(value)}, not a day name")
    return value


def check_run_path(home: Path, run, what: str = "field 'run'") -> str:
    """``run`` as a record holds it: a relative path under ``runs/`` of the home, without ``..``, that
    stays inside ``HOME/runs`` with links resolved. Anything else is refused (RecordError)."""
    if not isinstance(run, str) or not run:
        raise RecordError(f"{what} is {_short(run)}, not a run folder (a path like runs/DAY/train)")
    parts = PurePosixPath(run).parts
    if PurePosixPath(run).is_absolute() or "\\" in run or ".." in parts or parts[:1] != ("runs",) or len(parts) < 2:
        raise RecordError(f"{what} is {_short(run)}: a run is named relative to the home, under runs/ and without '..' "
                          "(e.g. runs/DAY/train)")
    runs = (Path(home) / "runs").resolve()
    real = (Path(home) / run).resolve()
    if not real.is_relative_to(runs):
        raise RecordError(f"{what} {_short(run)} is a link to {real}, outside {Path(home) / 'runs'}: a home's runs stay "
                          "inside it")
    return run


def _metrics(value, name: str) -> dict:
    if not isinstance(value, dict):
        raise RecordError(f"field '{name}' is {_short(value)}, not a metrics record")
    for key in ("auc", "ne", "logloss", "calibration"):  # NaN / inf may be real results (one class, no clicks)
        _number(value.get(key), f"field '{name}.{key}'")
    return value


def check_current(home: Path, record, prefix: str = "") -> dict:
    """A CURRENT record (also a publish event, and a day's ``previous`` with prefix ``previous.``)."""
    if not isinstance(record, dict):
        where = f"field '{prefix[:-1]}'" if prefix else "it"
        raise RecordError(f"{where} holds {type(record).__name__} {_short(record)}, not a JSON object")
    _day(record, "day", prefix)
    check_run_path(home, record.get("run"), f"field '{prefix}run'")
    _text(record, "store_version", prefix, optional=True)
    _number(record.get("valid_auc"), f"field '{prefix}valid_auc'", optional=True)
    for key in ("published_utc", "init_from", "rolled_back_from"):
        _text(record, key, prefix, optional=True)
    return record


def check_event(home: Path, event) -> dict:
    """One line of published.jsonl: a publish event (a CURRENT record) or a rollback event."""
    if not isinstance(event, dict):
        raise RecordError(f"it holds {type(event).__name__} {_short(event)}, not a JSON object")
    kind = event.get("event")
    if kind == "publish":
        return check_current(home, event)
    if kind == "rollback":
        _day(event, "day")
        _day(event, "from", optional=True)
        return event
    raise RecordError(f"field 'event' is {_short(kind)}, not 'publish' or 'rollback'")


def check_inputs(inputs) -> dict:
    """A day's inputs: {"data": folder, "files": {name: {"sha256", "bytes"}}, "train_flags": [...]}."""
    if not isinstance(inputs, dict):
        raise RecordError(f"field 'inputs' is {_short(inputs)}, not a JSON object")
    _text(inputs, "data", "inputs.")
    files = inputs.get("files")
    if not isinstance(files, dict) or set(files) != set(DAY_FILES):
        raise RecordError(f"field 'inputs.files' is {_short(files)}, not the digests of {', '.join(DAY_FILES)}")
    for name, entry in files.items():
        if not isinstance(entry, dict) or not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256"))) or \
                isinstance(entry.get("bytes"), bool) or not isinstance(entry.get("bytes"), int):
            raise RecordError(f"field 'inputs.files.{name}' is {_short(entry)}, not {{sha256, bytes}}")
    flags = inputs.get("train_flags")
    if not isinstance(flags, list) or not all(isinstance(flag, str) for flag in flags):
        raise RecordError(f"field 'inputs.train_flags' is {_short(flags)}, not a list of texts")
    return inputs


def check_day_record(home: Path, record) -> dict:
    """day.json: {"inputs", "previous" (a CURRENT record or null), "done": {step: result}}."""
    if not isinstance(record, dict):
        raise RecordError(f"it holds {type(record).__name__} {_short(record)}, not a JSON object")
    if "inputs" in record:
        check_inputs(record["inputs"])
    if record.get("previous") is not None:
        check_current(home, record["previous"], "previous.")
    done = record.get("done", {})
    if not isinstance(done, dict):
        raise RecordError(f"field 'done' is {_short(done)}, not a JSON object of finished steps")
    for step, result in done.items():
        if step not in STEPS or not isinstance(result, dict):
            raise RecordError(f"field 'done.{step}' is {_short(result)}: not a finished step "
                              f"({', '.join(STEPS)})")
        _number(result.get("seconds"), f"field 'done.{step}.seconds'")
        if step == "refresh":
            _text(result, "version", "done.refresh.")
            for key in ("rows", "new_texts", "tokens", "encode_seconds", "new_occurrence_share"):
                _number(result.get(key), f"field 'done.refresh.{key}'")
        if step in ("train", "evaluate"):
            for split in ("valid", "test"):
                _metrics(result.get(split), f"done.{step}.{split}")
    return record


# -- readers: the file, parsed and checked, or one line naming it -----------------------------------------------
def _read_text(path: Path) -> str | None:
    """The file's text; None when it does not exist; RecordError when it is not a readable regular file."""
    if not path.is_symlink() and not path.exists():
        return None
    if path.is_symlink() or not path.is_file():
        raise RecordError("it is not a regular file (a link or a folder)")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecordError(f"not UTF-8 text ({err.reason} at byte {err.start})") from None


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError as err:
        raise RecordError(f"not JSON ({err})") from None


def read_current(home: Path) -> dict | None:
    """HOME/CURRENT checked; None before the first publish."""
    path = Path(home) / "CURRENT"
    try:
        text = _read_text(path)
        return None if text is None else check_current(home, _json(text))
    except RecordError as err:
        raise DailyError(f"{path} is damaged ({err}); restore it with `bahe-daily rollback --home {home} --to DAY` "
                         "(the days published.jsonl lists)") from None


def read_published(home: Path) -> list[dict]:
    """HOME/published.jsonl checked line by line, oldest first."""
    path = Path(home) / "published.jsonl"
    try:
        text = _read_text(path)
    except RecordError as err:
        raise DailyError(f"{path} is damaged ({err}); it is the log of publishes and rollbacks") from None
    events = []
    for number, line in enumerate((text or "").splitlines(), 1):
        if not line.strip():
            continue
        try:
            events.append(check_event(home, _json(line)))
        except RecordError as err:
            raise DailyError(f"{path} line {number} is damaged ({err}); each line is one publish or rollback event "
                             "as bahe-daily wrote it: repair or delete that line (CURRENT is not affected)") from None
    return events


def read_day_record(home: Path, path: Path, day: str) -> dict:
    """HOME/runs/DAY/day.json checked; {} before the day's first attempt."""
    try:
        text = _read_text(path)
        return {} if text is None else check_day_record(home, _json(text))
    except RecordError as err:
        raise DailyError(f"{path} is damaged ({err}); it records day {day}'s inputs and finished steps: run the "
                         "day again with --restart to start it over (CURRENT and the store's versions stay as "
                         "they are)") from None


def differences(recorded: dict, now: dict) -> list[str]:
    """How two days' inputs (:func:`check_inputs` records) differ, each side named; [] when the same."""
    out = []
    for name in DAY_FILES:
        before, after = recorded["files"][name], now["files"][name]
        if before["sha256"] != after["sha256"]:
            out.append(f"{name}: day.json has {recorded['data']}/{name} (sha256 {before['sha256'][:12]}, "
                       f"{before['bytes']:,} bytes), this run {now['data']}/{name} (sha256 {after['sha256'][:12]}, "
                       f"{after['bytes']:,} bytes)")
    if recorded["train_flags"] != now["train_flags"]:
        out.append(f"train flags: day.json has -- {' '.join(recorded['train_flags'])}, this run -- "
                   f"{' '.join(now['train_flags'])}")
    return out


def day_inputs(data: Path, train_flags: list[str]) -> dict:
    """What a day is made of: its data files (folder, sha256, size) and the bahe-train flags after ``--``."""
    from bahe.embeddings.store import file_sha256

    files = {name: {"sha256": file_sha256(Path(data) / name), "bytes": (Path(data) / name).stat().st_size}
             for name in DAY_FILES}
    return {"data": str(Path(data).resolve()), "files": files, "train_flags": list(train_flags)}
