"""Atomic behaviour encoding: texts -> one d-dim vector each, from the LLM's first k layers.

``E[a] = pool(LLM_low(tokens(a)))`` (bahe.md, step 1), under ``torch.no_grad``.

Batching is by EXACT token length, so no row carries padding and no attention mask is needed.
Every micro-batch of length-L texts has the same shape ``rows(L) x L`` with
``rows(L) = max(1, batch_tokens // L)``; the last batch of a length is filled up with copies of its
first row. Matrix kernels pick their blocking from the shape, so a fixed shape per length makes a
text's vector independent of which other texts it was batched with: an incremental refresh, a
resumed run or a run split across ranks give byte-identical vectors to a from-scratch run. The
price is the filler rows of each length's last batch; :class:`EncodeStats` counts them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from bahe.embeddings.encoding import POOLINGS
from bahe.embeddings.post_transform import POST_TRANSFORMS
from bahe.embeddings.pretrained import DEFAULT_MODEL, ModelError, load_shallow_layers, resolve_model_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class EncoderConfig:
    """How behaviour texts are encoded.

    Args:
        model: a model alias (``smollm2-135m``, ``minilm-l6``) or a local Hugging Face directory.
        k: number of shallow (frozen) layers that encode a text; the rest are never computed.
        pooling: how a text's token states become one vector (:func:`pool_tokens`): ``mean`` over its
            tokens, the ``last`` token's state, ``mean_skip_first`` (position 0 left out) or
            ``mean_skip_massive`` (tokens of a massive norm left out).
        massive_factor: ``mean_skip_massive`` leaves out every token whose hidden-state norm exceeds this
            many times the text's smallest token norm (>= 1, so the smallest is always kept).
        post_transform: ``none``, ``center`` or ``whiten``: a transform of the store's rows fitted once on its
            first build and frozen (embeddings/post_transform.py); the encoder itself ignores it.
        whiten_eps: whitening's regulariser, a fraction of the covariance's mean eigenvalue.
        dtype: compute dtype, ``float32`` or ``bfloat16``; vectors come out as float32 (the store's own
            dtype, ``--store-dtype``, is the writer's: embeddings/build_io.py).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available).
        max_tokens: longer texts are truncated to this many tokens (counted and reported).
        batch_tokens: tokens per micro-batch; fixes the batch shape per text length (module doc).
            128 keeps the filler under 10% even on a small store such as MovieLens' 1,664 titles
            (docs/bench/encode.md); raise it on a GPU, where bigger batches pay.
        fixed_shapes: fill each length's last micro-batch up to the fixed shape, so vectors are
            byte-identical however texts are batched (default). False skips the filler: less
            compute on small stores, but vectors may then differ in the last bits between runs.
        trust_remote_code: let transformers run code shipped with the model (off: safe default).
    """

    model: str = DEFAULT_MODEL
    k: int = 6
    pooling: str = "mean"
    massive_factor: float = 4.0
    post_transform: str = "none"
    whiten_eps: float = 1e-4
    dtype: str = "float32"
    device: str = "auto"
    max_tokens: int = 64
    batch_tokens: int = 128
    fixed_shapes: bool = True
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"EncoderConfig.k must be >= 1 shallow layer, got {self.k}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"EncoderConfig.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not self.massive_factor >= 1.0:
            raise ValueError(f"EncoderConfig.massive_factor must be >= 1 (the smallest-norm token is always kept), "
                             f"got {self.massive_factor}")
        if self.post_transform not in POST_TRANSFORMS:
            raise ValueError(f"EncoderConfig.post_transform must be one of {POST_TRANSFORMS}, got {self.post_transform!r}")
        if not self.whiten_eps > 0:
            raise ValueError(f"EncoderConfig.whiten_eps must be > 0, got {self.whiten_eps}")
        if self.dtype not in DTYPES:
            raise ValueError(f"EncoderConfig.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.max_tokens < 1:
            raise ValueError(f"EncoderConfig.max_tokens must be >= 1, got {self.max_tokens}")
        if self.batch_tokens < self.max_tokens:
            raise ValueError(f"EncoderConfig.batch_tokens ({self.batch_tokens}) must be >= max_tokens "
                             f"({self.max_tokens}) so a longest text fits in one micro-batch")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"EncoderConfig.device must be auto, cpu or cuda[:N], got {self.device!r}")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(f"device {self.device!r} asked for, but CUDA is not available here; use cpu or auto")
        return torch.device(self.device)


def pool_tokens(hidden: torch.Tensor, pooling: str, massive_factor: float = 4.0) -> torch.Tensor:
    """One vector per text from its token states: rows x L x D -> rows x D (every row L real tokens).

    * ``mean``: the mean over the L tokens;
    * ``last``: the state of token L-1;
    * ``mean_skip_first``: the mean over tokens 1..L-1 (a 1-token text keeps its token). Position 0 is
      the attention sink: SmolLM2 adds no BOS, so it is the text's first word (hidden-state norm 640-920
      against about 80, issue 17); Gemma's tokenizer prepends ``<bos>``, so there it is ``<bos>`` (the
      sink, norm about 10x the others) and the first word is kept; a BERT-style tokenizer's ``[CLS]``;
    * ``mean_skip_massive``: the mean over the tokens whose norm is at most ``massive_factor`` times the
      text's smallest token norm (norms in float32; the smallest one is always kept).
    """
    if pooling == "mean":
        return hidden.mean(dim=1)
    if pooling == "last":
        return hidden[:, -1]
    if pooling == "mean_skip_first":
        return hidden[:, 1:].mean(dim=1) if hidden.shape[1] > 1 else hidden[:, 0]
    if pooling == "mean_skip_massive":
        states = hidden.float()
        norms = states.norm(dim=-1)  # rows x L
        keep = (norms <= massive_factor * norms.min(dim=1, keepdim=True).values).float()
        return (states * keep.unsqueeze(-1)).sum(dim=1) / keep.sum(dim=1, keepdim=True)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


@dataclass
class EncodeStats:
    texts: int = 0
    tokens: int = 0  # real tokens encoded
    computed_tokens: int = 0  # tokens the model ran, filler rows included
    truncated: int = 0  # texts cut to max_tokens
    seconds: float = 0.0
    length_histogram: dict[int, int] = field(default_factory=dict)

    @property
    def padding_waste(self) -> float:
        """Share of computed tokens that were filler."""
        return 1.0 - self.tokens / self.computed_tokens if self.computed_tokens else 0.0

    def add(self, other: EncodeStats) -> None:
        self.texts += other.texts
        self.tokens += other.tokens
        self.computed_tokens += other.computed_tokens
        self.truncated += other.truncated
        self.seconds += other.seconds
        for length, n in other.length_histogram.items():
            self.length_histogram[length] = self.length_histogram.get(length, 0) + n


class ShallowEncoder:
    """Encodes texts with the first ``config.k`` layers of a local LLM.

    Example::

        encoder = ShallowEncoder(EncoderConfig(model="minilm-l6", k=3))
        vectors, stats = encoder.encode(["Purchase at Starbucks", "Search: flights"])  # 2 x 384
    """

    def __init__(self, config: EncoderConfig):
        self.config = config
        self.model_dir = resolve_model_dir(config.model)
        self.device = config.resolved_device()
        self.model, self.tokenizer = load_shallow_layers(
            self.model_dir, config.k, dtype=DTYPES[config.dtype], device=self.device,
            trust_remote_code=config.trust_remote_code)
        self.dim = int(self.model.config.hidden_size)

    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], int]:
        """Token ids per text, truncated to max_tokens; returns (ids, number truncated)."""
        ids = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        cap = self.config.max_tokens
        too_long = [i for i, x in enumerate(ids) if len(x) > cap]
        if too_long:  # the tokenizer's own truncation keeps its special tokens (e.g. BERT's [SEP])
            cut = self.tokenizer([texts[i] for i in too_long], add_special_tokens=True, truncation=True,
                                 max_length=cap)["input_ids"]
            for i, x in zip(too_long, cut):
                ids[i] = x
        truncated = len(too_long)
        for text, x in zip(texts, ids):
            if not x:
                raise ValueError(f"text {text!r} tokenises to nothing; empty texts map to the PAD id, not the encoder")
        return ids, truncated

    def rows_per_batch(self, length: int) -> int:
        return max(1, self.config.batch_tokens // length)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], progress: Callable[[int, int], None] | None = None
               ) -> tuple[np.ndarray, EncodeStats]:
        """Vectors for ``texts`` (n x D float32, in input order) and what it cost.

        ``progress(texts_done, tokens_done)`` is called after every micro-batch.
        """
        start = time.perf_counter()
        token_ids, truncated = self.tokenize(texts)
        stats = EncodeStats(texts=len(texts), truncated=truncated)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        by_length: dict[int, list[int]] = defaultdict(list)
        for index, ids in enumerate(token_ids):
            by_length[len(ids)].append(index)
        for length in sorted(by_length):
            members = by_length[length]
            stats.length_histogram[length] = len(members)
            rows = self.rows_per_batch(length)
            for offset in range(0, len(members), rows):
                chunk = members[offset: offset + rows]
                batch = [token_ids[i] for i in chunk]
                if self.config.fixed_shapes:
                    batch += [batch[0]] * (rows - len(batch))  # filler keeps the shape fixed
                input_ids = torch.tensor(batch, dtype=torch.long, device=self.device)
                hidden = self.model(input_ids=input_ids).last_hidden_state  # rows x L x D
                pooled = pool_tokens(hidden, self.config.pooling, self.config.massive_factor)
                out[chunk] = pooled[: len(chunk)].float().cpu().numpy()
                stats.tokens += len(chunk) * length
                stats.computed_tokens += len(batch) * length
                if progress is not None:
                    progress(len(chunk), len(chunk) * length)
        stats.seconds = time.perf_counter() - start
        return out, stats
