"""Writing a store version's files so that a failure is reported, never half-hidden: an OSError becomes
a :class:`StoreWriteError` naming the file and the reason (bahe.embeddings.build)."""

from __future__ import annotations

import contextlib
import errno
import io
import os
from pathlib import Path

import numpy as np

from bahe.embeddings.store import StoreError, StoreWriteError, stored_dtype, write_bytes_atomic
from bahe.embeddings.vocabulary import RESERVED


def reason(err: OSError) -> str:
    """'No space left on device (ENOSPC)': the OS's words and the errno's name."""
    if err.errno is None or not err.strerror:
        return str(err)
    return f"{err.strerror} ({errno.errorcode.get(err.errno, err.errno)})"


@contextlib.contextmanager
def writing(path: Path, verb: str = "write"):
    """An OSError inside becomes a StoreWriteError naming ``path`` and the reason."""
    try:
        yield
    except OSError as err:
        raise StoreWriteError(f"cannot {verb} {path}: {reason(err)}") from err


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    # np.save straight into a file writes with C stdio (ndarray.tofile) and does not notice a write
    # that fails when the buffer is flushed: on a full disk it would leave a truncated chunk, and the
    # chunk's .npy is its completion marker. Through Python's file object a failed write raises.
    serialized = io.BytesIO()
    np.save(serialized, array, allow_pickle=False)
    write_bytes_atomic(path, serialized.getbuffer())


class NpyWriter:
    """A .npy of a known dtype and shape written block by block with plain sequential writes (see
    :func:`write_vectors`), fsynced at the end; the blocks must add up to the shape. An OSError becomes a
    StoreWriteError naming the file.

    Example::

        with NpyWriter(folder / "text_rows.npy", np.int64, (n,)) as out:
            for block in blocks:
                out.write(block)
    """

    def __init__(self, path: Path, dtype, shape: tuple[int, ...]):
        self.path, self.dtype, self.shape = Path(path), np.dtype(dtype), tuple(int(n) for n in shape)
        self.expected, self.written = int(np.prod(self.shape)), 0
        with writing(self.path):
            self.handle = open(self.path, "wb")  # noqa: SIM115 (closed by __exit__)
        try:
            with writing(self.path):
                np.lib.format.write_array_header_1_0(self.handle, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                                  "fortran_order": False, "shape": self.shape})
        except BaseException:
            self.handle.close()
            raise

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype).reshape(-1)
        self.written += block.size
        if self.written > self.expected:
            raise StoreError(f"{self.path}: more than the {self.expected} values of its header were written")
        with writing(self.path):
            self.handle.write(memoryview(block).cast("B"))

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                if self.written != self.expected:
                    raise StoreError(f"{self.path}: {self.written} values written for a header of {self.expected}")
                with writing(self.path):
                    self.handle.flush()
                    os.fsync(self.handle.fileno())
        finally:
            with contextlib.suppress(OSError):
                self.handle.close()


def to_stored(block: np.ndarray, dtype: str) -> np.ndarray:
    """float32 rows -> the store dtype's on-disk array, cast by torch (round to nearest even): float16, or
    bfloat16 as its raw uint16 bits; float32 unchanged."""
    if dtype == "float32":
        return np.ascontiguousarray(block, dtype=np.float32)
    import torch

    cast = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)).to(getattr(torch, dtype))
    return (cast.view(torch.uint16) if dtype == "bfloat16" else cast).numpy()


def write_vectors(path: Path, rows: int, dim: int, blocks, dtype: str = "float32", on_block=None) -> int:
    """Write a rows x dim .npy of the store dtype ``dtype`` (blocks already in its on-disk dtype,
    :data:`~bahe.embeddings.store.STORE_DTYPES`) with plain sequential writes; returns the rows the blocks
    held. ``on_block(block)`` sees every block written, in order (the row digests).

    Not a memory map: on a full disk, a store into a mapped sparse file kills the process with SIGBUS,
    while a write() raises an OSError (ENOSPC) that can be reported."""
    on_disk = stored_dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(on_disk), "fortran_order": False, "shape": (rows, dim)}
    written = 0
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        for block in blocks:
            if block.dtype != on_disk:
                raise StoreError(f"a block of {block.dtype} for {path}, which holds {dtype} ({on_disk})")
            block = np.ascontiguousarray(block)
            if block.ndim != 2 or block.shape[1] != dim:
                raise StoreError(f"a block of shape {block.shape} for {path}, which holds rows of {dim} values: "
                                 f"the chunks in {path.parent.parent} are malformed; delete that folder")
            written += len(block)
            if written <= rows:
                handle.write(memoryview(block).cast("B"))
                if on_block is not None:
                    on_block(block)
        handle.flush()
        os.fsync(handle.fileno())
    return written


def vector_blocks(parent, work: Path, n_chunks: int, dim: int,
                   transform, dtype: str = "float32"):
    """The new version's rows in order, in the store dtype's on-disk form: the parent's unchanged, as stored
    (or the zero <pad> and <unknown> rows), then each chunk's, post-transformed by ``transform`` when there is
    one (in float32), then cast to ``dtype``."""
    if parent is not None:
        for block in range(0, parent.rows_count, 65_536):  # stream the parent's rows, never all at once
            yield parent.raw_rows(block, min(block + 65_536, parent.rows_count))
    else:
        yield np.zeros((len(RESERVED), dim), dtype=stored_dtype(dtype))
    for c in range(n_chunks):
        block = np.load(work / f"chunk-{c:06d}.npy", allow_pickle=False)
        yield to_stored(block if transform is None else transform.apply(block), dtype)
