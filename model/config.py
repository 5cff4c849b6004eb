"""Configuration of the BAHE model: one dataclass per concern, validated at construction.

* :class:`TablesConfig` -- the sparse ID tables (hash sizes, embedding dim D);
* :class:`ArchConfig` -- DLRM's dense and over arch sizes;
* :class:`TextConfig` -- the behaviour store, the LLM and its deep layers, sequences and lengths;
* :class:`BaheModelConfig` -- the three together (text None = the DLRM-only arm), with the checks
  that span them. :func:`model.factory.build_model` checks the rest against the data, the store
  and the LLM before anything trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bahe.embeddings.pretrained import DEFAULT_MODEL
from bahe.model.deep_layers import ATTENTIONS, POOLINGS, PRECISIONS
from bahe.model.text_levers import USER_AGGREGATIONS, USER_PROJECTIONS

ARMS = ("bahe", "token_level")
# --behaviour-sharding: the frozen behaviour table's sharding type (model/sharding.py; auto: its rule there)
BEHAVIOUR_SHARDINGS = ("auto", "row_wise", "column_wise", "table_wise")


# Bounds of the model's sizes: far above any model this code trains (a table of 2**34 rows of D = 8 is
# 512 GiB), far below what reaches the sharding planner or the allocator as a traceback (10**12 rows).
# The configs refuse sizes beyond them, and so does every reader of a run record (training/run_record.py),
# so bahe-train never writes a record that bahe-predict, bahe-evaluate or bahe-export would refuse.
MAX_TABLE_ROWS = 2**34
MAX_WIDTH = 2**14  # embedding dim D, a dense / over arch layer
MAX_LAYERS = 64  # layers of the dense or over arch
MAX_LLM_LAYERS = 1024  # k, deep layers
MAX_BEHAVIOURS = 2**16  # M
MAX_USER_TOKENS = 2**20

def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TablesConfig:
    """Args:
        embedding_dim: D, shared by every ID table (DLRM's rule) and the text projections.
        default_rows: hash size of an ID feature's table unless ``rows`` names it.
        rows: per-feature hash sizes, e.g. {"user_id": 1000, "cat_genres": 20}.
        drop: ID features left out of the model (no table, not read), e.g. ("user_id",) when most
            test users are new and a per-user row only memorises the train period.
    """

    embedding_dim: int = 64
    default_rows: int = 100_000
    rows: dict[str, int] = field(default_factory=dict)
    drop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _is_int(self.embedding_dim) or not 1 <= self.embedding_dim <= MAX_WIDTH:
            raise ValueError(f"TablesConfig.embedding_dim must be an integer in [1, {MAX_WIDTH:,}], "
                             f"got {self.embedding_dim!r}")
        bad = {k: v for k, v in {"default_rows": self.default_rows, **self.rows}.items()
               if not _is_int(v) or not 1 <= v <= MAX_TABLE_ROWS}
        if bad:
            raise ValueError(f"TablesConfig: table sizes must be integers in [1, {MAX_TABLE_ROWS:,}] (--table-rows), "
                             f"got {bad}")
        object.__setattr__(self, "drop", tuple(self.drop))
        both = sorted(set(self.drop) & set(self.rows))
        if both:
            raise ValueError(f"TablesConfig: {both} are both dropped and given a size in rows; keep one")

    def features(self, available: list[str]) -> list[str]:
        """The ID features of ``available`` (the data's, in KJT order) that get a table."""
        unknown = sorted(set(self.drop) - set(available)) + sorted(set(self.rows) - set(available))
        if unknown:
            raise ValueError(f"TablesConfig names ID features the data lacks: {unknown}; the data has {available}")
        kept = [name for name in available if name not in self.drop]
        if not kept:
            raise ValueError(f"TablesConfig.drop leaves no ID feature (the data has {available}); keep at least one")
        return kept

    def rows_for(self, feature: str) -> int:
        return self.rows.get(feature, self.default_rows)


@dataclass(frozen=True)
class ArchConfig:
    """Args:
        dense_arch_layer_sizes: DenseArch MLP sizes; the last must equal TablesConfig.embedding_dim.
        over_arch_layer_sizes: OverArch sizes; the last must be 1 (one logit).
    """

    dense_arch_layer_sizes: tuple[int, ...] = (128, 64)
    over_arch_layer_sizes: tuple[int, ...] = (256, 64, 1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense_arch_layer_sizes", tuple(self.dense_arch_layer_sizes))
        object.__setattr__(self, "over_arch_layer_sizes", tuple(self.over_arch_layer_sizes))
        sizes = self.dense_arch_layer_sizes + self.over_arch_layer_sizes
        if not all(_is_int(n) and 1 <= n <= MAX_WIDTH for n in sizes):
            raise ValueError(f"ArchConfig: layer sizes must be integers in [1, {MAX_WIDTH:,}], got dense "
                             f"{self.dense_arch_layer_sizes}, over {self.over_arch_layer_sizes}")
        if max(len(self.dense_arch_layer_sizes), len(self.over_arch_layer_sizes)) > MAX_LAYERS:
            raise ValueError(f"ArchConfig: at most {MAX_LAYERS} layers per arch, got dense "
                             f"{len(self.dense_arch_layer_sizes)}, over {len(self.over_arch_layer_sizes)}")
        if not self.dense_arch_layer_sizes or min(self.dense_arch_layer_sizes) < 1:
            raise ValueError(f"ArchConfig.dense_arch_layer_sizes must be positive sizes, got {self.dense_arch_layer_sizes}")
        if len(self.over_arch_layer_sizes) < 2 or self.over_arch_layer_sizes[-1] != 1:
            raise ValueError("ArchConfig.over_arch_layer_sizes needs >= 2 layers ending in 1 (one logit), got "
                             f"{self.over_arch_layer_sizes}")


@dataclass(frozen=True)
class TextConfig:
    """Args:
        store: root folder of the behaviour store (bahe-encode build --store ...).
        llm: the SAME model the store was encoded with (alias or local Hugging Face folder).
        k: shallow layers the store used; None = read it from the store's manifest.
        deep_layers: trainable layers k..k+deep-1; None = all the rest (L - k).
        pooling: ``mean`` over behaviours or the ``last`` behaviour's state.
        attention: ``causal`` (default, how the LLM was trained) or ``bidirectional``.
        sequences: behaviour sequence types to use; () = every type of the data.
        max_behaviours: M, the most recent behaviours kept per sequence.
        gradient_checkpointing: recompute deep-layer activations in backward (saves memory).
        arm: ``bahe`` (behaviour store + deep layers) or ``token_level`` (the baseline: every
            behaviour text tokenised and run through layers 0..k+deep; model/token_baseline.py).
        max_user_tokens: the token-level arm's token budget per user (most recent tokens kept).
        llm_precision: compute precision of the LLM layers in training and evaluation: ``auto``
            (bf16 autocast on CUDA, fp32 on CPU), ``bf16`` (autocast on any device; fast on CPUs with
            AMX) or ``fp32``. Weights and optimiser state stay fp32 either way.
        user_projection: ``shared`` (default: one H -> D projection for the N sequence types) or
            ``per_type`` (each type its own; model/text_levers.py). ``--arm bahe`` only.
        user_aggregation: ``pooled`` (default: the deep layers' mean / last pool) or ``target_attention``
            (attention over a user's behaviour positions with the item text feature as query; user features
            then depend on the item, so bahe-export, cached scoring and --frozen-text-from refuse the run).
            ``--arm bahe`` only.
    """

    store: str
    llm: str = DEFAULT_MODEL
    k: int | None = None
    deep_layers: int | None = None
    pooling: str = "mean"
    attention: str = "causal"
    sequences: tuple[str, ...] = ()
    max_behaviours: int = 50
    gradient_checkpointing: bool = False
    arm: str = "bahe"
    max_user_tokens: int = 2048
    llm_precision: str = "auto"
    user_projection: str = "shared"
    user_aggregation: str = "pooled"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sequences", tuple(self.sequences))
        if self.arm not in ARMS:
            raise ValueError(f"TextConfig.arm must be one of {ARMS}, got {self.arm!r}")
        if self.llm_precision not in PRECISIONS:
            raise ValueError(f"TextConfig.llm_precision must be one of {PRECISIONS}, got {self.llm_precision!r}")
        if not 1 <= self.max_user_tokens <= MAX_USER_TOKENS:
            raise ValueError(f"TextConfig.max_user_tokens must be in [1, {MAX_USER_TOKENS:,}], got {self.max_user_tokens}")
        if self.k is not None and not 1 <= self.k <= MAX_LLM_LAYERS:
            raise ValueError(f"TextConfig.k must be in [1, {MAX_LLM_LAYERS}] (or None for the store's), got {self.k}")
        if self.deep_layers is not None and not 1 <= self.deep_layers <= MAX_LLM_LAYERS:
            raise ValueError(f"TextConfig.deep_layers must be in [1, {MAX_LLM_LAYERS}] (or None for all the rest), "
                             f"got {self.deep_layers}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"TextConfig.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"TextConfig.attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if not 1 <= self.max_behaviours <= MAX_BEHAVIOURS:
            raise ValueError(f"TextConfig.max_behaviours must be in [1, {MAX_BEHAVIOURS:,}], got {self.max_behaviours}")
        if self.user_projection not in USER_PROJECTIONS:
            raise ValueError(f"TextConfig.user_projection must be one of {USER_PROJECTIONS} (--user-projection), "
                             f"got {self.user_projection!r}")
        if self.user_aggregation not in USER_AGGREGATIONS:
            raise ValueError(f"TextConfig.user_aggregation must be one of {USER_AGGREGATIONS} (--user-aggregation), "
                             f"got {self.user_aggregation!r}")
        changed = [f"--user-projection {self.user_projection}"] * (self.user_projection != "shared") + \
            [f"--user-aggregation {self.user_aggregation}"] * (self.user_aggregation != "pooled")
        if self.arm != "bahe" and changed:
            raise ValueError(f"TextConfig: {' and '.join(changed)}: options of the BAHE text arch only (--arm bahe), "
                             f"not --arm {self.arm}; drop them or train --arm bahe")
        if len(set(self.sequences)) != len(self.sequences):
            raise ValueError(f"TextConfig.sequences has duplicates: {self.sequences}")


@dataclass(frozen=True)
class BaheModelConfig:
    """The whole model. ``text=None`` builds the DLRM-only arm from the same tables and head."""

    tables: TablesConfig = field(default_factory=TablesConfig)
    arch: ArchConfig = field(default_factory=ArchConfig)
    text: TextConfig | None = None

    def __post_init__(self) -> None:
        if self.arch.dense_arch_layer_sizes[-1] != self.tables.embedding_dim:
            raise ValueError(f"the last dense arch layer ({self.arch.dense_arch_layer_sizes[-1]}) must equal the "
                             f"embedding dim D ({self.tables.embedding_dim}): change one of them")
