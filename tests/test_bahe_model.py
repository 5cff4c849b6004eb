"""The BAHE model, unsharded: DLRM's contract, numerically a DLRM without text, feature-parallel
aggregation equal to per-type runs, a frozen behaviour table, and clear config errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torchrec.models.dlrm import DLRM
from torchrec.optim.optimizers import in_backward_optimizer_filter

from bahe.embeddings.pretrained import ModelError
from bahe.embeddings.store import StoreError
from bahe.model.bahe import BAHETrain
from bahe.model.behaviour_lookup import load_store_rows
from bahe.model.config import ArchConfig, BaheModelConfig, TablesConfig, TextConfig
from bahe.model.factory import build_model
from tests.llm_dtypes import linear_output_dtypes, split_by_prefix
from tests.model_fixtures import TINY_LAYERS, make_tiny_pipeline


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("pipeline"))


def built(pipeline, **kw):
    torch.manual_seed(0)
    model, batcher, store = build_model(pipeline.config(**kw), pipeline.schema)
    if store is not None:
        load_store_rows(model, store)
    return model, batcher, store


def test_forward_and_train_wrapper_keep_dlrms_contract(pipeline):
    model, batcher, store = built(pipeline)
    batch = batcher(pipeline.table(16))
    logits = model(batch.dense_features, batch.sparse_features, batch.behaviour_features)
    assert logits.shape == (16, 1)
    loss, (loss_d, logits_d, labels) = BAHETrain(model)(batch)
    assert loss.requires_grad and not loss_d.requires_grad and logits_d.shape == (16,) and torch.equal(labels, batch.labels)
    torch.testing.assert_close(logits_d, logits.detach().squeeze(-1))
    # the frozen table is not under sparse_arch (dlrm_main gives sparse_arch's parameters the sparse optimizer)
    assert not any("behaviours" in name for name, _ in model.sparse_arch.named_parameters())
    assert load_store_rows(model, store) == store.rows_count


def test_without_text_it_is_numerically_torchrecs_dlrm(pipeline):
    model, batcher, _ = built(pipeline, text=False)
    dlrm = DLRM(model.sparse_arch.embedding_bag_collection, len(pipeline.schema.dense), [16, 8], [16, 1])
    dlrm.load_state_dict(model.state_dict())  # same module names: a DLRM checkpoint loads as is
    batch = batcher(pipeline.table(32))
    assert batch.behaviour_features is None
    torch.testing.assert_close(model(batch.dense_features, batch.sparse_features),
                               dlrm(batch.dense_features, batch.sparse_features), rtol=0, atol=0)


def test_feature_parallel_equals_each_sequence_type_alone(pipeline):
    """One (B*N)-row pass through the deep layers == running each sequence type separately."""
    model, batcher, _ = built(pipeline)
    model.eval()
    batch = batcher(pipeline.table(12))
    text = model.text_arch
    with torch.no_grad():
        together = text(batch.behaviour_features)  # B x (N+1) x D
        looked_up = text.lookup(batch.behaviour_features)
        for i, key in enumerate(text.sequence_keys):
            vectors, lengths = looked_up[key]
            alone = text.user_projection(text.user_norm(text.aggregator(vectors, lengths)))
            torch.testing.assert_close(together[:, i], alone, rtol=1e-5, atol=1e-6)
    assert together.shape == (12, len(text.sequence_keys) + 1, 8)


def test_behaviour_table_stays_frozen_while_the_rest_learns(pipeline):
    model, batcher, _ = built(pipeline)
    train = BAHETrain(model)
    table = model.text_arch.lookup.embedding_collection.embeddings["behaviours"].weight
    frozen_before = table.detach().clone()
    layer_before = model.text_arch.aggregator.decoder.layers[0].mlp.up_proj.weight.detach().clone()
    ids_before = model.sparse_arch.embedding_bag_collection.embedding_bags["t_user_id"].weight.detach().clone()
    dense_params = dict(in_backward_optimizer_filter(model.named_parameters()))
    assert not any("behaviours" in name for name in dense_params)
    optimizer = torch.optim.Adam(dense_params.values(), lr=1e-2)
    batch = batcher(pipeline.table(64))
    losses = []
    for _ in range(15):
        loss, _ = train(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert torch.equal(table.detach(), frozen_before)
    assert not torch.equal(model.text_arch.aggregator.decoder.layers[0].mlp.up_proj.weight, layer_before)
    assert not torch.equal(model.sparse_arch.embedding_bag_collection.embedding_bags["t_user_id"].weight, ids_before)
    assert losses[-1] < losses[0] - 0.05


def test_config_errors_are_clear(pipeline):
    with pytest.raises(ValueError, match="must equal the embedding dim D"):
        BaheModelConfig(tables=TablesConfig(embedding_dim=8), arch=ArchConfig(dense_arch_layer_sizes=(16, 4)))
    with pytest.raises(ValueError, match="ending in 1"):
        ArchConfig(over_arch_layer_sizes=(16, 2))
    with pytest.raises(ValueError, match="pooling"):
        TextConfig(store="x", pooling="max")
    config = pipeline.config()
    with pytest.raises(ValueError, match=r"unknown: \['clicks'\]"):
        build_model(dataclasses.replace(config, text=dataclasses.replace(config.text, sequences=("bill", "clicks"))),
                    pipeline.schema)
    with pytest.raises(ModelError, match=f"need k \\+ deep_layers <= {TINY_LAYERS}"):
        build_model(dataclasses.replace(config, text=dataclasses.replace(config.text, deep_layers=3)), pipeline.schema)
    with pytest.raises(StoreError, match="k: store has 2, config asks for 1"):
        build_model(dataclasses.replace(config, text=dataclasses.replace(config.text, k=1)), pipeline.schema)
    with pytest.raises(StoreError, match="holds no complete store version"):
        build_model(dataclasses.replace(config, text=dataclasses.replace(config.text, store="/nonexistent")),
                    pipeline.schema)


def test_token_level_arm_runs_every_text_through_all_layers(pipeline):
    """The baseline arm: same tables and head; user texts tokenised, concatenated, most recent kept;
    the shallow layers frozen (never trained), the deep layers and head trained."""
    config = pipeline.config()
    config = dataclasses.replace(config, text=dataclasses.replace(config.text, arm="token_level", max_user_tokens=40))
    torch.manual_seed(0)
    model, batcher, store = build_model(config, pipeline.schema)
    assert store is None and model.text_arch.num_text_features == 2
    table = pipeline.table(16)
    batch = batcher(table)
    tokens = batch.behaviour_features["user_tokens"]
    assert int(tokens.lengths().max()) == 40  # long histories truncated to the budget
    # the kept tokens are the MOST RECENT: the row's last behaviour text ends the sequence
    row = next(i for i in range(16) if table.column("seq_app_visit")[i].as_py())
    last_text = table.column("seq_app_visit")[row].as_py()[-1]
    last_ids = batcher.tokenizer(last_text, add_special_tokens=False)["input_ids"]
    row_tokens = tokens.values()[tokens.offsets()[row]:tokens.offsets()[row + 1]].tolist()
    assert row_tokens[-len(last_ids) - len(batcher._separator):-len(batcher._separator)] == last_ids
    shallow_before = [p.detach().clone() for p in model.text_arch.shallow.parameters()]
    train = BAHETrain(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss, _ = train(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(shallow_before, model.text_arch.shallow.parameters()))
    assert model.text_arch.deep.decoder.layers[0].mlp.up_proj.weight.grad is not None


def test_token_level_layers_equal_the_full_models_forward(pipeline):
    """Shallow (0..k) + deep (k..L) layers of the baseline == the HF model's own forward on the tokens."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    from transformers import AutoModel

    from bahe.model.token_baseline import TokenLevelTextArch

    arch = TokenLevelTextArch(pipeline.llm, 2, None, 8, max_user_tokens=12, max_item_tokens=4, pooling="last").eval()
    tokens = torch.tensor([[101, 2023, 2003, 1037, 3231, 102, 7, 8, 9]])
    features = KeyedJaggedTensor.from_lengths_sync(keys=["user_tokens", "item_tokens"],
                                                   values=torch.cat([tokens[0], tokens[0, :3]]),
                                                   lengths=torch.tensor([9, 3]))
    full = AutoModel.from_pretrained(pipeline.llm).eval()
    with torch.no_grad():
        ours = arch._encode(features, "user_tokens")
        reference = full(input_ids=tokens).last_hidden_state[:, -1]
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_token_level_bf16_precision_matches_the_full_models_autocast_forward(pipeline):
    """--llm-precision bf16 runs the baseline's shallow AND deep layers under bf16 autocast (every linear
    layer of every decoder layer computes in bfloat16; the projections stay fp32): the result is the HF
    model's own forward under the same autocast, far tighter than its distance to fp32."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    from transformers import AutoModel

    from bahe.model.token_baseline import TokenLevelTextArch

    tokens = torch.tensor([[101, 2023, 2003, 1037, 3231, 102, 7, 8, 9]])
    features = KeyedJaggedTensor.from_lengths_sync(keys=["user_tokens", "item_tokens"],
                                                   values=torch.cat([tokens[0], tokens[0, :3]]),
                                                   lengths=torch.tensor([9, 3]))
    encoded = {}
    for precision in ("fp32", "auto", "bf16"):
        arch = TokenLevelTextArch(pipeline.llm, 2, None, 8, max_user_tokens=12, max_item_tokens=4,
                                  pooling="last", precision=precision).eval()
        with torch.no_grad(), linear_output_dtypes(arch) as seen:
            encoded[precision] = arch._encode(features, "user_tokens")
            features_out = arch(features)
        llm, other = split_by_prefix(seen, ("shallow.layers.", "deep.decoder.layers."))
        assert len([n for n in seen if n.startswith("shallow.layers.")]) == 2 * 7  # every layer below k ran
        assert len([n for n in seen if n.startswith("deep.decoder.layers.")]) == (TINY_LAYERS - 2) * 7
        assert llm == {torch.bfloat16 if precision == "bf16" else torch.float32}, precision
        assert other == {torch.float32} and features_out.dtype == torch.float32  # the projections
        assert all(p.dtype == torch.float32 for p in arch.parameters())
    full = AutoModel.from_pretrained(pipeline.llm).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = full(input_ids=tokens).last_hidden_state[:, -1].float()
    assert encoded["bf16"].dtype == torch.float32 and torch.equal(encoded["auto"], encoded["fp32"])
    assert (encoded["fp32"] - reference).abs().max() > 1e-3  # fp32 (or bf16 in only some layers) would show
    torch.testing.assert_close(encoded["bf16"], reference, rtol=1e-4, atol=1e-4)


def test_bahe_bf16_precision_runs_the_deep_layers_in_bf16_and_the_rest_in_fp32(pipeline):
    """TextConfig.llm_precision reaches the aggregator: under ``bf16`` every linear layer of the LLM's
    deep layers computes in bfloat16, while the projections, the dense and over arches, the weights and
    the logits stay fp32; under ``auto`` (on CPU) and ``fp32`` everything is fp32."""
    for precision in ("auto", "fp32", "bf16"):
        model, batcher, _ = built(pipeline, llm_precision=precision)
        batch = batcher(pipeline.table(8))
        with linear_output_dtypes(model) as seen:
            logits = model(batch.dense_features, batch.sparse_features, batch.behaviour_features)
        logits.sum().backward()
        llm, other = split_by_prefix(seen, ("text_arch.aggregator.decoder.layers.",))
        assert len([n for n in seen if n.startswith("text_arch.aggregator.")]) == (TINY_LAYERS - 2) * 7
        assert llm == {torch.bfloat16 if precision == "bf16" else torch.float32}, precision
        head = {"dense_arch.model._mlp.0._linear", "over_arch.model.1", "text_arch.user_projection",
                "text_arch.item_projection"}
        assert head <= set(seen)  # the head and the projections ran, and are counted in ``other``
        assert other == {torch.float32} and logits.dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


def test_dropped_id_features_get_no_table_and_are_not_read(pipeline):
    """TablesConfig.drop leaves a feature out of the tables, the KJT and the interaction; per-feature
    rows size the others."""
    config = pipeline.config()
    config = dataclasses.replace(config, tables=TablesConfig(embedding_dim=8, default_rows=64,
                                                             rows={"item_id": 40}, drop=("user_id",)))
    model, batcher, _ = build_model(config, pipeline.schema)
    tables = {c.name: c.num_embeddings for c in model.sparse_arch.embedding_bag_collection.embedding_bag_configs()}
    assert "t_user_id" not in tables and tables["t_item_id"] == 40
    batch = batcher(pipeline.table(8).drop(["user_id"]))  # the column is not even needed
    assert batch.sparse_features.keys() == list(batcher.id_features) and "user_id" not in batcher.id_features
    assert model(batch.dense_features, batch.sparse_features, batch.behaviour_features).shape == (8, 1)
