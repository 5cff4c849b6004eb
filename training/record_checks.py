"""A run record's (``run_config.json``) fields checked before anything is built: every reader goes through
:func:`check_record` (via ``run_record.read_record``), and the serving export's manifest through
:class:`RecordCheck` too. Each refusal is one line naming the file, the field, the value and the bound."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bahe.model.config import (
    MAX_BEHAVIOURS,
    MAX_LAYERS,
    MAX_LLM_LAYERS,
    MAX_TABLE_ROWS,
    MAX_USER_TOKENS,
    MAX_WIDTH,
)


class RunConfigError(ValueError):
    """A run folder's checkpoint was trained with other model flags (or its record is damaged)."""


# Bounds of a run record's numbers: the model's own (model/config.py, which bahe-train enforces when it builds
# the model, so a record it writes always reads back) and those of the rest of the record
MAX_BATCH = 2**24
MAX_LANES = 2**16
MAX_STORE_ROWS = 2**40
MAX_STORE_DIM = 2**16
MAX_STEP = 2**62


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


class RecordCheck:
    """Checks a JSON record's fields, each refused in one line naming the file, the field, the value and the
    bound (or the allowed values), and what to do. Shared by the run record and the serving export's manifest
    (serving/export_store.py, whose ``store`` section is a run record's)."""

    def __init__(self, path: Path, fix: str, error: type[Exception] = RunConfigError):
        self.path, self.fix, self.error = path, fix, error

    def fail(self, where: str, value, expected: str):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise self.error(f"{self.path}: {where} is {shown}, expected {expected}; {self.fix}")

    def whole(self, where: str, value, low: int, high: int, *, none: bool = False):
        if value is None and none:
            return value
        if not _is_whole(value):
            self.fail(where, value, f"an integer in [{low:,}, {high:,}]" + (" or null" if none else ""))
        if not low <= value <= high:
            self.fail(where, value, f"an integer in [{low:,}, {high:,}]")
        return value

    def choice(self, where: str, value, choices, *, none: bool = False):
        if (value is None and none) or (isinstance(value, str) and value in choices):
            return value
        self.fail(where, value, f"one of {sorted(choices)}" + (" or null" if none else ""))

    def text(self, where: str, value, *, none: bool = False):
        if (value is None and none) or isinstance(value, str):
            return value
        self.fail(where, value, "a string" + (" or null" if none else ""))

    def flag(self, where: str, value):
        if isinstance(value, bool):
            return value
        self.fail(where, value, "true or false")

    def section(self, where: str, value, *, none: bool = False) -> dict | None:
        if (value is None and none) or isinstance(value, dict):
            return value
        self.fail(where, value, "an object" + (" or null" if none else ""))

    def items(self, where: str, value, most: int = 1 << 20) -> list:
        if not isinstance(value, list) or len(value) > most:
            self.fail(where, value, f"a list (of at most {most:,} entries)")
        return value

    def texts(self, where: str, value) -> list[str]:
        for i, item in enumerate(self.items(where, value)):
            self.text(f"{where}[{i}]", item)
        return value

    def numbers(self, where: str, value, *, positive: bool = False) -> list:
        for i, item in enumerate(self.items(where, value)):
            if not _is_number(item) or (positive and item <= 0):
                self.fail(f"{where}[{i}]", item, "a finite number" + (" > 0" if positive else ""))
        return value


def check_store_record(check: RecordCheck, where: str, store) -> None:
    """A recorded behaviour store (:func:`store_record`: a run's ``store``, an export manifest's ``store``)."""
    if check.section(where, store, none=True) is None:
        return
    # the rows' digests: from the manifest's per-chunk checksums, or (a store written before them) read
    digests = ("texts_digest", "vectors_digest") if "vectors_digest" in store else ("texts_sha256", "rows_sample_sha256")
    for key in ("root", "version", "llm", "llm_sha256", *digests):
        check.text(f"{where}.{key}", store.get(key))
    check.whole(f"{where}.k", store.get("k"), 1, MAX_LLM_LAYERS)
    check.whole(f"{where}.dim", store.get("dim"), 1, MAX_STORE_DIM)
    check.whole(f"{where}.rows", store.get("rows"), 0, MAX_STORE_ROWS)
    if "encoder" in store:
        check.section(f"{where}.encoder", store["encoder"])


def check_record(record: dict, path: Path) -> None:
    """Every field of a run record that is present, of its type and within its bound (absent ones read as
    their defaults where readers allow it): the model flags, the defaults, the data order, the dense
    statistics, the store, where the weights started. Raises :class:`RunConfigError` in one line."""
    from bahe.model.deep_layers import ATTENTIONS, POOLINGS
    from bahe.model.text_levers import USER_AGGREGATIONS, USER_PROJECTIONS

    check = RecordCheck(path, "restore the file from the run (bahe-train rewrites it beside each checkpoint), "
                        "or retrain with valid flags")
    model = record["model"]
    values = {
        "--arm": lambda w, v: check.choice(w, v, ("bahe", "token_level", "dlrm")),
        "--embedding-dim": lambda w, v: check.whole(w, v, 1, MAX_WIDTH),
        "--table-rows": lambda w, v: check.whole(w, v, 1, MAX_TABLE_ROWS),
        "--table-rows-for": _check_rows_for(check),
        "--drop-id-features": check.texts,
        "--dense-arch": _check_layers(check),
        "--over-arch": _check_layers(check),
        "--no-dense-standardize": check.flag,
        "--k": lambda w, v: check.whole(w, v, 1, MAX_LLM_LAYERS, none=True),
        "--deep-layers": lambda w, v: check.whole(w, v, 1, MAX_LLM_LAYERS, none=True),
        "--pooling": lambda w, v: check.choice(w, v, POOLINGS, none=True),
        "--attention": lambda w, v: check.choice(w, v, ATTENTIONS, none=True),
        "--max-behaviours": lambda w, v: check.whole(w, v, 1, MAX_BEHAVIOURS, none=True),
        "--max-user-tokens": lambda w, v: check.whole(w, v, 1, MAX_USER_TOKENS, none=True),
        "--user-projection": lambda w, v: check.choice(w, v, USER_PROJECTIONS, none=True),
        "--user-aggregation": lambda w, v: check.choice(w, v, USER_AGGREGATIONS, none=True),
    }
    for flag, valid in values.items():
        if flag in model:
            valid(f"model.{flag}", model[flag])
    defaults = record.get("defaults", {})
    for flag in ("--store", "--llm", "--data-dir"):
        if flag in defaults:
            check.text(f"defaults.{flag}", defaults[flag], none=True)
    if "--batch-size" in defaults:
        check.whole("defaults.--batch-size", defaults["--batch-size"], 1, MAX_BATCH, none=True)
    if "stream" in record and check.section("stream", record["stream"]).get("--data-lanes") is not None:
        check.whole("stream.--data-lanes", record["stream"]["--data-lanes"], 1, MAX_LANES)
    statistics = check.section("dense_statistics", record.get("dense_statistics"), none=True)
    if statistics:
        columns = check.texts("dense_statistics.columns", statistics.get("columns"))
        for key in ("mean", "std"):
            numbers = check.numbers(f"dense_statistics.{key}", statistics.get(key), positive=key == "std")
            if len(numbers) != len(columns):
                check.fail(f"dense_statistics.{key}", numbers, f"{len(columns)} numbers, one per column")
    check_store_record(check, "store", record.get("store"))
    for name in ("initialized_from", "frozen_text_from"):
        source = check.section(name, record.get(name), none=True)
        if source is not None:
            check.text(f"{name}.run", source.get("run"))
            check.text(f"{name}.checkpoint", source.get("checkpoint"))
            check.whole(f"{name}.step", source.get("step"), 0, MAX_STEP)


def _check_layers(check: RecordCheck):
    def valid(where: str, value) -> None:
        for i, size in enumerate(check.items(where, value, MAX_LAYERS)):
            check.whole(f"{where}[{i}]", size, 1, MAX_WIDTH)
    return valid


def _check_rows_for(check: RecordCheck):
    def valid(where: str, value) -> None:
        for i, pair in enumerate(check.texts(where, value)):
            name, _, rows = pair.partition("=")
            if not name or not rows.isdigit() or len(rows) > 20 or not 1 <= int(rows) <= MAX_TABLE_ROWS:
                check.fail(f"{where}[{i}]", pair, f"FEATURE=ROWS with ROWS an integer in [1, {MAX_TABLE_ROWS:,}] "
                           "(the bound of a table's rows)")
    return valid
