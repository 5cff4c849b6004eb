"""Per-chunk digests of a behaviour store's rows (issue 28, item 3): the manifest's ``row_chunks`` section.

Chunk i holds rows [stops[i - 1] (0 for the first), stops[i]); the manifest records the SHA-256 of its rows'
bytes in ``vectors.npy`` (as stored, C order) and of its texts (:func:`texts_digest`). A new store cuts its
rows into chunks of :data:`DIGEST_CHUNK_BYTES`; a refresh keeps its parent's chunks (digests carried over)
and cuts its new rows from the parent's last row on, so every ancestor's row count is a chunk boundary
(bahe.embeddings.store explains who checks what).
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from pathlib import Path

ROW_CHUNKS = "row_chunks"
DIGEST_CHUNK_BYTES = 64 << 20  # a new store's digest chunks: this many bytes of rows each (a refresh keeps its parent's)


def texts_digest(texts) -> str:
    """SHA-256 of texts in order: per text, its UTF-8 byte count (8 bytes, little-endian), then the bytes."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def digest_chunk_rows(dim: int, itemsize: int) -> int:
    """Rows per digest chunk of a new store: :data:`DIGEST_CHUNK_BYTES` of rows, at least one."""
    return max(1, DIGEST_CHUNK_BYTES // max(dim * itemsize, 1))


@dataclass(frozen=True)
class RowChunks:
    """The manifest's ``row_chunks``: chunk i holds rows [stops[i - 1] (0 for the first), stops[i]) and has the
    digests ``vectors[i]`` (its rows' bytes in vectors.npy) and ``texts[i]`` (:func:`texts_digest`);
    ``rows_per_chunk``: the size new chunks are cut at (the first build's, kept by every refresh)."""

    rows_per_chunk: int
    stops: tuple[int, ...]
    vectors: tuple[str, ...]
    texts: tuple[str, ...]

    @classmethod
    def from_manifest(cls, manifest: dict, path: Path) -> RowChunks | None:
        """The manifest's section (None: a store written before it); ValueError naming ``path`` if malformed."""
        section = manifest.get(ROW_CHUNKS)
        if section is None:
            return None
        try:
            chunks = cls(int(section["rows_per_chunk"]), tuple(int(s) for s in section["stops"]),
                         tuple(section["vectors_sha256"]), tuple(section["texts_sha256"]))
            ok = chunks.rows_per_chunk >= 1 and len(chunks.stops) == len(chunks.vectors) == len(chunks.texts) and \
                all(a < b for a, b in zip((0, *chunks.stops), chunks.stops)) and \
                (chunks.stops[-1] if chunks.stops else 0) == int(manifest["rows"])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{path / 'manifest.json'}: its {ROW_CHUNKS} section does not cut the {manifest.get('rows')} rows "
                             "into chunks with one digest each; rebuild this version with bahe-encode")
        return chunks

    def as_manifest(self) -> dict:
        return {"rows_per_chunk": self.rows_per_chunk, "stops": list(self.stops), "vectors_sha256": list(self.vectors),
                "texts_sha256": list(self.texts)}

    def span(self, i: int) -> tuple[int, int]:
        return (self.stops[i - 1] if i else 0), self.stops[i]

    def overlapping(self, start: int, stop: int) -> range:
        """The indices of the chunks that hold any of rows [start, stop)."""
        if stop <= start:
            return range(0)
        return range(bisect.bisect_right(self.stops, start), bisect.bisect_left(self.stops, stop) + 1)

    def up_to(self, rows: int) -> int | None:
        """How many chunks make up exactly the first ``rows`` rows (None: ``rows`` is not a chunk boundary)."""
        if rows == 0:
            return 0
        n = bisect.bisect_left(self.stops, rows)
        return n + 1 if n < len(self.stops) and self.stops[n] == rows else None


def chunk_problem(path: Path, chunks: RowChunks, i: int, actual: str, who: str = "") -> str:
    """One line: chunk ``i``'s rows in ``path`` do not match the manifest's digest."""
    start, stop = chunks.span(i)
    return (f"{path}: rows [{start}, {stop}) (checksum chunk {i + 1} of {len(chunks.stops)}{who}): sha256 "
            f"{actual[:12]}... does not match the manifest's {chunks.vectors[i][:12]}...; the file changed after the "
            "store was written: restore it or rebuild this version with bahe-encode build (bahe-encode verify STORE "
            "checks a store)")


class ChunkHasher:
    """The digests of the rows written from row ``first`` on, cut at ``stops`` (absolute end rows), fed
    block by block in row order (``write_vectors``'s ``on_block``); rows before ``first`` are not hashed (a
    refresh's parent rows: their digests are carried over). ``done``: the finished chunks' digests."""

    def __init__(self, first: int, stops: list[int]):
        self.first, self.stops, self.row = first, list(stops), 0
        self.done: list[str] = []
        self._digest = hashlib.sha256()

    def __call__(self, block) -> None:
        start, self.row = self.row, self.row + len(block)
        at = max(self.first - start, 0)
        while at < len(block) and len(self.done) < len(self.stops):
            end = min(len(block), self.stops[len(self.done)] - start)
            self._digest.update(block[at:end])
            at = end
            if start + end == self.stops[len(self.done)]:
                self.done.append(self._digest.hexdigest())
                self._digest = hashlib.sha256()
