"""The item-cold split, one definition for ``bahe-data movielens --split item_cold`` and ``bahe-data import
--split item_cold``: a seeded share of the items is held out of train -- every row of a cold item goes to
valid or to test (each cold item whole to one of them, seeded, in the valid : test proportion) -- and the
other items' rows are split by time as usual (docs/segments.md, docs/byo_data.md).

Which items: ``round(share * items)`` of the distinct items (sorted), drawn without replacement by numpy's
``default_rng(seed)``; the first ``round(count * valid / (valid + test))`` drawn go to valid, the rest to
test. The same items and seed give the same cold items wherever they come from.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

WARM, COLD_VALID, COLD_TEST = -1, 1, 2  # split codes of :func:`cold_codes` (1 and 2: the SPLITS index)


def split_problem(share: float, column: str | None = None) -> str | None:
    """Why an item-cold split of ``share`` cannot be made (``column``: the importer's own split column);
    None: it can."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < share < 1.0:
        return f"cold_share (--cold-share) must be a share of the items in (0, 1), e.g. 0.2; got {share!r}"
    if column is not None:
        return (f"cold_share (--split item_cold) and column {column!r} (--split-column): your own split says where "
                "every row goes; item_cold holds items out of a split by time (fractions or cuts)")
    return None


def hold_out(items: Iterable[int], share: float, seed: int, valid_test: tuple[float, float] = (1.0, 1.0)
             ) -> tuple[set[int], set[int]]:
    """The cold items: (those whose rows go to valid, those whose rows go to test)."""
    ordered = np.array(sorted(set(items)), dtype=np.int64)
    count = int(round(share * len(ordered)))
    if not 0 < count < len(ordered):
        raise ValueError(f"--cold-share {share} of {len(ordered)} items holds out {count}: choose a share "
                         "that leaves at least one item cold and one warm")
    cold = np.random.default_rng(seed).choice(ordered, size=count, replace=False)
    valid, test = valid_test
    to_valid = int(round(count * valid / (valid + test)))
    return {int(i) for i in cold[:to_valid]}, {int(i) for i in cold[to_valid:]}


def cold_codes(item_ids, valid: set[int], test: set[int]) -> np.ndarray:
    """Per row: COLD_VALID, COLD_TEST, or WARM (int8)."""
    ids = np.asarray(item_ids, dtype=np.int64)
    out = np.full(len(ids), WARM, dtype=np.int8)
    out[np.isin(ids, np.fromiter(valid, dtype=np.int64, count=len(valid)))] = COLD_VALID
    out[np.isin(ids, np.fromiter(test, dtype=np.int64, count=len(test)))] = COLD_TEST
    return out
