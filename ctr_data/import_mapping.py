"""The mapping of a team's own log columns onto the sample schema, for ``bahe-data import``.

A mapping is a small TOML file (or the same keys as ``bahe-data import`` flags); docs/byo_data.md lists
every key, and examples/byo_data/mapping.toml uses most of them::

    hash_ids = ["user_id"]            # ids given as texts, hashed (default: ids are integers >= 0)
    [input]                           # the impressions: one row per (user, item) shown
    files = ["impressions.csv"]       # csv | jsonl | parquet, from the extension or format = ...
    [columns]                         # user_id, item_id, label, timestamp, item_text (or an [items] table)
    [items]                           # files, item_id, text: titles by item id
    [dense] / [categorical]           # name = "column", or { column = ..., fill = ... / sep = ... }
    [sequences.NAME]                  # column = ... (a list column), or events = ... (an event table)
    [split]                           # fractions = [...], cuts = [T1, T2] or column = "..."; cold_share, seed

Every check runs when the mapping is built, and its error names the key and says what to change.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bahe.ctr_data.item_cold import split_problem
from bahe.ctr_data.schema import SampleSchema

SPLITS = ("train", "valid", "test")
FORMATS = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
           ".parquet": "parquet", ".pq": "parquet"}
ID_COLUMNS = ("user_id", "item_id")
DEFAULT_MAX_LENGTH = 50
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class MappingError(ValueError):
    """A mapping that cannot work: the message names the key and says what to change."""


def _fail(where: str, message: str) -> MappingError:
    return MappingError(f"{where}: {message}" if where else message)


@dataclass(frozen=True)
class Source:
    """Files of one table, read in the order given, all in one format."""

    paths: tuple[Path, ...]
    format: str = ""  # "" = from the first file's extension
    delimiter: str = ","
    where: str = "[input]"

    def __post_init__(self) -> None:
        paths = tuple(Path(p) for p in self.paths)
        object.__setattr__(self, "paths", paths)
        if not paths:
            raise _fail(self.where, "files is empty: name at least one file")
        fmt = self.format or FORMATS.get(paths[0].suffix.lower(), "")
        if fmt not in ("csv", "jsonl", "parquet"):
            raise _fail(self.where, f"cannot tell the format of {paths[0]} from its extension: give format = "
                        "\"csv\", \"jsonl\" or \"parquet\"" if not self.format else
                        f"format {self.format!r} is not one of csv, jsonl, parquet")
        object.__setattr__(self, "format", fmt)
        if fmt == "csv" and len(self.delimiter) != 1:
            raise _fail(self.where, f"delimiter must be one character, got {self.delimiter!r}")


@dataclass(frozen=True)
class Items:
    source: Source
    item_id: str
    text: str


@dataclass(frozen=True)
class Dense:
    name: str
    column: str
    fill: float | None = None

    def __post_init__(self) -> None:
        if self.fill is not None and not math.isfinite(self.fill):
            raise _fail(f"[dense] {self.name}", f"fill must be a finite number, got {self.fill}")


@dataclass(frozen=True)
class Categorical:
    name: str
    column: str
    sep: str | None = None


@dataclass(frozen=True)
class ListSequence:
    """A behaviour sequence from a list column of the impression row itself."""

    name: str
    column: str
    sep: str | None = None
    newest_first: bool = False
    max_length: int = DEFAULT_MAX_LENGTH


@dataclass(frozen=True)
class EventSequence:
    """A behaviour sequence from an event table: the user's events strictly before the row's time, at most
    ``window`` earlier (None: any), the ``max_length`` most recent, oldest first."""

    name: str
    source: Source
    user_id: str
    timestamp: str
    text: str | None = None
    item_id: str | None = None
    where: tuple[tuple[str, tuple[str, ...]], ...] = ()
    window: int | None = None
    max_length: int = DEFAULT_MAX_LENGTH

    def __post_init__(self) -> None:
        at = f"[sequences.{self.name}]"
        if (self.text is None) == (self.item_id is None):
            raise _fail(at, "give exactly one of text = \"<the events' text column>\" or item_id = \"<the events' "
                        "item column>\" (its title comes from [items])")
        if self.window is not None and self.window <= 0:
            raise _fail(at, f"window must be a positive number of timestamp units, got {self.window}; leave it out "
                        "for no window")


@dataclass(frozen=True)
class Split:
    fractions: tuple[float, float, float] | None = None
    cuts: tuple[int, int] | None = None
    column: str | None = None
    cold_share: float | None = None  # item_cold: this share of the items never in train (ctr_data/item_cold.py)
    seed: int = 0  # item_cold: which items

    def __post_init__(self) -> None:
        if self.cold_share is not None and split_problem(self.cold_share, self.column):
            raise _fail("[split]", split_problem(self.cold_share, self.column))
        given = [k for k in ("fractions", "cuts", "column") if getattr(self, k) is not None]
        if len(given) > 1:
            raise _fail("[split]", f"give one of fractions, cuts or column, not {' and '.join(given)}")
        if not given:
            object.__setattr__(self, "fractions", (0.8, 0.1, 0.1))
        if self.fractions is not None:
            f = tuple(float(x) for x in self.fractions)
            if len(f) != 3 or any(x <= 0 for x in f) or not math.isclose(sum(f), 1.0):
                raise _fail("[split]", f"fractions must be three positive numbers summing to 1 (train, valid, "
                            f"test), got {list(self.fractions)}")
            object.__setattr__(self, "fractions", f)
        if self.cuts is not None and (len(self.cuts) != 2 or not self.cuts[0] < self.cuts[1]):
            raise _fail("[split]", f"cuts must be two timestamps T1 < T2 (train before T1, valid before T2, test "
                        f"from T2), got {list(self.cuts)}")

    @property
    def by(self) -> str:
        return "column" if self.column is not None else "cuts" if self.cuts is not None else "fractions"


@dataclass(frozen=True)
class ImportMapping:
    """How a team's impressions (and optional item and event tables) become sample files."""

    input: Source
    user_id: str
    item_id: str
    label: str
    timestamp: str
    item_text: str | None = None
    items: Items | None = None
    dense: tuple[Dense, ...] = ()
    categorical: tuple[Categorical, ...] = ()
    sequences: tuple[ListSequence | EventSequence, ...] = ()
    split: Split = Split()
    hash_ids: tuple[str, ...] = ()
    dataset: str = "imported"
    batch_rows: int = 65_536

    def __post_init__(self) -> None:
        for kind, specs in (("dense", self.dense), ("categorical", self.categorical), ("sequences", self.sequences)):
            names = [s.name for s in specs]
            for name in names:
                if not _NAME.match(name):
                    raise _fail(f"[{kind}] {name}", "a feature name must be lower-case letters, digits and "
                                f"underscores, starting with a letter: rename it (e.g. {_suggest(name)!r})")
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise _fail(f"[{kind}]", f"{twice} named twice: give each feature its own name")
        bad = [h for h in self.hash_ids if h not in ID_COLUMNS]
        if bad:
            raise _fail("hash_ids", f"{bad} are not id columns; it takes {list(ID_COLUMNS)}")
        if self.item_text is None and self.items is None:
            raise _fail("[columns]", "no item title: give item_text = \"<the title column>\", or an [items] table "
                        "(files, item_id, text) to look titles up by item id")
        for seq in self.sequences:
            at = f"[sequences.{seq.name}]"
            if isinstance(seq, EventSequence) and seq.item_id is not None and self.items is None:
                raise _fail(at, "item_id takes the event's text from the [items] table, which is missing: add "
                            "[items], or give text = \"<the events' text column>\"")
            if isinstance(seq, ListSequence) and self.input.format == "csv" and seq.sep is None:
                raise _fail(at, f"a CSV cell is one text: give sep = \"|\" (the separator between the texts of "
                            f"column {seq.column!r})")
            if seq.max_length <= 0:
                raise _fail(at, f"max_length must be a positive integer, got {seq.max_length}")
        if self.batch_rows <= 0:
            raise _fail("batch_rows", f"must be a positive integer, got {self.batch_rows}")
        if not self.dataset:
            raise _fail("dataset", "must not be empty")

    @property
    def ordered(self) -> bool:
        """Whether the impressions must be in time order: for a join with an event table, or a split by
        fractions (the cut rows are found by counting)."""
        return self.split.by == "fractions" or any(isinstance(s, EventSequence) for s in self.sequences)

    def schema(self) -> SampleSchema:
        return SampleSchema(categorical=tuple(c.name for c in self.categorical), dense=tuple(d.name for d in self.dense),
                            sequences=tuple(s.name for s in self.sequences), dataset=self.dataset,
                            extra={"imported": {"split": self.split.by, "hash_ids": list(self.hash_ids),
                                                "sequences": {s.name: {"from": "events" if isinstance(s, EventSequence)
                                                                       else "column", "max_length": s.max_length,
                                                                       "window": getattr(s, "window", None)}
                                                              for s in self.sequences}}})

    def source_columns(self) -> dict[str, str]:
        """Sample column -> the impressions' column it comes from (for error messages)."""
        out = {"user_id": self.user_id, "item_id": self.item_id, "label": self.label, "timestamp": self.timestamp,
               "item_text": self.item_text or self.item_id}
        out.update({f"dense_{d.name}": d.column for d in self.dense})
        out.update({f"cat_{c.name}": c.column for c in self.categorical})
        out.update({f"seq_{s.name}": s.column for s in self.sequences if isinstance(s, ListSequence)})
        return out


def _suggest(name: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9_]", "_", name.lower())).strip("_") or "feature"


# Reading a TOML mapping (and flags in the same shape) ------------------------------------------------------

_TOP = {"dataset", "hash_ids", "batch_rows", "input", "columns", "items", "dense", "categorical", "sequences", "split"}
_SOURCE = {"files", "format", "delimiter"}
_KEYS = {
    "input": _SOURCE,
    "columns": {"user_id", "item_id", "label", "timestamp", "item_text"},
    "items": _SOURCE | {"item_id", "text"},
    "split": {"fractions", "cuts", "column", "cold_share", "seed"},
    "list": {"column", "sep", "order", "max_length"},
    "events": {"events", "format", "delimiter", "user_id", "timestamp", "text", "item_id", "where", "window",
               "max_length"},
}


def _known(table: Mapping, keys: set[str], where: str) -> None:
    for key in table:
        if key not in keys:
            close = difflib.get_close_matches(key, sorted(keys), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _fail(where, f"unknown key {key!r}{hint}; it takes {sorted(keys)}")


def _get(table: Mapping, key: str, kind: type | tuple, where: str, required: bool = False) -> Any:
    if key not in table:
        if required:
            raise _fail(where, f"{key} is missing: give {key} = <{_KIND_NAMES.get(kind, 'a value')}>")
        return None
    value = table[key]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise _fail(where, f"{key} must be {_KIND_NAMES.get(kind, kind)}, got {value!r}")
    return value


_KIND_NAMES = {str: "a text (a column name)", int: "an integer", list: "a list", dict: "a table",
               (int, float): "a number", (str, list): "a file name or a list of file names"}


def _source(table: Mapping, where: str, files_key: str = "files") -> Source:
    files = _get(table, files_key, (str, list), where, required=True)
    files = [files] if isinstance(files, str) else files
    if not all(isinstance(f, (str, Path)) for f in files):
        raise _fail(where, f"{files_key} must be file names, got {files!r}")
    return Source(tuple(Path(f) for f in files), _get(table, "format", str, where) or "",
                  _get(table, "delimiter", str, where) or ",", where)


def _feature(name: str, value: Any, section: str, extra: str) -> dict:
    if isinstance(value, str):
        return {"column": value}
    if isinstance(value, dict):
        _known(value, {"column", extra}, f"[{section}] {name}")
        value = dict(value)
        value.setdefault("column", name)
        return value
    raise _fail(f"[{section}] {name}", f"must be a column name or {{ column = ..., {extra} = ... }}, got {value!r}")


def _sequence(name: str, table: Any) -> ListSequence | EventSequence:
    at = f"[sequences.{name}]"
    if not isinstance(table, dict):
        raise _fail(at, f"must be a table with column = ... (a list column) or events = ... (an event table), "
                    f"got {table!r}")
    if ("column" in table) == ("events" in table):
        raise _fail(at, "give exactly one of column = \"<a list column of the impressions>\" or events = "
                    "\"<an event file>\"")
    max_length = _get(table, "max_length", int, at)
    max_length = DEFAULT_MAX_LENGTH if max_length is None else max_length
    if "column" in table:
        _known(table, _KEYS["list"], at)
        order = _get(table, "order", str, at) or "oldest_first"
        if order not in ("oldest_first", "newest_first"):
            raise _fail(at, f"order must be \"oldest_first\" or \"newest_first\", got {order!r}")
        return ListSequence(name, _get(table, "column", str, at), _get(table, "sep", str, at) or None,
                            order == "newest_first", max_length)
    _known(table, _KEYS["events"], at)
    where = _get(table, "where", dict, at) or {}
    filters = []
    for column, values in where.items():
        values = [values] if not isinstance(values, list) else values
        if not values or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
            raise _fail(at, f"where.{column} must be a text / integer or a list of them, got {where[column]!r}")
        filters.append((column, tuple(str(v) for v in values)))
    return EventSequence(name, _source(table, at, "events"), _get(table, "user_id", str, at, True),
                         _get(table, "timestamp", str, at, True), _get(table, "text", str, at),
                         _get(table, "item_id", str, at), tuple(filters), _get(table, "window", int, at), max_length)


def mapping_from_dict(raw: Mapping, where: str = "") -> ImportMapping:
    """An :class:`ImportMapping` from the TOML's tables (file names already resolved)."""
    try:
        _known(raw, _TOP, "the mapping's top level")
        if "input" not in raw:
            raise _fail("[input]", "missing: give [input] files = [\"<the impressions file>\"] (or --input)")
        for section in ("input", "columns", "items", "split", "dense", "categorical", "sequences"):
            if section in raw:
                if not isinstance(raw[section], dict):
                    raise _fail(f"[{section}]", f"must be a table, got {raw[section]!r}")
                if section in _KEYS:
                    _known(raw[section], _KEYS[section], f"[{section}]")
        columns = raw.get("columns", {})
        items = None
        if "items" in raw:
            t = raw["items"]
            items = Items(_source(t, "[items]"), _get(t, "item_id", str, "[items]", True),
                          _get(t, "text", str, "[items]", True))
        dense = tuple(Dense(n, **_feature(n, v, "dense", "fill")) for n, v in raw.get("dense", {}).items())
        categorical = tuple(Categorical(n, **_feature(n, v, "categorical", "sep"))
                            for n, v in raw.get("categorical", {}).items())
        sequences = tuple(_sequence(n, t) for n, t in raw.get("sequences", {}).items())
        s, at = raw.get("split", {}), "[split]"
        fractions, cuts = _get(s, "fractions", list, "[split]"), _get(s, "cuts", list, "[split]")
        for key, values in (("fractions", fractions), ("cuts", cuts)):
            kind = (int, float) if key == "fractions" else int
            if values is not None and not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
                raise _fail("[split]", f"{key} must be a list of {'numbers' if key == 'fractions' else 'integer timestamps'}, "
                            f"got {values!r}")
        split = Split(tuple(fractions) if fractions else None, tuple(cuts) if cuts else None, _get(s, "column", str, at),
                      _get(s, "cold_share", (int, float), at), _get(s, "seed", int, at) or 0)
        hash_ids = _get(raw, "hash_ids", list, "hash_ids") or []
        return ImportMapping(
            input=_source(raw["input"], "[input]"),
            user_id=_get(columns, "user_id", str, "[columns]", True), item_id=_get(columns, "item_id", str, "[columns]", True),
            label=_get(columns, "label", str, "[columns]", True), timestamp=_get(columns, "timestamp", str, "[columns]", True),
            item_text=_get(columns, "item_text", str, "[columns]"), items=items, dense=dense, categorical=categorical,
            sequences=sequences, split=split, hash_ids=tuple(hash_ids),
            **{k: v for k, v in (("dataset", _get(raw, "dataset", str, "dataset")),
                                 ("batch_rows", _get(raw, "batch_rows", int, "batch_rows"))) if v is not None})
    except MappingError as err:
        raise MappingError(f"mapping {where}: {err}" if where else f"mapping: {err}") from None


def _resolve(raw: dict, base: Path) -> dict:
    """File names of a TOML mapping, relative to its folder."""
    def files(value):
        if isinstance(value, str):
            return str(base / value)
        if isinstance(value, list):
            return [str(base / v) if isinstance(v, str) else v for v in value]
        return value

    raw = dict(raw)
    for section in ("input", "items"):
        if isinstance(raw.get(section), dict) and "files" in raw[section]:
            raw[section] = {**raw[section], "files": files(raw[section]["files"])}
    if isinstance(raw.get("sequences"), dict):
        raw["sequences"] = {n: ({**t, "events": files(t["events"])} if isinstance(t, dict) and "events" in t else t)
                            for n, t in raw["sequences"].items()}
    return raw


def merge(base: Mapping, overrides: Mapping) -> dict:
    """``overrides`` (the flags) over ``base`` (the TOML), table by table; an override None removes the key."""
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = {k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else value
    return out


def load_mapping(path: str | Path | None, overrides: Mapping | None = None) -> ImportMapping:
    """A mapping from a TOML file (None: from ``overrides`` only), with ``overrides`` (the flags' keys, in
    the TOML's shape, file names relative to the working folder) over it."""
    raw: dict = {}
    where = ""
    if path is not None:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        path = Path(path)
        where = str(path)
        try:
            with open(path, "rb") as handle:
                raw = _resolve(tomllib.load(handle), path.parent)
        except FileNotFoundError:
            raise MappingError(f"mapping {path}: no such file") from None
        except tomllib.TOMLDecodeError as err:
            raise MappingError(f"mapping {path}: not valid TOML ({err}); see docs/byo_data.md for the keys") from None
    return mapping_from_dict(merge(raw, overrides or {}), where)
