"""The exported predictor: a request's dense features, ID features and cached text features -> logits.

BAHE's text features depend only on the item's title and the user's behaviours, so they are computed
once (serving/features.py) and served from a cache; what runs per request is BAHE's interaction part
(:meth:`bahe.model.bahe.BAHE.forward_from_text_features`): the dense arch, the ID tables, the pairwise
interaction over F ID features + N user + 1 item text features, the over arch -- a DLRM's work.

The ID tables go through torchrec's inference path: ``torchrec.inference.modules.quantize_inference_model``
swaps the EmbeddingBagCollection for torchrec's quantized one (fbgemm's inference TBE; fp32 rows for
exact parity, int8 or fp16 rows to save memory), then ``torchrec.fx.symbolic_trace`` + ``torch.jit.script``
give a TorchScript file that plain PyTorch (``torch.jit.load`` after ``import fbgemm_gpu``, which registers
the table ops) or C++ (``torch::jit::load`` with fbgemm_gpu's library loaded) runs without this project's
code. Why TorchScript and not ``torch.export``: docs/decisions.md.

Inputs (every tensor on the CPU; B requests):

* ``dense``: B x F_dense float32, the raw ``dense_<name>`` values in the run's column order; the predictor
  applies the trainer's transform itself (``log1p(max(x, 0))``, then the train split's z-scores);
* ``id_values`` (int64) and ``id_lengths`` (int64, F x B): the ID features as a KeyedJaggedTensor's values
  and lengths, keys in the run's order (user_id, item_id, cat_<name>...; features the run dropped are not
  sent); raw ids, hashed into the tables (``id % rows``) by the predictor, as the trainer does;
* ``user_text``: B x N x D float32, the user's cached features (users.parquet ``features``);
* ``item_text``: B x D float32, the item title's cached feature (items.parquet ``feature``).

Output: B logits (pre-sigmoid), the run's model's own numbers.
"""

# no ``from __future__ import annotations``: the fx trace turns string annotations into names TorchScript
# cannot resolve
import copy
import io
import json
from pathlib import Path

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from bahe.model.bahe import BAHE
from bahe.model.batch import SampleBatcher
from bahe.model.dense_features import DenseNormalizer

TABLE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}
META_FILE = "bahe_serving.json"  # the TorchScript file's extra file describing its inputs


class RequestFeatures(nn.Module):
    """The trainer's input transforms, in the graph: raw dense values -> the dense arch's input, raw ids ->
    the tables' rows (``id % rows``), as a KJT.

    Args:
        id_features: the ID feature keys, in the KJT's key order.
        table_rows: rows of each feature's table (same order).
        dense_count: F_dense.
        normalizer: the train split's dense statistics (None: log1p only, a run trained without them).
    """

    def __init__(self, id_features: list[str], table_rows: list[int], dense_count: int,
                 normalizer: DenseNormalizer | None):
        super().__init__()
        self.id_features = list(id_features)
        self.dense_count = dense_count
        self.register_buffer("table_rows", torch.tensor(table_rows, dtype=torch.int64), persistent=False)
        mean = normalizer.mean if normalizer is not None else (0.0,) * dense_count
        std = normalizer.std if normalizer is not None else (1.0,) * dense_count
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float64), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float64), persistent=False)

    def forward(self, dense: torch.Tensor, id_values: torch.Tensor,
                id_lengths: torch.Tensor) -> tuple[torch.Tensor, KeyedJaggedTensor]:
        """B x F_dense raw dense values, ids (values, F*B lengths) -> (B x F_dense float32, KJT of rows)."""
        batch = dense.size(0)
        torch._assert(dense.size(1) == self.dense_count, "dense must be B x F_dense (the run's dense columns)")
        torch._assert(id_lengths.numel() == batch * len(self.id_features),
                      "id_lengths must hold one length per ID feature and request (F x B, feature-major)")
        torch._assert(id_values.numel() == id_lengths.sum(), "id_values must hold sum(id_lengths) ids")
        torch._assert((id_values >= 0).all(), "ids must be >= 0 (raw ids, hashed into the tables by id % rows)")
        # float64 as the trainer's numpy transform, then float32 (model/dense_features.py)
        x = ((torch.log1p(torch.clamp(dense.double(), min=0.0)) - self.mean) / self.std).float()
        per_feature = id_lengths.view(len(self.id_features), -1).sum(1)
        rows = torch.repeat_interleave(self.table_rows, per_feature)
        kjt = KeyedJaggedTensor(keys=self.id_features, values=id_values % rows, lengths=id_lengths)
        return x, kjt


def upper_triangle(model: nn.Module) -> torch.Tensor:
    """The flat indices (into a row-major (F + 1) x (F + 1) matrix) of the pairs torchrec's InteractionArch
    reads, in its order."""
    rows, cols = model.inter_arch.triu_indices
    return rows * (model.inter_arch.F + 1) + cols


def lean_interaction_logits(model: nn.Module, pairs_at: torch.Tensor, x: torch.Tensor, kjt: KeyedJaggedTensor,
                            extra: list[torch.Tensor]) -> torch.Tensor:
    """A DLRM head's logits (B x 1) -- the numbers of torchrec's ``DLRM`` / :class:`BAHE` modules ``model`` --
    with less copying: dense arch, ID tables, then ONE concatenation of [dense, F ID, extra...] (each extra
    B x E x D), one batched matmul, the upper triangle read with one ``index_select`` (``pairs_at``), the over
    arch. torchrec's path splits the tables' output per feature and concatenates it back, concatenates twice
    more and reads the triangle with a two-index gather: at batch 512 on one CPU thread those steps cost about
    a fifth of a call (docs/serving.md)."""
    embedded_dense = model.dense_arch(x)  # B x D
    # the tables' pooled rows, B x (F * D), already in SparseArch's feature order (its configs' feature names,
    # which the KeyedTensor keeps): SparseArch's split-and-concatenate back is the identity
    sparse_arch = model.sparse_arch
    id_embeddings = sparse_arch.embedding_bag_collection(kjt).values().view(-1, sparse_arch.F, sparse_arch.D)
    combined = torch.cat([embedded_dense.unsqueeze(1), id_embeddings] + extra, dim=1)  # B x (1 + F + E) x D
    pairs = torch.bmm(combined, combined.transpose(1, 2)).flatten(1).index_select(1, pairs_at)
    return model.over_arch(torch.cat([embedded_dense, pairs], dim=1))


class CachedBahePredictor(nn.Module):
    """BAHE's interaction part over cached text features (see the module docstring for the inputs): the numbers
    of :meth:`BAHE.forward_from_text_features`, computed by :func:`lean_interaction_logits`.

    Example::

        logits = predictor(dense, id_values, id_lengths, user_text, item_text)   # B
    """

    def __init__(self, features: RequestFeatures, model: BAHE, num_sequences: int, embedding_dim: int):
        super().__init__()
        self.features, self.model = features, model
        self.num_sequences, self.embedding_dim = num_sequences, embedding_dim
        self.register_buffer("upper_triangle", upper_triangle(model), persistent=False)

    def forward(self, dense: torch.Tensor, id_values: torch.Tensor, id_lengths: torch.Tensor,
                user_text: torch.Tensor, item_text: torch.Tensor) -> torch.Tensor:
        x, kjt = self.features(dense, id_values, id_lengths)
        # one condition per assert: the fx trace cannot branch on (and / or) traced values
        torch._assert(user_text.dim() == 3, "user_text must be B x N x D (users.parquet features)")
        torch._assert(user_text.size(0) == dense.size(0), "user_text must have one row per request (B x N x D)")
        torch._assert(user_text.size(1) == self.num_sequences, "user_text must be B x N x D: N sequence features")
        torch._assert(user_text.size(2) == self.embedding_dim, "user_text must be B x N x D: D floats each")
        torch._assert(item_text.dim() == 2, "item_text must be B x D (items.parquet feature)")
        torch._assert(item_text.size(0) == dense.size(0), "item_text must have one row per request (B x D)")
        torch._assert(item_text.size(1) == self.embedding_dim, "item_text must be B x D: D floats")
        logits = lean_interaction_logits(self.model, self.upper_triangle, x, kjt, [user_text, item_text.unsqueeze(1)])
        return logits.squeeze(-1)


class DlrmPredictor(nn.Module):
    """torchrec's DLRM behind the same request transforms: ``(dense, id_values, id_lengths) -> B logits``
    (the serving bench's DLRM arm): its own forward, or with ``lean`` the same modules through
    :func:`lean_interaction_logits` (the serving bench's like-for-like arm)."""

    def __init__(self, features: RequestFeatures, dlrm: nn.Module, lean: bool = False):
        super().__init__()
        self.features, self.dlrm, self.lean = features, dlrm, lean
        self.register_buffer("upper_triangle", upper_triangle(dlrm), persistent=False)

    def forward(self, dense: torch.Tensor, id_values: torch.Tensor, id_lengths: torch.Tensor) -> torch.Tensor:
        x, kjt = self.features(dense, id_values, id_lengths)
        if self.lean:
            return lean_interaction_logits(self.dlrm, self.upper_triangle, x, kjt, []).squeeze(-1)
        return self.dlrm(x, kjt).squeeze(-1)


def request_features(batcher: SampleBatcher, normalizer: DenseNormalizer | None) -> RequestFeatures:
    """The run's transforms (its batcher's ID features and table sizes, its dense statistics)."""
    return RequestFeatures(list(batcher.id_features), [batcher.table_sizes[n] for n in batcher.id_features],
                           len(batcher.schema.dense_columns), normalizer)


def quantize_tables(module: nn.Module, tables: str) -> nn.Module:
    """torchrec's inference path: every EmbeddingBagCollection of ``module`` (in place) -> torchrec's quantized
    EBC with ``tables`` rows (fp32 = the trained numbers exactly; fp16, int8 = rowwise-quantized)."""
    from torchrec.inference.modules import quantize_inference_model

    if tables not in TABLE_DTYPES:
        raise ValueError(f"table precision {tables!r}: choose one of {sorted(TABLE_DTYPES)}")
    return quantize_inference_model(module, quantization_dtype=TABLE_DTYPES[tables])


def cached_predictor(model: BAHE, batcher: SampleBatcher, normalizer: DenseNormalizer | None, *,
                     tables: str = "fp32") -> CachedBahePredictor:
    """An eager :class:`CachedBahePredictor` from a trained BAHE model (left as it is: the ID tables and
    head are copied, the text arch is not), its ID tables through torchrec's inference quantization."""
    if model.text_arch is None or not hasattr(model.text_arch, "user_text_features"):
        raise ValueError("a cached-text predictor needs a BAHE model with its behaviour text arch (--arm bahe)")
    from bahe.model.text_levers import refuse_item_dependent

    refuse_item_dependent(getattr(model.text_arch, "user_aggregation", None), "a cached-text predictor",
                          "serve the full model instead")
    text_arch = model.text_arch
    model.text_arch = None  # copy the tables and head only
    try:
        head = copy.deepcopy(model)
    finally:
        model.text_arch = text_arch
    predictor = CachedBahePredictor(request_features(batcher, normalizer), head, len(text_arch.sequence_keys),
                                    text_arch.user_projection.out_features)
    return quantize_tables(predictor.eval(), tables)


def dlrm_predictor(dlrm: nn.Module, batcher: SampleBatcher, normalizer: DenseNormalizer | None, *,
                   tables: str = "fp32", lean: bool = False) -> DlrmPredictor:
    """An eager :class:`DlrmPredictor` around torchrec's ``DLRM`` (quantized the same way; ``dlrm`` is copied)."""
    predictor = DlrmPredictor(request_features(batcher, normalizer), copy.deepcopy(dlrm), lean=lean)
    return quantize_tables(predictor.eval(), tables)


def script(predictor: nn.Module) -> torch.jit.ScriptModule:
    """torchrec's inference recipe: fx-trace with torchrec's tracer (KJTs and the quantized tables stay
    intact), then TorchScript."""
    import warnings

    from torchrec.fx import symbolic_trace

    with warnings.catch_warnings():  # TorchScript's notes on torchrec's and fbgemm's annotations: not ours to fix
        warnings.simplefilter("ignore", UserWarning)
        return torch.jit.script(symbolic_trace(predictor))


def predictor_bytes(scripted: torch.jit.ScriptModule, meta: dict) -> bytes:
    """The TorchScript file's bytes, with ``meta`` (what the inputs are, which run made it) as an extra file."""
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer, _extra_files={META_FILE: json.dumps(meta, sort_keys=True)})
    return buffer.getvalue()


def load_predictor(path: Path) -> tuple[torch.jit.ScriptModule, dict]:
    """(the TorchScript predictor, its metadata); what a server does, in plain PyTorch: ``import fbgemm_gpu``
    first (it registers the table ops), then ``torch.jit.load``."""
    import fbgemm_gpu  # noqa: F401 -- registers fbgemm's operators the quantized tables call

    extra = {META_FILE: ""}
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[META_FILE])


def predictor_meta(data: bytes) -> dict | None:
    """The metadata a predictor file carries (its ``extra/bahe_serving.json``), read from the zip archive without
    loading the TorchScript (no code runs); None when it has none or is not a zip archive."""
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"/extra/{META_FILE}")]
            return json.loads(archive.read(names[0])) if len(names) == 1 else None
    except (zipfile.BadZipFile, ValueError, KeyError, OSError):
        return None

