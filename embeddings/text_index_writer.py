"""Writing a store version's text index (the files :mod:`bahe.embeddings.text_index` reads): every row's bytes
and offsets, the texts' sorted hashes with their rows, and the hash buckets. A refreshed version extends its
parent's index block by block: the parent's bytes and offsets are copied, the new texts hashed and sorted, and
the two sorted runs merged, so nothing of the parent is re-hashed or held whole in memory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from bahe.embeddings.text_index import (
    BLOCK,
    BUCKETS,
    BYTES,
    FORMAT,
    HASH,
    HASHES,
    OFFSETS,
    ROWS,
    TextIndex,
    bucket_bits,
    bucket_of,
    sorted_hashes,
    string_parts,
)
from bahe.embeddings.vocabulary import RESERVED


def write_text_index(folder: Path, texts: Sequence[str], parent_rows: int, parent: TextIndex | None) -> dict:
    """Write the index of a version whose rows are ``texts`` (every text, reserved rows first, in row order) into
    ``folder``; returns the manifest's ``text_index`` section. With ``parent`` (an on-disk index of the first
    ``parent_rows`` rows) only the texts after them are hashed: the parent's files are extended block by block."""
    from bahe.embeddings.build_io import NpyWriter

    if parent is None or not parent.on_disk:
        parent_rows = 0
    new = pa.array(texts[max(parent_rows, len(RESERVED)):], pa.large_string())
    new_offsets, new_data = string_parts(new)
    new_hashes, new_rows = sorted_hashes(new, max(parent_rows, len(RESERVED)))
    if parent_rows:
        head_offsets, head_bytes = parent.offsets, parent.data
        parent_hashes, parent_rows_of = parent.hashes, parent.rows
    else:
        reserved = pa.array(list(RESERVED), pa.large_string())
        head_offsets, head_bytes = (np.array(x) for x in string_parts(reserved))
        parent_hashes, parent_rows_of = np.zeros(0, np.uint64), np.zeros(0, np.int64)
    total_bytes = int(head_offsets[-1]) + len(new_data)
    with NpyWriter(folder / BYTES, np.uint8, (total_bytes,)) as out:
        for start in range(0, len(head_bytes), BLOCK * 64):
            out.write(head_bytes[start:start + BLOCK * 64])
        out.write(new_data)
    with NpyWriter(folder / OFFSETS, np.int64, (len(head_offsets) + len(new),)) as out:
        for start in range(0, len(head_offsets), BLOCK):
            out.write(head_offsets[start:start + BLOCK])
        out.write(new_offsets[1:] + int(head_offsets[-1]))
    texts_count = len(parent_hashes) + len(new_hashes)
    bits = bucket_bits(texts_count)
    equal_pairs, sizes = 0, np.zeros(1 << bits, dtype=np.int64)
    with NpyWriter(folder / HASHES, np.uint64, (texts_count,)) as hashes_out, \
            NpyWriter(folder / ROWS, np.int64, (texts_count,)) as rows_out:
        previous = None
        for hashes, rows in _merged(parent_hashes, parent_rows_of, new_hashes, new_rows):
            if len(hashes):
                equal_pairs += int(np.count_nonzero(hashes[1:] == hashes[:-1])) + int(previous == hashes[0])
                previous = hashes[-1]
                sizes += np.bincount(bucket_of(hashes, bits), minlength=len(sizes))
            hashes_out.write(hashes)
            rows_out.write(rows)
    with NpyWriter(folder / BUCKETS, np.int64, (len(sizes) + 1,)) as out:
        out.write(np.concatenate([[0], np.cumsum(sizes)]))
    return {"format": FORMAT, "hash": HASH, "texts": texts_count, "bucket_bits": bits, "equal_hash_pairs": equal_pairs}


def _merged(parent_hashes: np.ndarray, parent_rows: np.ndarray, new_hashes: np.ndarray, new_rows: np.ndarray):
    """Blocks of (hashes, rows) of both sorted runs merged in order; a parent entry before a new one of equal hash
    (its row is smaller). The parent's run is read a block at a time."""
    # new entry j goes right before parent entry before[j] (after every parent entry of equal hash)
    before = np.searchsorted(parent_hashes, new_hashes, side="right")
    taken = 0
    for start in range(0, len(parent_hashes), BLOCK):
        stop = min(start + BLOCK, len(parent_hashes))
        upto = int(np.searchsorted(before, stop, side="left"))  # new entries placed before parent entry `stop`
        block_h = np.asarray(parent_hashes[start:stop])
        block_r = np.asarray(parent_rows[start:stop])
        if upto == taken:
            yield block_h, block_r
            continue
        keys = np.concatenate([2 * np.arange(start, stop) + 1, 2 * before[taken:upto]])
        order = np.argsort(keys, kind="stable")
        yield (np.concatenate([block_h, new_hashes[taken:upto]])[order],
               np.concatenate([block_r, new_rows[taken:upto]])[order])
        taken = upto
    yield new_hashes[taken:], new_rows[taken:]
