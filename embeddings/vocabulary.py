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

from bahe.ctr_data.parquet_io import SampleReader
from bahe.ctr_data.schema import ITEM_TEXT, DataError

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
        """Add every text not yet known (in sorted order) and add all counts; returns the new ids.

        Texts must be normalised (:func:`normalize_texts`) and non-empty, counts integers >= 0.
        Everything is checked before anything changes: a refused call leaves the vocabulary as it was.
        """
        bad_count = next(((t, n) for t, n in counts.items()
                          if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0), None)
        if bad_count is not None:
            raise ValueError(f"extend() takes occurrence counts >= 0; got {bad_count[1]!r} for {bad_count[0]!r}")
        new = sorted(t for t in counts if t not in self._index)
        not_text = next((t for t in new if not isinstance(t, str)), None)
        if not_text is not None:
            raise ValueError(f"extend() takes texts (str); got {type(not_text).__name__} {not_text!r}")
        if new:
            normalised = normalize_texts(pa.array(new, pa.string())).to_pylist()
            bad = next((t for t, n in zip(new, normalised) if not t or t != n), None)
            if bad is not None:
                raise ValueError(f"extend() takes normalised, non-empty texts; got {bad!r} (normalise it with "
                                 "bahe.embeddings.vocabulary.normalize_texts; empty texts map to PAD_ID)")
        new_ids = list(range(len(self.texts), len(self.texts) + len(new)))
        for text, i in zip(new, new_ids):
            self._index[text] = i
        self.texts.extend(new)
        self.counts.extend([0] * len(new))
        for text, n in counts.items():
            self.counts[self._index[text]] += int(n)
        return new_ids

    def lookup(self, texts: Iterable[str]) -> list[int]:
        """Ids of texts: PAD_ID for an empty text, UNKNOWN_ID (counted) for one never encoded."""
        return self.lookup_array(pa.array(list(texts), pa.string())).tolist()

    def lookup_array(self, texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Vectorised :meth:`lookup` over an Arrow string array; returns int64 ids.

        Each text not in the vocabulary adds one to :attr:`unknown_lookups` (empty texts do not:
        they are padding). A null is refused: a missing text is the empty text. The cost follows the
        batch's distinct texts, not the vocabulary (a store's readers use its memory-mapped
        :class:`~bahe.embeddings.text_index.TextIndex` instead, with the same semantics).
        """
        if texts.null_count:
            first = int(np.flatnonzero(texts.is_null().to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"lookup: text {first} is null; a missing text is the empty text ''")
        if isinstance(texts, pa.ChunkedArray):
            texts = texts.combine_chunks()
        encoded = pc.dictionary_encode(texts)  # each distinct text normalised and looked up once
        index = self._index
        distinct = np.fromiter((PAD_ID if not text else index.get(text, UNKNOWN_ID)
                                for text in normalize_texts(encoded.dictionary).to_pylist()), dtype=np.int64,
                               count=len(encoded.dictionary))
        ids = distinct[encoded.indices.to_numpy(zero_copy_only=False)]
        self.unknown_lookups += int(np.count_nonzero(ids == UNKNOWN_ID))
        return ids

    # Parquet ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        table = pa.table({"id": list(range(len(self.texts))), "text": self.texts, "count": self.counts},
                         schema=VOCAB_SCHEMA)
        pq.write_table(table, path, compression="zstd")

    @classmethod
    def load(cls, path: str | os.PathLike) -> BehaviourVocabulary:
        """Every text and count of a vocabulary file as Python objects (the store's writer, audits); a store's
        readers resolve texts through its memory-mapped text index instead (bahe.embeddings.text_index)."""
        table = read_vocab_table(path)
        return cls(table.column("text").to_pylist(), table.column("count").to_pylist())


def read_vocab_table(path: str | os.PathLike, columns: tuple[str, ...] = ("id", "text", "count")) -> pa.Table:
    """A vocabulary file's ``columns`` as an Arrow table (no Python object per text), checked vectorised: ids
    0..n-1 in order, no nulls, the reserved rows first, every other text non-empty, normalised and unique,
    counts >= 0. A bad file raises a DataError naming the file, row and field."""
    path = Path(path)
    try:
        found = pq.read_schema(path)
        missing = [f.name for f in VOCAB_SCHEMA if found.get_field_index(f.name) < 0]
        if missing:
            raise pa.ArrowInvalid(f"it has columns {found.names}, not {missing}")
        table = pq.read_table(path, schema=VOCAB_SCHEMA, columns=list(columns))
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"not a vocabulary file (id, text, count): {err}", path=path) from None
    if "id" in columns:
        ids = table.column("id").to_numpy()
        wrong = np.flatnonzero(ids != np.arange(len(ids)))
        if len(wrong):
            bad = int(wrong[0])
            raise DataError(f"ids must be 0..n-1 in order; found {int(ids[bad])} at position {bad}", path=path,
                            row=bad, field="id")
    for name in ("text", "count"):
        if name in columns and table.column(name).null_count:
            row = int(np.flatnonzero(table.column(name).is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError("missing value (null); rebuild the store", path=path, row=row, field=name)
    if "text" in columns:
        head = table.column("text").slice(0, len(RESERVED)).to_pylist()
        if head != list(RESERVED):
            raise DataError(f"the first rows must be the reserved {list(RESERVED)}, found {head}", path=path, row=0,
                            field="text")
        real = table.column("text").slice(len(RESERVED))
        unnormalised = pc.or_(pc.equal(real, ""), pc.not_equal(normalize_texts(real), real))
        if pc.any(unnormalised).as_py():
            row = len(RESERVED) + int(np.flatnonzero(unnormalised.to_numpy(zero_copy_only=False))[0])
            raise DataError(f"text {table.column('text')[row].as_py()!r} is empty or not normalised; the file was not "
                            "written by BehaviourVocabulary.save: rebuild the store", path=path, row=row, field="text")
        if len(pc.unique(real)) != len(real):
            texts = table.column("text").to_pylist()
            seen: set[str] = set()
            row = next(i for i, t in enumerate(texts) if i >= len(RESERVED) and (t in seen or seen.add(t)))
            raise DataError(f"text {texts[row]!r} appears twice; rebuild the store", path=path, row=row, field="text")
    if "count" in columns:
        negative = pc.less(table.column("count"), 0)
        if pc.any(negative).as_py():
            row = int(np.flatnonzero(negative.to_numpy(zero_copy_only=False))[0])
            raise DataError(f"count {table.column('count')[row].as_py()} is negative", path=path, row=row,
                            field="count")
    return table
