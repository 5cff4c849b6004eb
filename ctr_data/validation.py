"""Checks of sample batches against the schema (see :mod:`bahe.ctr_data.schema`), shared by the
writer and the reader of :mod:`bahe.ctr_data.parquet_io`: one vectorised kernel per column, and only a
batch already known to be bad is searched for its first bad row. Every check raises
:class:`~bahe.ctr_data.schema.DataError` naming the file, the row and the field.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bahe.ctr_data.schema import DENSE_PREFIX, LABEL, DataError, SampleSchema


def is_integer_type(dtype: pa.DataType) -> bool:
    return pa.types.is_integer(dtype) or (pa.types.is_list(dtype) and pa.types.is_integer(dtype.value_type))


def is_floating_type(dtype: pa.DataType) -> bool:
    return pa.types.is_floating(dtype) or (pa.types.is_list(dtype) and pa.types.is_floating(dtype.value_type))


def _first_true(mask: pa.Array | pa.ChunkedArray) -> int:
    return int(np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool))[0])


def _first_invalid_utf8(texts: pa.Array) -> int | None:
    """Index of the first text of a string array that is not valid UTF-8, or None. One vectorised check;
    only an array known to be bad is bisected (a slice validates only its own values)."""
    def valid(lo: int, hi: int) -> bool:
        try:
            texts.slice(lo, hi - lo).validate(full=True)
            return True
        except pa.ArrowInvalid:
            return False

    if valid(0, len(texts)):
        return None
    lo, hi = 0, len(texts)
    while hi - lo > 1:  # [lo, hi) holds the first bad text
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if valid(lo, mid) else (lo, mid)
    return lo


def _check_utf8(col: pa.Array, *, path: object, row_offset: int, field: str) -> None:
    """Texts another tool wrote as bytes declared as string: refused by file, row and field."""
    texts = col.flatten() if pa.types.is_list(col.type) else col
    bad = _first_invalid_utf8(texts)
    if bad is None:
        return
    row = pc.list_parent_indices(col)[bad].as_py() if texts is not col else bad
    element = bad - (col.offsets[row].as_py() - col.offsets[0].as_py()) if texts is not col else None
    where = f" (element {element} of the list)" if texts is not col else ""
    raw = texts.view(pa.binary())[bad].as_py()
    raise DataError(f"text{where} is not valid UTF-8: {raw[:60]!r}; write texts as UTF-8 (decode them with their "
                    "real encoding, or replace the bad bytes)", path=path, row=row_offset + row, field=field)


def _check_nonnegative(col: pa.Array, *, path: object, row_offset: int, field: str) -> None:
    """An ID column (or a list of ids) with a negative id: refused by file, row and field."""
    ids = col.flatten() if pa.types.is_list(col.type) else col
    negative = pc.less(ids, 0)
    if not pc.any(negative).as_py():
        return
    bad = _first_true(negative)
    row = pc.list_parent_indices(col)[bad].as_py() if ids is not col else bad
    raise DataError(f"ids must be >= 0, found {ids[bad].as_py()}; ids are hashed into the table (id % rows), so map "
                    "negative ids to non-negative ones when writing the data", path=path, row=row_offset + row,
                    field=field)


def duplicated_names(names: list[str]) -> list[str]:
    return sorted({name for name in names if names.count(name) > 1})


def same_type(found: pa.DataType, expected: pa.DataType) -> bool:
    """Whether a file's column type is the schema's: lists compare their value types only (a Parquet
    file names its list items 'element', Arrow 'item'); otherwise the types must be equal."""
    if pa.types.is_list(expected):
        return pa.types.is_list(found) and same_type(found.value_type, expected.value_type)
    return found.equals(expected)


def _first_uncastable(values: pa.Array, target: pa.DataType) -> int:
    for i in range(len(values)):
        try:
            values.take([i]).cast(target)  # take, not slice: a sliced list still casts all its values
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            return i
    return 0


def validate_batch(batch: pa.RecordBatch | pa.Table, schema: SampleSchema, *, path: object, row_offset: int,
                   nonnegative: Collection[str] = ()) -> pa.Table:
    """Check and cast one batch to ``schema``; returns it as a Table with the exact Arrow schema.

    Raises DataError for a missing or duplicated column, a value of the wrong type, a null, a text
    that is not valid UTF-8, a label outside {0, 1}, a non-finite dense value (NaN, +-inf, or a
    float64 beyond the float32 range) or a negative id in a column named in ``nonnegative``, naming
    the row (``row_offset`` + index) and the field. Every check is one vectorised kernel over the
    column; only a batch already known to be bad is searched for its first bad row. Columns the
    schema lacks are ignored here (a reader selects its columns); :class:`SampleWriter` refuses them.
    """
    table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
    target = schema.arrow_schema()
    twice = duplicated_names(table.column_names)
    if twice:
        raise DataError(f"column(s) {twice} appear more than once; a sample file has each column once: drop or "
                        "rename the copies", path=path, field=twice[0])
    missing = [name for name in target.names if name not in table.column_names]
    if missing:
        extra = [name for name in table.column_names if name not in target.names]
        hint = f"; the data has column(s) the schema lacks, a typo? {extra}" if extra else ""
        raise DataError(f"missing column(s) {missing}; the schema needs {target.names}{hint}", path=path,
                        field=missing[0])
    columns = []
    for fld in target:
        col = given = table.column(fld.name).combine_chunks()
        if not col.type.equals(fld.type):
            try:
                col = col.cast(fld.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
                row = _first_uncastable(col, fld.type)
                raise DataError(
                    f"value {col[row].as_py()!r} is not {fld.type} ({err})",
                    path=path, row=row_offset + row, field=fld.name,
                ) from None
        if col.null_count:
            raise DataError("missing value (null); use an empty list / empty text / 0 instead",
                            path=path, row=row_offset + _first_true(col.is_null()), field=fld.name)
        if pa.types.is_list(fld.type):
            flat = col.flatten()
            if flat.null_count:
                owners = pc.list_parent_indices(col)
                bad = owners[_first_true(flat.is_null())].as_py()
                raise DataError("null element inside a list", path=path, row=row_offset + bad, field=fld.name)
        if fld.type in (pa.string(), pa.list_(pa.string())):
            _check_utf8(col, path=path, row_offset=row_offset, field=fld.name)
        if fld.name in nonnegative:
            _check_nonnegative(col, path=path, row_offset=row_offset, field=fld.name)
        if fld.name == LABEL:
            bad_label = pc.invert(pc.is_in(col, pa.array([0, 1], pa.int8())))
            if pc.any(bad_label).as_py():
                row = _first_true(bad_label)
                raise DataError(f"label must be 0 or 1, got {col[row].as_py()}", path=path,
                                row=row_offset + row, field=fld.name)
        if fld.name.startswith(DENSE_PREFIX):
            not_finite = pc.invert(pc.is_finite(col))
            if pc.any(not_finite).as_py():
                row = _first_true(not_finite)
                value = given[row].as_py()
                why = " (beyond the float32 range)" if isinstance(value, (int, float)) and np.isfinite(value) else ""
                raise DataError(f"dense value must be finite, got {value!r}{why}; replace NaN / inf (e.g. by 0, "
                                "the missing-value convention) before writing", path=path, row=row_offset + row,
                                field=fld.name)
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=target)
