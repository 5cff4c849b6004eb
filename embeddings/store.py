"""The behaviour embedding store on disk: versioned, checksummed, memory-mappable, pickle-free.

Layout::

    <root>/
      LATEST                  name of the newest complete version (replaced atomically)
      v000001/
        manifest.json         model identity and weights hash, every encoding choice (k, pooling, post-transform,
                              tokenizer hash, ...: bahe.embeddings.encoding), dtype, dim, rows, parent,
                              checksums, and manifest_sha256: a digest of all of that, checked at every open
        vocab.parquet         id, text, count (bahe.embeddings.vocabulary)
        vectors.npy           rows x dim in the store dtype (float32, float16, or bfloat16 kept as its raw
                              uint16 bits); row i is the vector of vocabulary id i (post-transformed)
        post_transform.npy    the frozen statistics of a center / whiten store (bahe.embeddings.post_transform)
        text_hashes.npy, text_rows.npy, text_offsets.npy, text_bytes.npy
                              the text index: text -> row per batch, memory-mapped (bahe.embeddings.text_index)
      v000002/ ...            a refresh: the rows of its parent, unchanged, then the new texts
      .work/                  unfinished builds (bahe.embeddings.build); never read as a store
      .lock                   held by the build writing the store (bahe.embeddings.folder_lock)

A version directory appears under its real name only when complete, and ``LATEST`` moves only
after that, so a crash leaves the previous version intact and current. Every file is read only if it
lies inside the store folder once links are resolved.

Stores written before the text index still open: their readers index the vocabulary in memory
(bahe.embeddings.text_index). Stores written before manifests carried ``manifest_sha256`` still open
(their files' checksums are still checked by ``verify``), but ``verify`` refuses them: rebuild such a
store to cover its manifest.

**Integrity that scales** (issue 28, item 3). The manifest's ``row_chunks`` section cuts the rows into
chunks (``stops``: each chunk's end row) and records, per chunk, the SHA-256 of its rows' bytes in
``vectors.npy`` (``vectors_sha256``) and of its texts (``texts_sha256``, :func:`texts_digest`). A rank that
loads a shard hashes only the chunks its rows lie in (bahe.embeddings.shard_reader), so checking costs
1/W of the store per rank; ``bahe-encode verify`` checks every chunk and every file. A refresh keeps its
parent's chunks (their digests carried over, never recomputed: the rows are copied unchanged) and cuts
its new rows into chunks of the parent's size from the parent's last row, so a version's row count is a
chunk boundary of every later version: the run record's store digest (training/run_record.py) is a digest
of the digests up to that boundary, read from the manifest. Stores written before ``row_chunks`` open and
verify as before (whole-file checksums).
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

from bahe.embeddings.encoding import normalised
from bahe.embeddings.post_transform import POST_TRANSFORM_FILE, PostTransform
from bahe.embeddings.row_chunks import RowChunks, chunk_problem, texts_digest
from bahe.embeddings.vocabulary import BehaviourVocabulary

TEXT_INDEX_FILES = ("text_hashes.npy", "text_rows.npy", "text_offsets.npy", "text_bytes.npy")  # text_index.FILES
FORMAT = "bahe-behaviour-store/1"
MANIFEST_DIGEST = "manifest_sha256"
NPY_MAGIC = b"\x93NUMPY"
MANIFEST, VOCAB, VECTORS, LATEST = "manifest.json", "vocab.parquet", "vectors.npy", "LATEST"
# store dtype -> the .npy dtype on disk; numpy has no bfloat16: its raw bits are kept as uint16
STORE_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}


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


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest's canonical JSON (sorted keys, no spaces), its own digest field left out."""
    body = {key: value for key, value in manifest.items() if key != MANIFEST_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def stored_dtype(name: str) -> np.dtype:
    """The on-disk dtype of a store dtype name (StoreError for an unknown one)."""
    if name not in STORE_DTYPES:
        raise StoreError(f"store dtype {name!r} is not one of {', '.join(STORE_DTYPES)}; use the bahe version that "
                         "wrote the store, or rebuild it")
    return STORE_DTYPES[name]


def as_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Rows as stored (``dtype``: float32, float16, bfloat16 as uint16 bits) -> a float32 copy, exactly."""
    if dtype == "bfloat16":  # a bfloat16 is the top half of a float32
        return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.array(raw, dtype=np.float32)


def inside(path: Path, root: Path) -> Path:
    """``path`` with links resolved, refused unless it lies inside ``root`` (itself resolved): a link in
    a store may point within it, never out of it."""
    real = Path(path).resolve()
    if not real.is_relative_to(Path(root).resolve()):
        raise StoreError(f"{path} is a link to {real}, outside the store folder {root}: a store reads only its "
                         "own files; replace the link by the file itself, or rebuild the store with bahe-encode")
    return real


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
    inside(pointer, root)
    name = check_version_name(pointer.read_text().strip(), pointer)
    if not (Path(root) / name / MANIFEST).is_file():
        raise StoreError(f"{pointer} names {name!r}, which is not a complete version; restore it or delete LATEST")
    return name


def _load_vectors(path: Path) -> np.ndarray:
    """Memory-map a plain float .npy; anything else (not a .npy, pickled objects) is refused, never unpickled."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(NPY_MAGIC))
    except OSError as err:
        raise StoreError(f"cannot read {path}: {err}; rebuild this version with bahe-encode") from None
    if head != NPY_MAGIC:
        raise StoreError(f"{path} is not a NumPy .npy file (starts with {head!r}); rebuild this version with "
                         "bahe-encode")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:  # e.g. pickled objects: refused, never unpickled
        raise StoreError(f"{path} is not a plain float array ({err}); rebuild this version with bahe-encode") from None


@dataclass(frozen=True)
class Expected:
    """What a consumer of a store needs it to be (None = do not check)."""

    model_sha256: str | None = None
    k: int | None = None
    dim: int | None = None
    pooling: str | None = None
    post_transform: str | None = None


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
        for name in ("", MANIFEST, VECTORS, VOCAB, POST_TRANSFORM_FILE, *TEXT_INDEX_FILES):  # no link out
            inside(self.path / name, self.path.parent)
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise StoreError(f"{manifest_path} is corrupt: {err}") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            found = self.manifest.get("format") if isinstance(self.manifest, dict) else self.manifest
            raise StoreError(f"{manifest_path}: format {found!r}, expected {FORMAT!r}")
        self._check_manifest_digest(manifest_path)
        self.rows_count = int(self.manifest["rows"])
        self.dim = int(self.manifest["dim"])
        self.store_dtype = str(self.manifest.get("store_dtype", "float32"))
        on_disk = stored_dtype(self.store_dtype)
        self._vectors = _load_vectors(self.path / VECTORS)
        if self._vectors.shape != (self.rows_count, self.dim) or self._vectors.dtype != on_disk:
            raise StoreError(f"{self.path / VECTORS} holds {self._vectors.shape} {self._vectors.dtype}, the manifest "
                             f"says ({self.rows_count}, {self.dim}) {self.store_dtype} ({on_disk} on disk): the store "
                             "is corrupt; rebuild it")
        try:
            self.row_chunks = RowChunks.from_manifest(self.manifest, self.path)
        except ValueError as err:
            raise StoreError(str(err)) from None
        self._vocab: BehaviourVocabulary | None = None
        self.verified_files: set[str] = set()  # files whose checksum this object has checked against the manifest

    def _check_manifest_digest(self, manifest_path: Path) -> None:
        """An edited manifest (k, dim, a checksum, any field) no longer matches its digest: refused."""
        recorded = self.manifest.get(MANIFEST_DIGEST)
        if recorded is not None and recorded != manifest_digest(self.manifest):
            raise StoreError(f"{manifest_path} was changed after the store was written (its {MANIFEST_DIGEST} does "
                             "not match its contents), so its k, dim and checksums cannot be trusted; restore the "
                             "file or rebuild the store with bahe-encode")

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
    def encoding(self) -> dict:
        """The manifest's encoder section with every choice present: a manifest written before a choice
        existed reads as its default (pooling mean, post-transform none; bahe.embeddings.encoding)."""
        return normalised(self.manifest["encoder"])

    def post_transform(self) -> PostTransform | None:
        """The frozen post-transform the rows were stored with (None for ``none``); its file must match the
        digest in the manifest."""
        encoding = self.encoding
        if encoding["post_transform"] == "none":
            return None
        path = inside(self.path / POST_TRANSFORM_FILE, self.path.parent)
        if not path.is_file() or file_sha256(path) != encoding["post_transform_sha256"]:
            found = f"sha256 {file_sha256(path)[:12]}..." if path.is_file() else "missing"
            raise StoreError(f"{path}: {found}, the manifest's post_transform_sha256 is "
                             f"{str(encoding['post_transform_sha256'])[:12]}...: the store's frozen statistics are "
                             "lost or changed; restore the file or rebuild the store with bahe-encode")
        try:
            return PostTransform.load(path, encoding["post_transform"], self.dim)
        except ValueError as err:
            raise StoreError(f"{err}; rebuild the store with bahe-encode") from None

    @property
    def vocabulary(self) -> BehaviourVocabulary:
        if self._vocab is None:
            self._vocab = BehaviourVocabulary.load(self.path / VOCAB)
            if len(self._vocab) != self.rows_count:
                raise StoreError(f"{self.path}: vocabulary has {len(self._vocab)} texts for {self.rows_count} rows")
        return self._vocab

    @property
    def text_index(self):
        """Text -> row per batch without the vocabulary in memory (:class:`bahe.embeddings.text_index.TextIndex`):
        opened once per process, lazily; the same object for every reader of this version in the process."""
        from bahe.embeddings.text_index import TextIndex

        return TextIndex.of_store(self)

    def texts(self, start: int, stop: int) -> list[str]:
        """The texts of rows [start, stop), read through the text index (bounded memory per call)."""
        return self.text_index.texts(start, stop)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a float32 array (copied out of the memory map; a half-precision store's rows
        upcast exactly)."""
        return as_float32(self.raw_rows(start, stop), self.store_dtype)

    def raw_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as stored (:data:`STORE_DTYPES`: bfloat16 as uint16 bits), copied out of the map."""
        if not 0 <= start <= stop <= self.rows_count:
            raise StoreError(f"row range [{start}, {stop}) outside the store's {self.rows_count} rows")
        return np.array(self._vectors[start:stop])

    def check(self, expected: Expected) -> None:
        """Refuse a store built by another model, k, dim, pooling or post-transform than the config names."""
        encoder, model = self.encoding, self.manifest["model"]
        found = {"model_sha256": model["sha256"], "k": encoder["k"], "dim": self.dim, "pooling": encoder["pooling"],
                 "post_transform": encoder["post_transform"]}
        wrong = [f"{key}: store has {found[key]!r}, config asks for {want!r}"
                 for key, want in vars(expected).items() if want is not None and found[key] != want]
        if wrong:
            raise StoreError(f"store {self.path} was built for another encoder ({'; '.join(wrong)}); rebuild it with "
                             f"bahe-encode for this config, or point the config at the matching store")

    def verify(self) -> None:
        """:meth:`verify_files` (reads everything; for audits), and refuse a manifest that no digest covers
        (a store written before manifests carried one)."""
        self.verify_files()
        if "text_index" in self.manifest:  # its bytes are the vocabulary's texts, its hashes theirs, sorted
            self.text_index.audit(self.path / VOCAB)
        if MANIFEST_DIGEST not in self.manifest:
            raise StoreError(f"{self.path / MANIFEST} carries no {MANIFEST_DIGEST}: the store was written before "
                             "manifests were checksummed (or the field was removed), so an edit of its k, dim or "
                             "checksums would go unnoticed; rebuild the store with bahe-encode to cover it")

    def verify_files(self) -> None:
        """Recompute every file checksum against the manifest (reads everything); a changed file raises a
        StoreError naming it. With ``row_chunks``, vectors.npy is read once for its checksum and every chunk's
        digest (a changed chunk is named by its row range), and every chunk's texts are checked. The trainer
        runs it as it loads the rows of a store written before ``row_chunks`` (model/behaviour_lookup.py)."""
        for name, meta in self.manifest["files"].items():
            path = inside(self.path / name, self.path.parent)
            actual = self._vectors_sha256(path) if name == VECTORS and self.row_chunks else file_sha256(path)
            if actual != meta["sha256"]:
                raise StoreError(f"{self.path / name}: checksum {actual[:12]}... does not match the manifest's "
                                 f"{meta['sha256'][:12]}...; the file changed after the store was written")
            self.verified_files.add(name)

    def _vectors_sha256(self, path: Path) -> str:
        """vectors.npy's SHA-256, each digest chunk's rows checked on the way (one pass; StoreError naming the
        file and the chunk's rows), then every chunk's texts."""
        chunks, whole = self.row_chunks, hashlib.sha256()
        row_bytes = self.dim * stored_dtype(self.store_dtype).itemsize
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            header(handle)
            offset = handle.tell()
            handle.seek(0)
            whole.update(handle.read(offset))
            for i in range(len(chunks.stops)):
                start, stop = chunks.span(i)
                digest, left = hashlib.sha256(), (stop - start) * row_bytes
                while left > 0:
                    piece = handle.read(min(left, 1 << 24))
                    if not piece:
                        break
                    digest.update(piece)
                    whole.update(piece)
                    left -= len(piece)
                if digest.hexdigest() != chunks.vectors[i]:
                    raise StoreError(chunk_problem(path, chunks, i, digest.hexdigest()))
            while rest := handle.read(1 << 24):
                whole.update(rest)
        for i in range(len(chunks.stops)):
            actual = texts_digest(self.texts(*chunks.span(i)))
            if actual != chunks.texts[i]:
                start, stop = chunks.span(i)
                raise StoreError(f"{self.path}: the texts of rows [{start}, {stop}) (digest chunk {i + 1} of "
                                 f"{len(chunks.stops)}) do not match the manifest's digest (sha256 {actual[:12]}..., "
                                 f"recorded {chunks.texts[i][:12]}...): the text index changed after the store was "
                                 "written; rebuild this version with bahe-encode build")
        return whole.hexdigest()
