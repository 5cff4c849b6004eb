"""Behaviour text -> store row, per batch, without the vocabulary in the process's heap (issue 28, item 1).

A store version written by :mod:`bahe.embeddings.build` carries, beside ``vocab.parquet``, a text index of
four plain ``.npy`` files, memory-mapped read-only by every reader and covered by the manifest's checksums:

    text_hashes.npy    uint64 [texts]     the 64-bit hash (:func:`hash_texts`) of every real text (rows >= 2), sorted
    text_rows.npy      int64  [texts]     the row of each hash, in the same order (rows ascending among equal hashes)
    text_offsets.npy   int64  [rows + 1]  where row i's UTF-8 bytes start in text_bytes.npy (the reserved rows too)
    text_bytes.npy     uint8  [bytes]     every row's text, concatenated in row order
    text_buckets.npy   int64  [2^b + 1]   where the hashes whose top b bits are j start in text_hashes.npy (about
                                          8 to 16 texts a bucket: b = bucket_bits(texts), in the manifest)

:meth:`TextIndex.lookup_array` resolves a batch of texts with today's semantics (normalised first; the empty
text -> ``PAD_ID``; a text the store has not encoded -> ``UNKNOWN_ID``, counted): the batch's distinct texts
are normalised and hashed once each, found in their bucket of ``text_hashes.npy`` (a vectorised binary search
of a few probes within a few cache lines, where a search over the whole array would miss the cache about
log2(texts) - 12 times) and each candidate row's bytes are compared with the text's own bytes. The cost per
batch follows the batch's distinct texts, not the store: a handful of random reads per text. The maps are
advised MADV_RANDOM, so a lookup pages in what it reads and not the pages around it.

**Collisions cannot give a wrong row.** A hash only proposes a row: the row is taken when its bytes equal the
text's, so an unseen text whose hash equals a store text's stays unknown, and two store texts with one hash
(the writer counts them in the manifest, ``text_index.equal_hash_pairs``) are told apart by walking the run of
equal hashes and comparing bytes.

**Opened once per process, lazily**: :meth:`TextIndex.of_store` (``BehaviourStore.text_index``) maps the files
the first time a process asks for a version's index and returns the same object afterwards (pre-flight and the
batcher share it). The index files' checksums are checked at that first open (a changed file is refused,
named), unless the same store object has verified them already (``BehaviourStore.verify_files``).

**Stores written before the index** (no ``text_index`` section in the manifest) still open: their vocabulary's
text column is read once as Arrow buffers (no Python string per text), hashed and sorted in memory, with a
one-line warning naming ``bahe-encode``; the next ``bahe-encode build`` that adds texts to the store writes the
index with the new version. A reader never writes into a published version (trainers may hold the store
read-only, and a published version never changes).

**Refresh**: a refreshed version's index is its parent's, extended (:func:`bahe.embeddings.text_index_writer.write_text_index`): the parent's text
bytes and offsets are copied and the new texts appended, the parent's sorted hashes are merged with the new
texts' block by block; nothing of the parent is re-hashed or held whole in memory.

The hash (:data:`HASH`) is the first 8 bytes of BLAKE2b (digest_size=8) of the text's UTF-8 bytes, read as a
little-endian unsigned 64-bit integer: any language reproduces it.
"""

from __future__ import annotations

import hashlib
import mmap
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bahe.embeddings.store import StoreError, file_sha256, inside, manifest_digest
from bahe.embeddings.vocabulary import PAD_ID, RESERVED, UNKNOWN_ID, normalize_texts, read_vocab_table

FORMAT = "bahe-text-index/1"
HASH = "blake2b-64-le"  # BLAKE2b, digest_size=8, of the UTF-8 bytes, read little-endian
SECTION = "text_index"  # the manifest's section: format, hash, texts, bucket_bits, equal_hash_pairs
HASHES, ROWS, OFFSETS, BYTES, BUCKETS = ("text_hashes.npy", "text_rows.npy", "text_offsets.npy", "text_bytes.npy",
                                         "text_buckets.npy")
FILES = (HASHES, ROWS, OFFSETS, BYTES, BUCKETS)
BLOCK = 1 << 20  # entries per block when the writer streams a parent's index


def hash_texts(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The 64-bit hash (:data:`HASH`) of every value of an Arrow string array, as uint64."""
    offsets, data = string_parts(texts)
    view = memoryview(data)
    blake = hashlib.blake2b
    starts, stops = offsets[:-1].tolist(), offsets[1:].tolist()
    digests = b"".join([blake(view[a:b], digest_size=8).digest() for a, b in zip(starts, stops)])
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64, copy=False)


def string_parts(texts: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(int64 offsets of len + 1 starting at 0, uint8 bytes) of a string array without nulls; no copy of the
    bytes when the array is one chunk."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks() if texts.num_chunks != 1 else texts.chunk(0)
    if pa.types.is_string(texts.type) and len(texts) and texts.buffers()[2] is not None:
        raw = np.frombuffer(texts.buffers()[1], dtype=np.int32, count=len(texts) + 1, offset=texts.offset * 4)
    elif pa.types.is_large_string(texts.type) and len(texts) and texts.buffers()[2] is not None:
        raw = np.frombuffer(texts.buffers()[1], dtype=np.int64, count=len(texts) + 1, offset=texts.offset * 8)
    elif len(texts) == 0 or pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type):
        return np.zeros(len(texts) + 1, dtype=np.int64), np.zeros(0, dtype=np.uint8)
    else:
        return string_parts(pc.cast(texts, pa.large_string()))
    data = np.frombuffer(texts.buffers()[2], dtype=np.uint8)[int(raw[0]):int(raw[-1])]
    return raw.astype(np.int64) - int(raw[0]), data


def bucket_bits(texts: int) -> int:
    """Bits of the hash that pick a bucket: 2^b buckets of 8 to 16 texts on average (b = 0 below 16 texts)."""
    return max(0, (texts // 8).bit_length() - 1)


def bucket_of(hashes: np.ndarray, bits: int) -> np.ndarray:
    """The bucket of each hash: its top ``bits`` bits."""
    if bits == 0:
        return np.zeros(len(hashes), dtype=np.int64)
    return (hashes >> np.uint64(64 - bits)).astype(np.int64)


def distinct_texts(texts: pa.Array | pa.ChunkedArray) -> pa.DictionaryArray:
    """``texts`` dictionary-encoded: each distinct text once (``.dictionary``) and where each value is (``.indices``)."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks() if texts.num_chunks != 1 else texts.chunk(0)
    return pc.dictionary_encode(texts)


def _from_parts(offsets: np.ndarray, data: np.ndarray) -> pa.Array:
    """A large_string array over (offsets from 0, bytes); its UTF-8 is checked."""
    array = pa.Array.from_buffers(pa.large_string(), len(offsets) - 1,
                                  [None, pa.py_buffer(np.ascontiguousarray(offsets, dtype=np.int64)),
                                   pa.py_buffer(np.ascontiguousarray(data, dtype=np.uint8))])
    array.validate(full=True)
    return array


def _load_npy(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """An index file of this dtype and shape, memory-mapped read-only and advised MADV_RANDOM (an empty one is
    read); refused otherwise."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            found_shape, fortran, found_dtype = read_header(handle)
            offset = handle.tell()
            if found_dtype != dtype or tuple(found_shape) != tuple(shape) or fortran:
                raise StoreError(f"{path} holds {tuple(found_shape)} {found_dtype}, the manifest calls for "
                                 f"{tuple(shape)} {np.dtype(dtype)}: the store's text index is corrupt; rebuild this "
                                 "version with bahe-encode")
            count = int(np.prod(shape))
            if offset + count * dtype.itemsize != path.stat().st_size:
                raise ValueError(f"{path.stat().st_size - offset} bytes of data for {count} values")
            if count == 0:
                return np.zeros(shape, dtype=dtype)
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except StoreError:
        raise
    except (OSError, ValueError) as err:
        raise StoreError(f"{path} is not the .npy array the store's text index needs ({err}); rebuild this version "
                         "with bahe-encode") from None
    if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)  # a lookup reads a few bytes here and there: no read-ahead around them
    return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset).reshape(shape)


class TextIndex:
    """One store version's texts, resolvable per batch (see the module docstring).

    Example::

        index = BehaviourStore.open("stores/ml").text_index      # mapped once per process
        index.lookup_array(pa.array(["Toy Story (1995)", "never seen", ""]))   # [row, 1, 0]
    """

    _open: dict[tuple[str, str], TextIndex] = {}
    _lock = threading.Lock()
    _warned: set[str] = set()

    def __init__(self, path: Path, hashes: np.ndarray, rows: np.ndarray, offsets: np.ndarray, data: np.ndarray,
                 buckets: np.ndarray, *, on_disk: bool):
        self.path = path
        self.hashes, self.rows, self.offsets, self.data, self.buckets = hashes, rows, offsets, data, buckets
        self.bits = (len(buckets) - 1).bit_length() - 1  # 2^bits + 1 bucket starts
        self.on_disk = on_disk  # False: a store written before text indexes, indexed in memory
        self.unknown_lookups = 0
        self.hash_collisions_seen = 0  # texts whose hash matched a row of other bytes (told apart, not taken)

    # opening ------------------------------------------------------------------------------------------------
    @classmethod
    def of_store(cls, store) -> TextIndex:
        """The index of ``store``'s version, opened (and checked) once per process."""
        key = (str(store.path.resolve()), manifest_digest(store.manifest))
        with cls._lock:
            index = cls._open.get(key)
            if index is None:
                index = cls._open[key] = cls._from_files(store) if SECTION in store.manifest else cls._in_memory(store)
            return index

    @classmethod
    def _from_files(cls, store) -> TextIndex:
        section, files = store.manifest[SECTION], store.manifest.get("files", {})
        if not isinstance(section, dict) or section.get("format") != FORMAT or section.get("hash") != HASH:
            raise StoreError(f"{store.path / 'manifest.json'}: text index {section!r}, this reader knows format "
                             f"{FORMAT!r} with hash {HASH!r}; use the bahe version that wrote the store, or rebuild it")
        for name in FILES:
            path = inside(store.path / name, store.path.parent)
            if name not in files:
                raise StoreError(f"{store.path / 'manifest.json'} lists no checksum for {name}: rebuild this version "
                                 "with bahe-encode")
            if not path.is_file():
                raise StoreError(f"{path} is missing: the store's text index is lost; rebuild this version with "
                                 "bahe-encode")
            if name not in store.verified_files:
                actual = file_sha256(path)
                if actual != files[name]["sha256"]:
                    raise StoreError(f"{path}: checksum {actual[:12]}... does not match the manifest's "
                                     f"{files[name]['sha256'][:12]}...; the file changed after the store was written: "
                                     "restore it or rebuild this version with bahe-encode (bahe-encode verify checks "
                                     "a store)")
                store.verified_files.add(name)
        texts = int(section["texts"])
        if texts != store.rows_count - len(RESERVED) or section.get("bucket_bits") != bucket_bits(texts):
            raise StoreError(f"{store.path / 'manifest.json'}: a text index of {texts} texts in 2^"
                             f"{section.get('bucket_bits')} buckets for {store.rows_count} rows; rebuild this version "
                             "with bahe-encode")
        offsets = _load_npy(store.path / OFFSETS, np.dtype(np.int64), (store.rows_count + 1,))
        return cls(store.path, _load_npy(store.path / HASHES, np.dtype(np.uint64), (texts,)),
                   _load_npy(store.path / ROWS, np.dtype(np.int64), (texts,)), offsets,
                   _load_npy(store.path / BYTES, np.dtype(np.uint8), (int(offsets[-1]),)),
                   _load_npy(store.path / BUCKETS, np.dtype(np.int64), ((1 << bucket_bits(texts)) + 1,)), on_disk=True)

    @classmethod
    def _in_memory(cls, store) -> TextIndex:
        """A store written before text indexes: its vocabulary's texts as Arrow buffers, hashed and sorted here."""
        table = read_vocab_table(inside(store.path / "vocab.parquet", store.path.parent), columns=("id", "text"))
        if table.num_rows != store.rows_count:
            raise StoreError(f"{store.path}: vocabulary has {table.num_rows} texts for {store.rows_count} rows")
        offsets, data = string_parts(pc.cast(table.column("text"), pa.large_string()))
        offsets, data = np.array(offsets), np.array(data)  # owned: the table goes
        hashes, rows = sorted_hashes(_from_parts(offsets[len(RESERVED):] - offsets[len(RESERVED)],
                                                 data[offsets[len(RESERVED)]:]), len(RESERVED))
        key = str(store.path.resolve())
        if key not in cls._warned:
            cls._warned.add(key)
            size = (offsets.nbytes + data.nbytes + hashes.nbytes + rows.nbytes) / 2**20
            print(f"bahe: warning: store version {store.path} was written before stores carried a text index: its "
                  f"{store.rows_count - len(RESERVED):,} texts are indexed in this process's memory ({size:,.0f} MiB); "
                  f"the next `bahe-encode build --store {store.path.parent} --data ...` that adds texts writes the "
                  "index with the new version", file=sys.stderr, flush=True)
        return cls(store.path, hashes, rows, offsets, data, bucket_starts([hashes], len(hashes)), on_disk=False)

    # reading ------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.offsets) - 1

    def texts(self, start: int, stop: int) -> list[str]:
        """The texts of rows [start, stop) in row order (read from the mapped bytes; bounded memory per call)."""
        if not 0 <= start <= stop <= len(self):
            raise StoreError(f"text rows [{start}, {stop}) outside the store's {len(self)} rows")
        offsets = np.array(self.offsets[start:stop + 1])
        return _from_parts(offsets - offsets[0], self.data[offsets[0]:offsets[-1]]).to_pylist()

    def lookup(self, texts) -> list[int]:
        """Rows of texts: PAD_ID for an empty text, UNKNOWN_ID (counted) for one the store has not encoded."""
        return self.lookup_array(pa.array(list(texts), pa.string())).tolist()

    def lookup_array(self, texts: pa.Array | pa.ChunkedArray, *, count: bool = True) -> np.ndarray:
        """Rows (int64) of an Arrow string array's texts, normalised first (``BehaviourVocabulary.lookup_array``'s
        semantics): the empty text -> PAD_ID; a text the store has not encoded -> UNKNOWN_ID, each adding one to
        :attr:`unknown_lookups` when ``count``. A null is refused: a missing text is the empty text ''."""
        if texts.null_count:
            first = int(np.flatnonzero(texts.is_null().to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"lookup: text {first} is null; a missing text is the empty text ''")
        if len(texts) == 0:
            return np.zeros(0, dtype=np.int64)
        encoded = distinct_texts(texts)  # normalised and resolved once per distinct text of the batch
        ids = self._rows_of_distinct(normalize_texts(encoded.dictionary))[encoded.indices.to_numpy(zero_copy_only=False)]
        if count:
            self.unknown_lookups += int(np.count_nonzero(ids == UNKNOWN_ID))
        return ids

    def _rows_of_distinct(self, texts: pa.Array) -> np.ndarray:
        """Rows of distinct normalised texts (the cost follows len(texts), not the store)."""
        offsets, data = string_parts(texts)
        lengths = np.diff(offsets)
        out = np.full(len(texts), UNKNOWN_ID, dtype=np.int64)
        out[lengths == 0] = PAD_ID
        real = np.flatnonzero(lengths > 0)
        if not len(real) or not len(self.hashes):
            return out
        wanted = hash_texts(texts.take(pa.array(real)))
        at = self._search(wanted)
        hit = at < len(self.hashes)
        hit[hit] = np.asarray(self.hashes[at[hit]]) == wanted[hit]
        queries, at = real[hit], at[hit]
        rows = np.asarray(self.rows[at])
        same = self._same_bytes(offsets, data, queries, rows)
        out[queries[same]] = rows[same]
        for query, first, h in zip(queries[~same].tolist(), at[~same].tolist(), wanted[hit][~same].tolist()):
            out[query] = self._walk_equal_hashes(offsets, data, query, first, h)
        return out

    def _search(self, wanted: np.ndarray) -> np.ndarray:
        """``np.searchsorted(self.hashes, wanted)`` (the first entry >= each hash), searched within each hash's
        bucket: every probe of a text falls in the same few cache lines."""
        bucket = bucket_of(wanted, self.bits)
        lo, hi = self.buckets[bucket], self.buckets[bucket + 1]
        active = np.flatnonzero(lo < hi)
        while len(active):
            mid = (lo[active] + hi[active]) >> 1
            right = self.hashes[mid] < wanted[active]
            lo[active[right]] = mid[right] + 1
            hi[active[~right]] = mid[~right]
            active = active[lo[active] < hi[active]]
        return lo

    def _same_bytes(self, offsets: np.ndarray, data: np.ndarray, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Whether text ``queries[i]`` (of offsets / data) has the bytes of store row ``rows[i]``, vectorised."""
        starts, stops = np.asarray(self.offsets[rows]), np.asarray(self.offsets[rows + 1])
        lengths = offsets[queries + 1] - offsets[queries]
        same = stops - starts == lengths
        check = np.flatnonzero(same)
        n = lengths[check]
        if not len(check) or not n.sum():
            return same
        within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        stored = np.asarray(self.data[np.repeat(starts[check], n) + within])
        differs = stored != data[np.repeat(offsets[queries[check]], n) + within]
        same[check[np.bincount(np.repeat(np.arange(len(check)), n), weights=differs, minlength=len(check)) > 0]] = False
        return same

    def _walk_equal_hashes(self, offsets: np.ndarray, data: np.ndarray, query: int, first: int, h: int) -> int:
        """The row among the run of entries with hash ``h`` (from ``first``) whose bytes are the query's; else
        UNKNOWN_ID. Only texts whose hash matched a row of other bytes come here (a 64-bit collision)."""
        self.hash_collisions_seen += 1
        wanted = bytes(data[offsets[query]:offsets[query + 1]])
        at = first + 1
        while at < len(self.hashes) and int(self.hashes[at]) == h:
            row = int(self.rows[at])
            if bytes(self.data[int(self.offsets[row]):int(self.offsets[row + 1])]) == wanted:
                return row
            at += 1
        return UNKNOWN_ID

    def audit(self, vocabulary_path: Path) -> None:
        """Everything the index claims, recomputed (``bahe-encode verify``): its bytes are the vocabulary's texts,
        its hashes those of the texts, sorted, each row once."""
        texts = read_vocab_table(vocabulary_path, columns=("id", "text")).column("text")
        offsets, data = string_parts(pc.cast(texts, pa.large_string()))
        if not (np.array_equal(offsets, self.offsets) and np.array_equal(data, self.data)):
            raise StoreError(f"{self.path / BYTES} / {OFFSETS} do not hold the texts of {vocabulary_path}: the store's "
                             "text index is corrupt; rebuild this version with bahe-encode")
        hashes, rows = sorted_hashes(_from_parts(offsets[len(RESERVED):] - offsets[len(RESERVED)],
                                                 data[offsets[len(RESERVED)]:]), len(RESERVED))
        for name, mine, expected in ((HASHES, self.hashes, hashes), (ROWS, self.rows, rows),
                                     (BUCKETS, self.buckets, bucket_starts([hashes], len(hashes)))):
            if not np.array_equal(mine, expected):
                raise StoreError(f"{self.path / name} is not the sorted {HASH} index of the store's texts: the "
                                 "store's text index is corrupt; rebuild this version with bahe-encode")


def bucket_starts(blocks, texts: int) -> np.ndarray:
    """``text_buckets.npy`` of sorted hashes given in blocks: where each of the 2^bucket_bits(texts) buckets starts,
    and the end."""
    bits = bucket_bits(texts)
    sizes = np.zeros(1 << bits, dtype=np.int64)
    for block in blocks:
        sizes += np.bincount(bucket_of(np.asarray(block), bits), minlength=len(sizes))
    return np.concatenate([[0], np.cumsum(sizes)])


def sorted_hashes(texts: pa.Array, first_row: int) -> tuple[np.ndarray, np.ndarray]:
    """(hashes sorted ascending, their rows; rows ascending among equal hashes) of texts at rows first_row, ..."""
    hashes = hash_texts(texts)
    order = np.argsort(hashes, kind="stable")
    return hashes[order], order.astype(np.int64) + first_row
