"""A frozen post-transform of a store's vectors from the store's own statistics (issue 17, item 3).

* ``none``: the encoder's pooled vectors as they are;
* ``center``: ``y = x - mean``, the mean over the store's distinct texts;
* ``whiten``: ``y = (x - mean) @ W`` with the ZCA whitening matrix
  ``W = U diag(1 / sqrt(lambda + eps * mean(lambda))) U^T`` of the texts' covariance ``U diag(lambda) U^T``
  (population covariance; ``eps`` is a fraction of the mean eigenvalue, so it does not depend on the
  vectors' scale). Of all whitening matrices ZCA moves the vectors least: the channels keep their
  meaning, which the LLM's deep layers (initialised from the model's own weights) read.

The statistics are fitted ONCE, on the distinct texts of the store's first build, and frozen: every
later version copies the file unchanged and transforms only its new rows with it, so old rows stay
byte-identical and a refresh never refits. The pad and unknown rows are never transformed (they stay
zero). The rows are stored transformed: the store's rows are the frozen table every reader (trainer,
serving caches, exports) takes as it is, so none of them needs to know about the transform.

File ``post_transform.npy`` (float64, pickle-free): ``1 x H`` (the mean) for center, ``(1 + H) x H`` (the
mean, then W) for whiten; its SHA-256 is ``post_transform_sha256`` in the manifest's encoder section.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

POST_TRANSFORMS = ("none", "center", "whiten")
POST_TRANSFORM_FILE = "post_transform.npy"
APPLY_BLOCK_ROWS = 4096  # rows transformed at a time (bounded memory)


@dataclass(frozen=True)
class PostTransform:
    """A fitted post-transform. ``mean``: H float64; ``matrix``: H x H float64 (whiten) or None (center)."""

    kind: str
    mean: np.ndarray
    matrix: np.ndarray | None = None

    @classmethod
    def fit(cls, kind: str, blocks: Callable[[], Iterable[np.ndarray]], eps: float) -> PostTransform:
        """Fit on every row of ``blocks()`` (called twice: a pass for the mean, one for the covariance;
        each yields n_i x H arrays). Whiten needs at least 2 rows that are not all equal."""
        if kind not in POST_TRANSFORMS[1:]:
            raise ValueError(f"post-transform must be one of {POST_TRANSFORMS[1:]} to fit, got {kind!r}")
        total, rows = None, 0
        for block in blocks():
            block = np.asarray(block, dtype=np.float64)
            total = block.sum(axis=0) if total is None else total + block.sum(axis=0)
            rows += len(block)
        if not rows:
            raise ValueError("no rows to fit the post-transform on")
        mean = total / rows
        if kind == "center":
            return cls(kind, mean)
        scatter = np.zeros((len(mean), len(mean)))
        for block in blocks():
            centred = np.asarray(block, dtype=np.float64) - mean
            scatter += centred.T @ centred
        eigenvalues, vectors = np.linalg.eigh(scatter / rows)
        eigenvalues = np.clip(eigenvalues, 0.0, None)
        floor = eps * eigenvalues.mean()
        if rows < 2 or floor <= 0:
            raise ValueError(f"whitening needs at least 2 texts whose vectors differ; got {rows} row(s) with "
                             f"total variance {eigenvalues.sum():.3g}")
        matrix = (vectors / np.sqrt(eigenvalues + floor)) @ vectors.T
        return cls(kind, mean, (matrix + matrix.T) / 2)

    def apply(self, rows: np.ndarray) -> np.ndarray:
        """n x H float32 -> n x H float32, row by row in a fixed order: a row's result is byte-identical
        whichever rows share its call (a BLAS product may block rows differently by n)."""
        rows = np.asarray(rows)
        out = np.empty(rows.shape, dtype=np.float32)
        for start in range(0, len(rows), APPLY_BLOCK_ROWS):
            centred = rows[start:start + APPLY_BLOCK_ROWS].astype(np.float64) - self.mean
            if self.matrix is None:
                out[start:start + len(centred)] = centred
                continue
            result, term = np.zeros_like(centred), np.empty_like(centred)
            for channel in range(centred.shape[1]):  # result += x[:, h] * W[h], h = 0, 1, ...: one order
                np.multiply(centred[:, channel:channel + 1], self.matrix[channel], out=term)
                result += term
            out[start:start + len(centred)] = result
        return out

    def to_array(self) -> np.ndarray:
        top = self.mean[None, :]
        return np.ascontiguousarray(top if self.matrix is None else np.concatenate([top, self.matrix]),
                                    dtype=np.float64)

    @classmethod
    def from_array(cls, kind: str, array: np.ndarray, dim: int, source: object) -> PostTransform:
        """Read back :meth:`to_array`; a shape that does not fit ``kind`` and ``dim`` is refused naming ``source``."""
        want = (1, dim) if kind == "center" else (1 + dim, dim)
        if kind not in POST_TRANSFORMS[1:] or array.shape != want or array.dtype != np.float64:
            raise ValueError(f"{source} holds {array.shape} {array.dtype}, not the {want} float64 statistics of a "
                             f"{kind!r} post-transform of {dim}-dim vectors")
        return cls(kind, array[0].copy(), array[1:].copy() if kind == "whiten" else None)

    @classmethod
    def load(cls, path: Path, kind: str, dim: int) -> PostTransform:
        return cls.from_array(kind, np.load(path, allow_pickle=False), dim, path)
