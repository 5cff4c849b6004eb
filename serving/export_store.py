"""The serving export on disk: versioned, checksummed, pickle-free, written atomically under a folder lock.

Layout (the behaviour store's, embeddings/store.py)::

    <out>/
      LATEST                 name of the newest complete version (replaced atomically)
      v000001/
        manifest.json        what produced it (run, checkpoint + its SHA-256, store, cut-off, data files),
                             shapes, counts, every file's SHA-256 and size, and manifest_sha256 over all of it
        items.parquet        store_id, text, feature (D float32), computed_in
        users.parquet        user_id, as_of, behaviours_<name> (store ids, oldest first) per sequence type,
                             features (N x D float32, row-major), computed_in
        predictor.pt         the TorchScript predictor (fp32 ID tables; predictor_int8.pt with int8 ones)
      v000002/ ...           a refresh: unchanged rows copied from its parent, the rest recomputed
      .work/                 unfinished versions; never read
      .lock                  held by the export writing the folder (embeddings/folder_lock.py)

A version appears under its real name only when complete, and LATEST moves only after that, so a
crash leaves the previous version intact and current. Opening a version checks the manifest's digest
and every file's SHA-256; a file that is a link out of the folder is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bahe.embeddings.store import (
    MANIFEST_DIGEST,
    StoreError,
    file_sha256,
    inside,
    manifest_digest,
    version_name,
    write_text_atomic,
)

FORMAT = "bahe-serving-export/1"
MANIFEST, LATEST, WORK = "manifest.json", "LATEST", ".work"
ITEMS, USERS = "items.parquet", "users.parquet"
PREDICTOR = {"fp32": "predictor.pt", "fp16": "predictor_fp16.pt", "int8": "predictor_int8.pt"}
BUSY = "export folder {folder} is being written by {holder}; wait for it to finish or export into another --out"


class ExportError(ValueError):
    """A serving export that is missing, damaged or incompatible; the message says what to do."""


def fixed_lists(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """R x K float32 -> a Parquet-ready fixed-size list column of K floats per row."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def matrix(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """A fixed-size list column back to R x width float32 (the bytes as written)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], pa.list_(pa.float32(), width))
    return np.array(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, width)  # writable


def jagged_lists(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.int64)))


def list_parts(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list<int64> column -> (offsets starting at 0, values)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], pa.list_(pa.int64()))
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.to_numpy(zero_copy_only=False).astype(np.int64)
    return offsets - offsets[0], values[offsets[0]:offsets[-1]]


def latest_version(root: Path) -> str | None:
    """The newest complete version of the export at ``root``, or None for a new folder."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    inside(pointer, root)
    name = pointer.read_text().strip()
    if not re.fullmatch(r"v\d{6}", name) or not (Path(root) / name / MANIFEST).is_file():
        raise ExportError(f"{pointer} names {name!r}, not a complete export version (vNNNNNN with a {MANIFEST}): "
                          "restore it, or delete LATEST to export everything afresh")
    return name


class ExportVersion:
    """One complete version of an export, opened read-only and verified: the manifest's digest and fields
    (:func:`check_manifest`), every file's SHA-256, links, and the rows of items.parquet and users.parquet
    (:func:`check_items`, :func:`check_users`: ids sorted, unique and complete, shapes the manifest's, every
    feature finite). The two tables are parsed from the very bytes whose checksum was verified and kept, so
    what is served or reused is what was verified.

    Example::

        export = ExportVersion.open("serving/ml")
        items = export.table("items.parquet")           # store_id, text, feature, computed_in
        export.item_matrix()                             # I x D float32
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        try:
            for name in ("", MANIFEST):
                inside(self.path / name, self.path.parent)
            self.manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as err:
            raise ExportError(f"{manifest_path} cannot be read ({err}); restore the version or export afresh "
                              "into another --out") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            found = self.manifest.get("format") if isinstance(self.manifest, dict) else type(self.manifest).__name__
            raise ExportError(f"{manifest_path}: format {found!r}, expected {FORMAT!r}; is this a bahe-export folder?")
        if self.manifest.get(MANIFEST_DIGEST) != manifest_digest(self.manifest):
            raise ExportError(f"{manifest_path} was changed after the export was written (its {MANIFEST_DIGEST} does "
                              "not match its contents); restore the file or export afresh into another --out")
        check_manifest(self.manifest, manifest_path)
        self._tables: dict[str, pa.Table] = {}
        for name in self.manifest["files"]:
            if name in (ITEMS, USERS):
                self._tables[name] = self._parse(name, self.verified_bytes(name))
            else:
                self._verify(name)
        check_items(self._tables[ITEMS], self.manifest, self.path / ITEMS)
        check_users(self._tables[USERS], self.manifest, self.path / USERS)

    def _file(self, name: str) -> Path:
        try:
            return inside(self.path / name, self.path.parent)
        except StoreError as err:
            raise ExportError(str(err).replace("store", "export")) from None

    def _unreadable(self, name: str, err: OSError) -> ExportError:
        return ExportError(f"{self.path / name} cannot be read ({err.strerror or err}); restore it or export afresh "
                           "into another --out")

    def _compare(self, name: str, actual: str) -> None:
        expected = self.manifest["files"][name]["sha256"]
        if actual != expected:
            raise ExportError(f"{self.path / name}: checksum {actual[:12]}... does not match the manifest's "
                              f"{expected[:12]}...; the file changed after the export was written: restore "
                              "it, or export afresh into another --out")

    def _verify(self, name: str) -> None:
        try:
            actual = file_sha256(self._file(name))
        except OSError as err:
            raise self._unreadable(name, err) from None
        self._compare(name, actual)

    def verified_bytes(self, name: str) -> bytes:
        """The bytes of one of the version's files, read now and checked against the manifest's SHA-256 (what a
        refresh reuses, e.g. the predictor, is what the manifest signed, whatever happened to the file since the
        version was opened)."""
        try:
            data = self._file(name).read_bytes()
        except OSError as err:
            raise self._unreadable(name, err) from None
        self._compare(name, hashlib.sha256(data).hexdigest())
        return data

    def _parse(self, name: str, data: bytes) -> pa.Table:
        try:
            return pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError, ValueError) as err:
            raise ExportError(f"{self.path / name} is not a readable Parquet file ({err}); restore the version or "
                              "export afresh into another --out") from None

    @classmethod
    def open(cls, root: str | os.PathLike, version: str | None = None) -> ExportVersion:
        root = Path(root)
        version = version or latest_version(root)
        if version is None:
            raise ExportError(f"{root} holds no export (no {LATEST}); write one with bahe-export")
        return cls(root / version)

    @property
    def version(self) -> str:
        return self.path.name

    def table(self, name: str) -> pa.Table:
        """items.parquet / users.parquet as verified when the version was opened (other files: read now)."""
        return self._tables[name] if name in self._tables else pq.read_table(self.path / name)

    def item_matrix(self) -> np.ndarray:
        """I x D item text features, in items.parquet's row order (store ids ascending)."""
        return matrix(self.table(ITEMS).column("feature"), int(self.manifest["embedding_dim"]))

    def user_matrix(self) -> np.ndarray:
        """U x N x D user text features, in users.parquet's row order (user ids ascending)."""
        n, d = len(self.manifest["sequence_keys"]), int(self.manifest["embedding_dim"])
        return matrix(self.table(USERS).column("features"), n * d).reshape(-1, n, d)


# -- the manifest's and the tables' one validation layer (every reader opens an ExportVersion) ------------------

FIX = "restore the version, or export afresh into another --out (bahe-export)"
SHA256 = re.compile(r"[0-9a-f]{64}")
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
VERSION = re.compile(r"v\d{6}")
INT64 = (-(2**63), 2**63 - 1)


def check_manifest(manifest: dict, path: Path) -> None:
    """Every field a reader of the export uses, of its type and within its bound; raises ExportError in one line
    naming ``path`` (the manifest), the field and what it must be. Runs after the digest check: a manifest
    edited and re-digested is still held to its shapes."""
    from bahe.training.record_checks import (
        MAX_BEHAVIOURS,
        MAX_STORE_ROWS,
        MAX_TABLE_ROWS,
        MAX_WIDTH,
        RecordCheck,
        check_store_record,
    )

    check = RecordCheck(path, FIX, ExportError)
    for key, pattern, none in (("version", VERSION, False), ("parent", VERSION, True)):
        value = check.text(key, manifest.get(key), none=none)
        if value is not None and not pattern.fullmatch(value):
            check.fail(key, value, "a version name vNNNNNN" + (" or null" if none else ""))
    files = check.section("files", manifest.get("files"))
    for name, meta in files.items():
        if not FILE_NAME.fullmatch(name):
            check.fail("files", name, "plain file names of the version folder")
        check.section(f"files.{name}", meta)
        if not isinstance(meta.get("sha256"), str) or not SHA256.fullmatch(meta["sha256"]):
            check.fail(f"files.{name}.sha256", meta.get("sha256"), "a SHA-256 (64 hex digits)")
        check.whole(f"files.{name}.bytes", meta.get("bytes"), 0, INT64[1])
    for name in (ITEMS, USERS, PREDICTOR["fp32"]):
        if name not in files:
            check.fail("files", sorted(files), f"a list naming {name}")
    keys = check.texts("sequence_keys", manifest.get("sequence_keys"))
    if not keys or len(set(keys)) != len(keys) or len(keys) > 64:
        check.fail("sequence_keys", keys, "1 to 64 distinct sequence keys")
    dim = check.whole("embedding_dim", manifest.get("embedding_dim"), 1, MAX_WIDTH)
    check.whole("max_behaviours", manifest.get("max_behaviours"), 1, MAX_BEHAVIOURS)
    check.texts("dense_columns", manifest.get("dense_columns"))
    features = check.texts("id_features", manifest.get("id_features"))
    rows = check.items("table_rows", manifest.get("table_rows"))
    if len(rows) != len(features):
        check.fail("table_rows", rows, f"{len(features)} table sizes, one per id_features entry")
    for i, value in enumerate(rows):
        check.whole(f"table_rows[{i}]", value, 1, MAX_TABLE_ROWS)
    empty = check.numbers("empty_user_features", manifest.get("empty_user_features"))
    if len(empty) != len(keys) * dim:
        check.fail("empty_user_features", f"{len(empty)} numbers", f"N x D = {len(keys)} x {dim} = "
                   f"{len(keys) * dim} finite numbers")
    producer = check.section("producer", manifest.get("producer"))
    for key in ("run", "checkpoint"):
        check.text(f"producer.{key}", producer.get(key))
    if not isinstance(producer.get("checkpoint_sha256"), str) or not SHA256.fullmatch(producer["checkpoint_sha256"]):
        check.fail("producer.checkpoint_sha256", producer.get("checkpoint_sha256"), "a SHA-256 (64 hex digits)")
    check_store_record(check, "store", manifest.get("store"))
    if manifest.get("store") is None:
        check.fail("store", None, "the store's record")
    check.whole("as_of", manifest.get("as_of"), *INT64, none=True)
    for table in ("items", "users"):
        counts = check.section(table, manifest.get(table))
        check.whole(f"{table}.total", counts.get("total"), 0, MAX_STORE_ROWS)
    if manifest["items"]["total"] != manifest["store"]["rows"]:
        check.fail("items.total", manifest["items"]["total"], f"the store's rows ({manifest['store']['rows']:,}): "
                   "one item row per store row")


def _column(table: pa.Table, name: str, expected, path: Path) -> pa.Array:
    """Column ``name`` of ``table``, of the ``expected`` type (an Arrow type, or a predicate and its description),
    without nulls, as one array."""
    valid, shown = (expected, None) if callable(expected) else (lambda t: t == expected, str(expected))
    if name not in table.column_names:
        raise ExportError(f"{path}: no column {name!r} (it has {table.column_names}); {FIX}")
    column = table.column(name)
    if not valid(column.type):
        raise ExportError(f"{path}: column {name!r} is {column.type}, expected {shown or valid.__doc__}; {FIX}")
    column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise ExportError(f"{path}: row {row}: {name} is null; {FIX}")
    return column


def _features(table: pa.Table, name: str, width: int, path: Path, ids: np.ndarray, id_name: str) -> None:
    """A fixed-size list column of ``width`` float32 per row, every value finite."""
    def fits(t) -> bool:
        return pa.types.is_fixed_size_list(t) and t.list_size == width and t.value_type == pa.float32()

    fits.__doc__ = f"fixed_size_list<float>[{width}] (the manifest's shape)"
    column = _column(table, name, fits, path)
    values = column.flatten()
    if values.null_count:
        row = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]) // width
        raise ExportError(f"{path}: row {row} ({id_name} {ids[row]}): {name} holds a null; {FIX}")
    bad = np.flatnonzero(~np.isfinite(values.to_numpy(zero_copy_only=False)))
    if len(bad):
        row = int(bad[0]) // width
        value = values[int(bad[0])].as_py()
        raise ExportError(f"{path}: row {row} ({id_name} {ids[row]}): {name} holds {value}, not a finite number "
                          f"({len(np.unique(bad // width)):,} row(s) so); the text features are broken: {FIX}")


def check_items(table: pa.Table, manifest: dict, path: Path) -> None:
    """items.parquet: one row per store row, store ids 0, 1, 2, ... (sorted, unique, complete), D finite float32
    features per row."""
    ids = _column(table, "store_id", pa.int64(), path).to_numpy()
    _column(table, "text", pa.string(), path)
    _column(table, "computed_in", pa.string(), path)
    total = manifest["items"]["total"]
    if len(ids) != total:
        raise ExportError(f"{path} has {len(ids):,} rows, the manifest {total:,} (one per store row): the file is "
                          f"short or long; {FIX}")
    wrong = np.flatnonzero(ids != np.arange(len(ids)))
    if len(wrong):
        row = int(wrong[0])
        raise ExportError(f"{path}: row {row}: store_id {ids[row]}, expected {row} (store ids must run 0, 1, 2, ... "
                          f"one row each: sorted, unique, complete); {FIX}")
    _features(table, "feature", int(manifest["embedding_dim"]), path, ids, "store_id")


def _int64_lists(t) -> bool:
    """list<int64>"""
    return pa.types.is_list(t) and t.value_type == pa.int64()


def check_users(table: pa.Table, manifest: dict, path: Path) -> None:
    """users.parquet: user ids strictly ascending (sorted, unique), as many rows as the manifest counts, N x D
    finite float32 features per row, the behaviours' store ids within the store."""
    from bahe.serving.features import sequence_name

    ids = _column(table, "user_id", pa.int64(), path).to_numpy()
    _column(table, "as_of", pa.int64(), path)
    _column(table, "computed_in", pa.string(), path)
    total = manifest["users"]["total"]
    if len(ids) != total:
        raise ExportError(f"{path} has {len(ids):,} rows, the manifest {total:,}: the file is short or long; {FIX}")
    wrong = np.flatnonzero(ids[1:] <= ids[:-1])
    if len(wrong):
        row = int(wrong[0]) + 1
        what = "a duplicate of the row before" if ids[row] == ids[row - 1] else f"after {ids[row - 1]}"
        raise ExportError(f"{path}: row {row}: user_id {ids[row]} is {what} (user ids must be sorted and unique: "
                          f"served features are looked up by binary search); {FIX}")
    keys, dim = manifest["sequence_keys"], int(manifest["embedding_dim"])
    rows = manifest["store"]["rows"]
    for key in keys:
        name = "behaviours_" + sequence_name(key)
        column = _column(table, name, _int64_lists, path)
        values = column.flatten().to_numpy(zero_copy_only=False)
        bad = np.flatnonzero((values < 0) | (values >= rows))
        if len(bad):
            offsets = column.offsets.to_numpy()
            row = int(np.searchsorted(offsets, bad[0] + offsets[0], side="right")) - 1
            raise ExportError(f"{path}: row {row} (user_id {ids[row]}): {name} holds store id {values[bad[0]]}, "
                              f"outside the store's {rows:,} rows; {FIX}")
    _features(table, "features", len(keys) * dim, path, ids, "user_id")


def publish(root: Path, manifest: dict, tables: dict[str, pa.Table], blobs: dict[str, bytes]) -> Path:
    """Write the next version of ``root`` (the caller holds the folder lock): files under ``.work/``, the manifest
    with every file's checksum and its own digest, then the folder renamed into place and LATEST moved."""
    root = Path(root)
    parent = latest_version(root)
    name = version_name(int(parent[1:]) + 1 if parent else 1)
    work = root / WORK / f"{name}.{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        for file, table in tables.items():
            pq.write_table(table, work / file)
        for file, data in blobs.items():
            (work / file).write_bytes(data)
        files = {file: {"sha256": file_sha256(work / file), "bytes": (work / file).stat().st_size}
                 for file in sorted([*tables, *blobs])}
        body = {**manifest, "format": FORMAT, "version": name, "parent": parent, "files": files}
        body[MANIFEST_DIGEST] = manifest_digest(body)
        (work / MANIFEST).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
        for path in work.iterdir():  # durable before the rename makes them current
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(work, root / name)
        write_text_atomic(root / LATEST, name + "\n")
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
        with contextlib.suppress(OSError, ExportError):
            if latest_version(root) != name:  # never a complete version that LATEST does not name
                shutil.rmtree(root / name, ignore_errors=True)
        raise
    return root / name
