"""How much of the text a store's vectors can carry: anisotropy statistics of a sample of its rows.

Mean-pooled shallow LLM states are often nearly collinear: the first token of a text (the attention
sink, with no BOS) has a hidden-state norm an order of magnitude above the others, almost all in a few
channels, and the pool smears it into every vector. Three numbers say how bad it is (issue 17):

* ``mean_cosine``: the mean cosine similarity between the vectors of different texts (1 = all the same
  direction);
* ``top_channel_energy``: the share of the total energy (sum of squares over rows and channels) in the
  ``TOP_CHANNELS`` channels that hold the most of it;
* ``effective_rank``: exp of the entropy of the normalised squared singular values of the (uncentred)
  sample matrix (1 = one direction; up to the dim).

The statistics are of the rows as stored, that is after the store's frozen post-transform (centring
or whitening, bahe.embeddings.post_transform), which is what the model reads.
"""

from __future__ import annotations

import numpy as np

from bahe.embeddings.vocabulary import RESERVED

TOP_CHANNELS = 3


def anisotropy(vectors: np.ndarray) -> dict[str, float]:
    """Statistics of ``vectors`` (n x H, n >= 2); see the module doc."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"anisotropy needs at least 2 vectors (n x H), got shape {x.shape}")
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    gram = unit @ unit.T
    n = len(x)
    mean_cosine = (gram.sum() - np.trace(gram)) / (n * (n - 1))
    energy = (x**2).sum(axis=0)
    top = np.sort(energy)[::-1][:TOP_CHANNELS].sum() / max(energy.sum(), 1e-300)
    singular = np.linalg.svd(x, compute_uv=False) ** 2
    p = singular / max(singular.sum(), 1e-300)
    p = p[p > 0]
    return {"rows": n, "mean_cosine": float(mean_cosine), "top_channel_energy": float(top),
            "effective_rank": float(np.exp(-(p * np.log(p)).sum()))}


def store_anisotropy(store, sample: int = 2000, seed: int = 0) -> dict[str, float]:
    """:func:`anisotropy` of up to ``sample`` text rows of ``store`` (the reserved rows left out), drawn
    with a fixed seed."""
    first, rows = len(RESERVED), store.rows_count
    if rows - first < 2:
        raise ValueError(f"{store.path} holds {rows - first} text row(s): the statistics need at least 2")
    picked = np.sort(np.random.default_rng(seed).choice(np.arange(first, rows), min(sample, rows - first),
                                                        replace=False))
    return anisotropy(np.stack([store.rows(int(i), int(i) + 1)[0] for i in picked]))
