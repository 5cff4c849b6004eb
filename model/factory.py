"""Build a BAHE model and its batcher from a config, checked against the data, store and LLM.

Every mismatch is found here, before training: a sequence type the data lacks, a store encoded by
another model or k, k + deep layers beyond the LLM's depth, dims that do not meet.
"""

from __future__ import annotations

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

from bahe.ctr_data.schema import SEQ_PREFIX, SampleSchema
from bahe.embeddings.pretrained import resolve_model_dir, weights_sha256
from bahe.embeddings.store import BehaviourStore, Expected
from bahe.model.bahe import BAHE
from bahe.model.batch import ITEM_TEXT_KEY, SampleBatcher, id_feature_names
from bahe.model.behaviour_lookup import BehaviourLookup, table_dtype
from bahe.model.config import BaheModelConfig, TextConfig
from bahe.model.deep_layers import DeepLayerAggregator
from bahe.model.dense_features import DenseNormalizer
from bahe.model.text_arch import BehaviourTextArch
from bahe.model.token_baseline import TokenBatcher, TokenLevelTextArch


def id_tables(config: BaheModelConfig, schema: SampleSchema, device: torch.device | None = None
              ) -> EmbeddingBagCollection:
    """One trainable EBC table per kept ID feature (user_id, item_id, cat_*), sized by TablesConfig."""
    return EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name=f"t_{name}", embedding_dim=config.tables.embedding_dim,
                                   num_embeddings=config.tables.rows_for(name), feature_names=[name])
                for name in config.tables.features(id_feature_names(schema))],
        device=device)


def build_model(config: BaheModelConfig, schema: SampleSchema, *, device: torch.device | str | None = None,
                dense_normalizer: DenseNormalizer | None = None) -> tuple[BAHE, SampleBatcher, BehaviourStore | None]:
    """Returns (model, batcher, store). Tables are built on ``device`` (use ``meta`` before DMP and
    load the store with :func:`bahe.model.behaviour_lookup.load_store_rows` after wrapping). The batcher
    standardises the dense features with ``dense_normalizer`` (train statistics) when given."""
    device = torch.device(device) if device is not None else None
    table_sizes = {name: config.tables.rows_for(name) for name in config.tables.features(id_feature_names(schema))}
    text = config.text
    if text is None:
        batcher = SampleBatcher(schema, table_sizes, vocabulary=None, dense_normalizer=dense_normalizer)
        ebc = id_tables(config, schema, device)
        return BAHE(ebc, len(schema.dense), list(config.arch.dense_arch_layer_sizes),
                    list(config.arch.over_arch_layer_sizes), dense_device=_dense(device)), batcher, None
    sequences = _sequences(text, schema)
    if text.arm == "token_level":
        return _token_level(config, schema, sequences, table_sizes, resolve_model_dir(text.llm), device,
                            dense_normalizer)
    text_arch, store = build_text_arch(text, schema, config.tables.embedding_dim, device=device)
    model = BAHE(id_tables(config, schema, device), len(schema.dense), list(config.arch.dense_arch_layer_sizes),
                 list(config.arch.over_arch_layer_sizes), text_arch=text_arch, dense_device=_dense(device))
    batcher = SampleBatcher(schema, table_sizes, store.text_index, tuple(sequences), text.max_behaviours,
                            dense_normalizer=dense_normalizer)
    return model, batcher, store


def _sequences(text: TextConfig, schema: SampleSchema) -> tuple[str, ...]:
    """The sequence types the text arch reads (all of the data's by default), checked against the data."""
    sequences = tuple(text.sequences or schema.sequences)
    unknown = [s for s in sequences if s not in schema.sequences]
    if unknown or not sequences:
        raise ValueError(f"TextConfig.sequences {list(sequences)}: the data has sequence types "
                         f"{list(schema.sequences)}; unknown: {unknown}")
    return sequences


def build_text_arch(text: TextConfig, schema: SampleSchema, embedding_dim: int, *,
                    device: torch.device | str | None = None) -> tuple[BehaviourTextArch, BehaviourStore]:
    """BAHE's text arch alone (the store as a frozen table, the LLM's deep layers, the projections to D),
    for a trainer that builds its own ID tables and BAHE, as dlrm_main does (examples/dlrm_main_text.py).
    The store is checked against the LLM and k first. Returns (text arch, store); load the store's rows
    with :func:`bahe.model.behaviour_lookup.load_store_rows` after DistributedModelParallel."""
    device = torch.device(device) if device is not None else None
    sequences = _sequences(text, schema)
    model_dir = resolve_model_dir(text.llm)
    store = BehaviourStore.open(text.store)
    k = text.k if text.k is not None else int(store.manifest["encoder"]["k"])
    store.check(Expected(model_sha256=weights_sha256(model_dir), k=k))
    keys = [SEQ_PREFIX + s for s in sequences]
    lookup = BehaviourLookup(store.rows_count, store.dim, [*keys, ITEM_TEXT_KEY],
                             {**dict.fromkeys(keys, text.max_behaviours), ITEM_TEXT_KEY: 1}, device=device,
                             dtype=table_dtype(store.store_dtype, device or "cpu"))
    aggregator = DeepLayerAggregator(model_dir, k, text.deep_layers, pooling=text.pooling, attention=text.attention,
                                     gradient_checkpointing=text.gradient_checkpointing, precision=text.llm_precision)
    return BehaviourTextArch(lookup, aggregator, keys, embedding_dim, user_projection=text.user_projection,
                             user_aggregation=text.user_aggregation), store


def _token_level(config: BaheModelConfig, schema: SampleSchema, sequences, table_sizes, model_dir, device,
                 dense_normalizer):
    """The token-level baseline arm from the same config: same tables, head and LLM layers."""
    from transformers import AutoTokenizer

    text = config.text
    k = text.k if text.k is not None else int(BehaviourStore.open(text.store).manifest["encoder"]["k"])
    text_arch = TokenLevelTextArch(model_dir, k, text.deep_layers, config.tables.embedding_dim,
                                   max_user_tokens=text.max_user_tokens, pooling=text.pooling,
                                   attention=text.attention, gradient_checkpointing=text.gradient_checkpointing,
                                   precision=text.llm_precision)
    model = BAHE(id_tables(config, schema, device), len(schema.dense), list(config.arch.dense_arch_layer_sizes),
                 list(config.arch.over_arch_layer_sizes), text_arch=text_arch, dense_device=_dense(device))
    batcher = TokenBatcher(schema, table_sizes, None, tuple(sequences), text.max_behaviours,
                           tokenizer=AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False), max_user_tokens=text.max_user_tokens,
                           dense_normalizer=dense_normalizer)
    return model, batcher, None


def _dense(device: torch.device | None) -> torch.device | None:
    return None if device is None or device.type == "meta" else device
