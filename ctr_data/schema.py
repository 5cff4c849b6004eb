"""The one sample schema every data source writes and every reader checks.

A sample is one (user, item) impression with a click label. Columns, by role:

=================  =======================  ==================================================
column             Arrow type               meaning
=================  =======================  ==================================================
``label``          int8                     1 = clicked / liked, 0 = not
``timestamp``      int64                    event time (seconds, or row order for Criteo)
``user_id``        int64                    raw user id (hashed into a table by the model)
``item_id``        int64                    raw item id
``cat_<name>``     list<int64>              a categorical feature; a list so multi-valued
                                            features (genres) fit; empty = missing
``dense_<name>``   float32                  a dense feature; finite, never NaN
``item_text``      string                   the target item's text (title); may be empty
``seq_<name>``     list<string>             a named behaviour sequence, OLDEST FIRST; may be
                                            empty
=================  =======================  ==================================================

A dataset is described by a :class:`SampleSchema`: which categorical, dense and sequence names it
has. The schema travels inside each Parquet file's key-value metadata (``bahe.schema``), so a
reader can tell a file's features without guessing from column names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import pyarrow as pa

SCHEMA_METADATA_KEY = b"bahe.schema"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

LABEL, TIMESTAMP, USER_ID, ITEM_ID, ITEM_TEXT = "label", "timestamp", "user_id", "item_id", "item_text"
CAT_PREFIX, DENSE_PREFIX, SEQ_PREFIX = "cat_", "dense_", "seq_"


class DataError(ValueError):
    """Bad input data. The message names the file, the row and the field at fault."""

    def __init__(self, message: str, *, path: object = None, row: int | None = None, field: str | None = None):
        where = []
        if path is not None:
            where.append(f"file {path}")
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.path, self.row, self.field = path, row, field


@dataclass(frozen=True)
class SampleSchema:
    """Names of the categorical, dense and sequence features of a dataset.

    Args:
        categorical: names of ``cat_<name>`` columns (list<int64>).
        dense: names of ``dense_<name>`` columns (float32).
        sequences: names of ``seq_<name>`` behaviour sequences (list<string>, oldest first).
        dataset: a free-form name of the source (``movielens-100k``, ``synthetic``, ``criteo``).

    Example::

        schema = SampleSchema(categorical=("gender",), dense=("age",), sequences=("liked", "disliked"))
        schema.arrow_schema().names  # ['label', 'timestamp', ..., 'seq_liked', 'seq_disliked']
    """

    categorical: tuple[str, ...] = ()
    dense: tuple[str, ...] = ()
    sequences: tuple[str, ...] = ()
    dataset: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for kind in ("categorical", "dense", "sequences"):
            names = tuple(getattr(self, kind))
            object.__setattr__(self, kind, names)
            for name in names:
                if not _NAME.match(name):
                    raise ValueError(
                        f"SampleSchema.{kind}: name {name!r} must be lower-case letters, digits and "
                        "underscores, starting with a letter"
                    )
            if len(set(names)) != len(names):
                raise ValueError(f"SampleSchema.{kind}: duplicate names in {names}")

    # Column names -------------------------------------------------------------------------------
    @property
    def categorical_columns(self) -> list[str]:
        return [CAT_PREFIX + n for n in self.categorical]

    @property
    def dense_columns(self) -> list[str]:
        return [DENSE_PREFIX + n for n in self.dense]

    @property
    def sequence_columns(self) -> list[str]:
        return [SEQ_PREFIX + n for n in self.sequences]

    def arrow_schema(self) -> pa.Schema:
        """The Arrow schema of a sample file, with this object in its metadata."""
        fields = [
            pa.field(LABEL, pa.int8(), nullable=False),
            pa.field(TIMESTAMP, pa.int64(), nullable=False),
            pa.field(USER_ID, pa.int64(), nullable=False),
            pa.field(ITEM_ID, pa.int64(), nullable=False),
        ]
        fields += [pa.field(c, pa.list_(pa.int64()), nullable=False) for c in self.categorical_columns]
        fields += [pa.field(c, pa.float32(), nullable=False) for c in self.dense_columns]
        fields.append(pa.field(ITEM_TEXT, pa.string(), nullable=False))
        fields += [pa.field(c, pa.list_(pa.string()), nullable=False) for c in self.sequence_columns]
        return pa.schema(fields, metadata={SCHEMA_METADATA_KEY: self.to_json().encode()})

    # Serialisation ------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(
            {
                "categorical": list(self.categorical),
                "dense": list(self.dense),
                "sequences": list(self.sequences),
                "dataset": self.dataset,
                "extra": self.extra,
            },
            sort_keys=True,
        )

    @classmethod
    def from_arrow(cls, schema: pa.Schema, path: object = None) -> SampleSchema:
        """Read the schema a sample file carries; a file without one is not a sample file."""
        meta = schema.metadata or {}
        if SCHEMA_METADATA_KEY not in meta:
            raise DataError(
                f"not a BAHE sample file (no {SCHEMA_METADATA_KEY.decode()!r} metadata); "
                "write it with `bahe-data` or bahe.ctr_data.parquet_io.SampleWriter",
                path=path,
            )
        try:
            raw = json.loads(meta[SCHEMA_METADATA_KEY])
            return cls(
                categorical=tuple(raw["categorical"]),
                dense=tuple(raw["dense"]),
                sequences=tuple(raw["sequences"]),
                dataset=raw.get("dataset", ""),
                extra=raw.get("extra", {}),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"corrupt {SCHEMA_METADATA_KEY.decode()!r} metadata: {err}", path=path) from err
