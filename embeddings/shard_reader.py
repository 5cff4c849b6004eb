"""Shard-local, chunked reads of a behaviour store's rows: one block (a row range x a column range) at a time.

A rank of a sharded behaviour table holds blocks of the store -- row-wise: a row range with every column;
column-wise: every row of a column range; table-wise: the whole table, or nothing -- and loads exactly those
(model/behaviour_lookup.py :func:`~bahe.model.behaviour_lookup.load_store_rows`). :class:`ShardReader` maps
``vectors.npy`` and walks a block in chunks of at most ``chunk_bytes`` of file span each: a chunk is a
NumPy view into the map (its rows, the block's columns; strided, nothing copied), which the caller copies
straight into its table shard. When the caller asks for the next chunk, the pages the previous one mapped are
handed back to the kernel (``madvise(MADV_DONTNEED)``: they leave this process's resident set and stay in
the page cache), so what the reader adds to a rank's resident memory is at most one chunk's file span --
never a copy of the shard, never full-size masks. Pages that hold none of a block's bytes are never touched
(for a column block that matters once a row is wider than a page; a 576-float row is 2,304 bytes, so every
page of the row range is read then, the I/O granularity of any reader).

The reader counts what it delivered (:attr:`ShardReader.delivered`: rows, columns and bytes per block) so
a test can check that a rank read its own blocks and nothing else.

Example::

    reader = ShardReader(BehaviourStore.open("stores/ml"), chunk_bytes=64 << 20)
    for first_row, chunk in reader.chunks(rows=(0, 500_000), columns=(0, 288)):
        shard[first_row:first_row + len(chunk)] = torch.from_numpy(chunk)   # chunk: rows x 288 float32
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from bahe.embeddings.row_chunks import chunk_problem
from bahe.embeddings.store import VECTORS, BehaviourStore, StoreError, inside, stored_dtype

CHUNK_BYTES = 64 << 20  # 64 MiB of file span per chunk


@dataclass
class Delivered:
    """What a reader handed out: one ``(row_start, row_stop, col_start, col_stop)`` per block read, the
    chunks and the bytes of the block elements (rows x columns x 4)."""

    blocks: list[tuple[int, int, int, int]] = field(default_factory=list)
    chunks: int = 0
    bytes: int = 0
    verified: list[int] = field(default_factory=list)  # the digest chunks checked (bahe.embeddings.row_chunks)
    verified_bytes: int = 0


class ShardReader:
    """Chunked reads of blocks of one store version's ``vectors.npy`` (C order, the store dtype: chunks are
    views of the on-disk values, bfloat16 as uint16 bits), through one map; :meth:`verify` checks digest
    chunks against the manifest (``row_chunks``).

    Args:
        store: the store version (opened: its manifest and the file's shape are already checked).
        chunk_bytes: the most file span one chunk maps (its rows x the store's row bytes); at least one row.
    """

    def __init__(self, store: BehaviourStore, chunk_bytes: int = CHUNK_BYTES):
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.store, self.chunk_bytes = store, int(chunk_bytes)
        self.path = inside(store.path / VECTORS, store.path.parent)
        self.rows_count, self.dim = store.rows_count, store.dim
        self.dtype = stored_dtype(store.store_dtype)
        self.row_bytes = self.dim * self.dtype.itemsize
        self.delivered = Delivered()
        with open(self.path, "rb") as handle:
            offset = _data_offset(handle, self.path, (self.rows_count, self.dim), self.dtype)
            size = os.fstat(handle.fileno()).st_size
            if size < offset + self.rows_count * self.row_bytes:
                raise StoreError(f"{self.path} is {size} bytes, too short for {self.rows_count} rows of {self.dim} "
                                 f"{store.store_dtype}: the store is corrupt; rebuild this version with bahe-encode build")
            # private and writable, never written: NumPy views are writable (torch.from_numpy takes them
            # without a warning), and no page is ever copied; the file itself stays read-only
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        self._offset = offset
        self._array = np.frombuffer(self._map, dtype=self.dtype, count=self.rows_count * self.dim,
                                    offset=offset).reshape(self.rows_count, self.dim) \
            if self._map is not None and self.rows_count else np.zeros((self.rows_count, self.dim), self.dtype)

    def rows_per_chunk(self) -> int:
        return max(1, self.chunk_bytes // max(self.row_bytes, 1))

    def chunks(self, rows: tuple[int, int], columns: tuple[int, int] | None = None
               ) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, rows x columns view)`` for every chunk of the block ``rows`` x ``columns`` (half-open
        ranges; columns default to all). A view is valid until the next chunk is asked for: copy it first."""
        (r0, r1), (c0, c1) = rows, columns if columns is not None else (0, self.dim)
        if not (0 <= r0 <= r1 <= self.rows_count and 0 <= c0 <= c1 <= self.dim):
            raise StoreError(f"block rows [{r0}, {r1}) x columns [{c0}, {c1}) outside the store {self.store.path}'s "
                             f"{self.rows_count} x {self.dim}")
        self.delivered.blocks.append((r0, r1, c0, c1))
        step = self.rows_per_chunk()
        for start in range(r0, r1, step):
            stop = min(start + step, r1)
            view = self._array[start:stop, c0:c1]
            self.delivered.chunks += 1
            self.delivered.bytes += view.size * self.dtype.itemsize
            try:
                yield start, view
            finally:
                del view
                self._release(start, stop)

    def verify(self, indices, who: str = "") -> str | None:
        """Hash the digest chunks ``indices`` (whole chunks, in pieces of at most ``chunk_bytes`` of file span, each
        piece's pages handed back after it) against the manifest; the first mismatch as a message naming the file
        and the chunk's rows (``who``: e.g. ", rank 1's"), else None."""
        chunks = self.store.row_chunks
        step = self.rows_per_chunk()
        for i in indices:
            start, stop = chunks.span(i)
            digest = hashlib.sha256()
            for first in range(start, stop, step):
                last = min(first + step, stop)
                digest.update(self._array[first:last])
                self._release(first, last)
            self.delivered.verified.append(i)
            self.delivered.verified_bytes += (stop - start) * self.row_bytes
            if digest.hexdigest() != chunks.vectors[i]:
                return chunk_problem(self.path, chunks, i, digest.hexdigest(), who)
        return None

    def _release(self, start: int, stop: int) -> None:
        """Give back the pages rows [start, stop) mapped (they stay in the page cache)."""
        if self._map is None or stop <= start:
            return
        first = (self._offset + start * self.row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
        end = self._offset + stop * self.row_bytes
        self._map.madvise(mmap.MADV_DONTNEED, first, end - first)

    def close(self) -> None:
        self._array = None
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a caller still holds a view: the map goes with it
                self._map.close()
            self._map = None

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _data_offset(handle, path, shape: tuple[int, int], expected: np.dtype) -> int:
    """The byte offset of a plain C-order .npy's data of dtype ``expected``, its header checked."""
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            found, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            found, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    except ValueError as err:
        raise StoreError(f"{path} is not a plain .npy file ({err}); rebuild this version with bahe-encode") from None
    if tuple(found) != tuple(shape) or fortran or np.dtype(dtype) != expected:
        raise StoreError(f"{path} holds {tuple(found)} {np.dtype(dtype)}{' (Fortran order)' if fortran else ''}, the "
                         f"manifest says {tuple(shape)} {expected}: the store is corrupt; rebuild it")
    return handle.tell()
