"""The behaviour vocabulary: every distinct behaviour text (and item title) with a stable id.

Normalisation (:func:`normalize_texts`, vectorised with pyarrow; :func:`normalize_text` for one),
applied before two texts are compared: Unicode NFC, every run of whitespace (ASCII whitespace and
Unicode separators such as the non-breaking space) collapsed to one space, leading / trailing
whitespace removed. Case, punctuation, digits, non-ASCII letters and emoji are
kept: they carry meaning for the LLM ("Purchase Starbucks" and "purchase starbucks" stay two texts).

Ids: ``PAD_ID`` (0) pads sequences and stands for an empty text; ``UNKNOWN_ID`` (1) is a text the
store has not encoded yet (counted by :meth:`BehaviourVocabulary.lookup`). Real texts start at 2 and
an id once given never changes: :meth:`BehaviourVocabulary.extend` only appends, new texts in
sorted order so that the same data always gives the same ids.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ctr_data.parquet_io import SampleReader
from ctr_data.schema import ITEM_TEXT, DataError

PAD_ID = 0
UNKNOWN_ID = 1
RESERVED = ("<pad>", "<unknown>")
_WHITESPACE = r"[\s\pZ\x{0085}\x{000b}]+"  # RE2 syntax (pyarrow.compute)
VOCAB_SCHEMA = pa.schema([pa.field("id", pa.int64(), False), pa.field("text", pa.string(), False),
                          pa.field("count", pa.int64(), False)])


def normalize_texts(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """NFC, whitespace runs -> one space, stripped (see the module docstring); string -> string."""
    nfc = pc.utf8_normalize(texts, "NFC")
    return pc.utf8_trim(pc.replace_substring_regex(nfc, _WHITESPACE, " "), " ")


def normalize_text(text: str) -> str:
    return normalize_texts(pa.array([text], pa.string()))[0].as_py()


def count_texts(paths: Iterable[str | os.PathLike], *, include_item_text: bool = True) -> Counter:
    """Occurrences of every normalised text in the sequences (and item texts) of sample files.

    Streams each file batch by batch; empty texts are not counted (they map to PAD_ID).
    """
    counts: Counter = Counter()
    for path in paths:
        reader = SampleReader(path)
        columns = list(reader.schema.sequence_columns) + ([ITEM_TEXT] if include_item_text else [])
        for table in reader.iter_batches():
            for name in columns:
                column = table.column(name)
                flat = pc.list_flatten(column) if pa.types.is_list(column.type) else column
                for value in pc.value_counts(normalize_texts(flat)).to_pylist():
                    if value["values"]:
                        counts[value["values"]] += value["counts"]
    return counts


class BehaviourVocabulary:
    """Distinct normalised texts <-> ids, with occurrence counts.

    Example::

        vocab = BehaviourVocabulary()
        new_ids = vocab.extend(Counter({"Toy Story (1995)": 3}))   # [2]
        vocab.lookup(["Toy Story  (1995)", "never seen", ""])        # [2, 1, 0]
    """

    def __init__(self, texts: list[str] | None = None, counts: list[int] | None = None):
        self.texts: list[str] = list(texts) if texts is not None else list(RESERVED)
        self.counts: list[int] = list(counts) if counts is not None else [0] * len(self.texts)
        if self.texts[: len(RESERVED)] != list(RESERVED) or len(self.counts) != len(self.texts):
            raise ValueError("a vocabulary starts with the reserved rows <pad>, <unknown> and has one count per text")
        self._index = {text: i for i, text in enumerate(self.texts) if i >= len(RESERVED)}
        self.unknown_lookups = 0

    def __len__(self) -> int:
        return len(self.texts)

    def __contains__(self, text: str) -> bool:
        return normalize_text(text) in self._index

    def extend(self, counts: Counter) -> list[int]:
        """Add every text not yet known (in sorted order) and add all counts; returns the new ids."""
        new_ids = []
        for text in sorted(t for t in counts if t not in self._index):
            if not text or text != normalize_text(text):
                raise ValueError(f"extend() takes normalised, non-empty texts; got {text!r}")
            self._index[text] = len(self.texts)
            new_ids.append(len(self.texts))
            self.texts.append(text)
            self.counts.append(0)
        for text, n in counts.items():
            self.counts[self._index[text]] += n
        return new_ids

    def lookup(self, texts: Iterable[str]) -> list[int]:
        """Ids of texts: PAD_ID for an empty text, UNKNOWN_ID (counted) for one never encoded."""
        return self.lookup_array(pa.array(list(texts), pa.string())).tolist()

    def lookup_array(self, texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Vectorised :meth:`lookup` over an Arrow string array; returns int64 ids."""
        if getattr(self, "_value_set_size", -1) != len(self.texts):  # the reserved rows never match a text
            self._value_set = pa.array(["\x00pad", "\x00unknown", *self.texts[len(RESERVED):]], pa.string())
            self._value_set_size = len(self.texts)
        norm = normalize_texts(texts)
        found = pc.index_in(norm, value_set=self._value_set)
        empty = pc.equal(norm, "").to_numpy(zero_copy_only=False)
        missing = found.is_null().to_numpy(zero_copy_only=False) & ~empty
        self.unknown_lookups += int(missing.sum())
        ids = found.fill_null(UNKNOWN_ID).to_numpy(zero_copy_only=False).astype(np.int64)
        ids[empty] = PAD_ID
        return ids

    # Parquet ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        table = pa.table({"id": list(range(len(self.texts))), "text": self.texts, "count": self.counts},
                         schema=VOCAB_SCHEMA)
        pq.write_table(table, path, compression="zstd")

    @classmethod
    def load(cls, path: str | os.PathLike) -> BehaviourVocabulary:
        path = Path(path)
        try:
            table = pq.read_table(path, schema=VOCAB_SCHEMA)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"not a vocabulary file (id, text, count): {err}", path=path) from None
        ids = table.column("id").to_pylist()
        if ids != list(range(len(ids))):
            bad = next(i for i, v in enumerate(ids) if v != i)
            raise DataError(f"ids must be 0..n-1 in order; found {ids[bad]} at position {bad}", path=path, row=bad,
                            field="id")
        return cls(table.column("text").to_pylist(), table.column("count").to_pylist())
