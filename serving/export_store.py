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
    """One complete version of an export, opened read-only and verified (digest, checksums, links).

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
        for name, meta in self.manifest["files"].items():
            try:
                actual = file_sha256(inside(self.path / name, self.path.parent))
            except StoreError as err:
                raise ExportError(str(err).replace("store", "export")) from None
            except OSError as err:
                raise ExportError(f"{self.path / name} cannot be read ({err.strerror or err}); restore it or export "
                                  "afresh into another --out") from None
            if actual != meta["sha256"]:
                raise ExportError(f"{self.path / name}: checksum {actual[:12]}... does not match the manifest's "
                                  f"{meta['sha256'][:12]}...; the file changed after the export was written: restore "
                                  "it, or export afresh (bahe-export --full)")

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
        return pq.read_table(self.path / name)

    def item_matrix(self) -> np.ndarray:
        """I x D item text features, in items.parquet's row order (store ids ascending)."""
        return matrix(self.table(ITEMS).column("feature"), int(self.manifest["embedding_dim"]))

    def user_matrix(self) -> np.ndarray:
        """U x N x D user text features, in users.parquet's row order (user ids ascending)."""
        n, d = len(self.manifest["sequence_keys"]), int(self.manifest["embedding_dim"])
        return matrix(self.table(USERS).column("features"), n * d).reshape(-1, n, d)


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
