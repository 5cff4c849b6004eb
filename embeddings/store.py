"""The behaviour embedding store on disk: versioned, checksummed, memory-mappable, pickle-free.

Layout::

    <root>/
      LATEST                  name of the newest complete version (replaced atomically)
      v000001/
        manifest.json         model identity and weights hash, k, pooling, dtype, dim, rows, parent, checksums
        vocab.parquet         id, text, count (bahe.embeddings.vocabulary)
        vectors.npy           rows x dim float32; row i is the vector of vocabulary id i
      v000002/ ...            a refresh: the rows of its parent, unchanged, then the new texts
      .work/                  unfinished builds (bahe.embeddings.build); never read as a store

A version directory appears under its real name only when complete, and ``LATEST`` moves only
after that, so a crash leaves the previous version intact and current.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bahe.embeddings.vocabulary import BehaviourVocabulary

FORMAT = "bahe-behaviour-store/1"
MANIFEST, VOCAB, VECTORS, LATEST = "manifest.json", "vocab.parquet", "vectors.npy", "LATEST"


class StoreError(ValueError):
    """A store that is missing, corrupt or built for another model / k / dim; says what to do."""


class StoreWriteError(StoreError):
    """Writing a store failed (a full disk, an unwritable folder): the message names the file and the
    reason, and says that the previous version is intact; the OSError is its ``__cause__``."""


def os_error_at(err: OSError, path: Path) -> OSError:
    """``err`` (same errno, hence the same OSError subclass) naming ``path``: a failed write() names no file."""
    if err.errno is None:
        return OSError(f"{path}: {err}")
    return OSError(err.errno, err.strerror or str(err), str(path))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_bytes_atomic(path: Path, data: bytes | memoryview) -> None:
    """Replace ``path`` with ``data`` atomically and durably (fsync): a failed write (an OSError naming
    ``path``) leaves the old file as it was and no partial file behind."""
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise os_error_at(err, path) from err


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`write_bytes_atomic` of ``text`` (UTF-8)."""
    write_bytes_atomic(path, text.encode())


def version_name(number: int) -> str:
    return f"v{number:06d}"


def check_version_name(name: str, source: object) -> str:
    """A version name is ``vNNNNNN``: anything else (``..``, a path) is refused, so a tampered LATEST or
    a --version flag cannot point the reader outside the store folder."""
    if not re.fullmatch(r"v\d{6}", name):
        raise StoreError(f"{source} names {name!r}, not a store version (vNNNNNN); restore LATEST or pass a version "
                         "listed by `bahe-encode info`")
    return name


def latest_version(root: Path) -> str | None:
    """The newest complete version of the store at ``root``, or None for an empty store."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    name = check_version_name(pointer.read_text().strip(), pointer)
    if not (Path(root) / name / MANIFEST).is_file():
        raise StoreError(f"{pointer} names {name!r}, which is not a complete version; restore it or delete LATEST")
    return name


@dataclass(frozen=True)
class Expected:
    """What a consumer of a store needs it to be (None = do not check)."""

    model_sha256: str | None = None
    k: int | None = None
    dim: int | None = None
    pooling: str | None = None


class BehaviourStore:
    """One version of a store, opened read-only.

    Rows are memory-mapped: :meth:`rows` reads only the requested range, so each rank of a sharded
    table loads only its shard.

    Example::

        store = BehaviourStore.open("stores/ml-100k")          # the LATEST version
        store.check(Expected(k=6, dim=576))                     # StoreError if built otherwise
        shard = store.rows(1000, 2000)                          # 1000 x 576 float32
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise StoreError(f"{self.path} is not a behaviour store version (no {MANIFEST}); build one with bahe-encode")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise StoreError(f"{manifest_path} is corrupt: {err}") from None
        if self.manifest.get("format") != FORMAT:
            raise StoreError(f"{manifest_path}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self.rows_count = int(self.manifest["rows"])
        self.dim = int(self.manifest["dim"])
        try:
            self._vectors = np.load(self.path / VECTORS, mmap_mode="r", allow_pickle=False)
        except ValueError as err:  # e.g. pickled objects: refused, never unpickled
            raise StoreError(f"{self.path / VECTORS} is not a plain float array ({err}); rebuild this version "
                             "with bahe-encode") from None
        if self._vectors.shape != (self.rows_count, self.dim) or self._vectors.dtype != np.float32:
            raise StoreError(f"{self.path / VECTORS} holds {self._vectors.shape} {self._vectors.dtype}, the manifest "
                             f"says ({self.rows_count}, {self.dim}) float32: the store is corrupt; rebuild it")
        self._vocab: BehaviourVocabulary | None = None

    @classmethod
    def open(cls, root: str | os.PathLike, version: str | None = None) -> BehaviourStore:
        """Open ``version`` (default: LATEST) of the store at ``root``."""
        root = Path(root)
        version = check_version_name(version, "the requested version") if version else latest_version(root)
        if version is None:
            raise StoreError(f"{root} holds no complete store version; build one with bahe-encode")
        return cls(root / version)

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def vocabulary(self) -> BehaviourVocabulary:
        if self._vocab is None:
            self._vocab = BehaviourVocabulary.load(self.path / VOCAB)
            if len(self._vocab) != self.rows_count:
                raise StoreError(f"{self.path}: vocabulary has {len(self._vocab)} texts for {self.rows_count} rows")
        return self._vocab

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a float32 array (copied out of the memory map)."""
        if not 0 <= start <= stop <= self.rows_count:
            raise StoreError(f"row range [{start}, {stop}) outside the store's {self.rows_count} rows")
        return np.array(self._vectors[start:stop])

    def check(self, expected: Expected) -> None:
        """Refuse a store built by another model, k, dim or pooling than the config names."""
        encoder, model = self.manifest["encoder"], self.manifest["model"]
        found = {"model_sha256": model["sha256"], "k": encoder["k"], "dim": self.dim, "pooling": encoder["pooling"]}
        wrong = [f"{key}: store has {found[key]!r}, config asks for {want!r}"
                 for key, want in vars(expected).items() if want is not None and found[key] != want]
        if wrong:
            raise StoreError(f"store {self.path} was built for another encoder ({'; '.join(wrong)}); rebuild it with "
                             f"bahe-encode for this config, or point the config at the matching store")

    def verify(self) -> None:
        """Recompute every file checksum (reads everything; for audits, not for each load)."""
        for name, meta in self.manifest["files"].items():
            actual = file_sha256(self.path / name)
            if actual != meta["sha256"]:
                raise StoreError(f"{self.path / name}: checksum {actual[:12]}... does not match the manifest's "
                                 f"{meta['sha256'][:12]}...; the file changed after the store was written")
