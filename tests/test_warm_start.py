"""Warm-starting BAHE from a trained TorchRec DLRM: the same logits as the DLRM, with and without a
text arch, from every state-dict flavour and file format; clear errors for every mismatch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from bahe.model.bahe import BAHE, BAHETrain
from bahe.model.batch import ITEM_TEXT_KEY, BaheBatch
from bahe.model.warm_start import load_dlrm_weights

D, DENSE_IN, TABLES = 4, 3, ("t_user", "t_item", "t_cat")
ROWS = 12
FIRST_OVER = "over_arch.model.0._mlp.0._linear.weight"
TABLE_KEY = "sparse_arch.embedding_bag_collection.embedding_bags.{}.weight"


def id_tables(names=TABLES, dim: int = D, device: torch.device | None = None) -> EmbeddingBagCollection:
    return EmbeddingBagCollection(tables=[EmbeddingBagConfig(name=n, embedding_dim=dim, num_embeddings=ROWS,
                                                             feature_names=[n[2:]]) for n in names], device=device)


def inputs(batch: int = 16, names=(*TABLES, "t_new"), seed: int = 1) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    """B x DENSE_IN dense features and a KJT with 0-3 ids per (feature, sample); extra keys are unused."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(names) * batch,), generator=generator)
    values = torch.randint(0, ROWS, (int(lengths.sum()),), generator=generator)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=[n[2:] for n in names], values=values, lengths=lengths)
    return torch.randn(batch, DENSE_IN, generator=generator), kjt


def make_dlrm(names=TABLES, dim: int = D, dense=(8, D), over=(8, 1), *, steps: int = 5) -> DLRM:
    """A DLRM trained a few Adam steps on random labels, so no weight is at its initial value."""
    torch.manual_seed(0)
    dlrm = DLRM(id_tables(names, dim), DENSE_IN, list(dense), list(over))
    optimizer = torch.optim.Adam(dlrm.parameters(), lr=0.05)
    dense_x, sparse = inputs(64, (*names, "t_new"))
    labels = (torch.arange(64) % 3 == 0).float()
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(dlrm(dense_x, sparse).squeeze(-1), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return dlrm.eval()


def make_bahe(names=TABLES, dim: int = D, dense=(8, D), over=(8, 1), text_arch=None) -> BAHE:
    torch.manual_seed(123)  # other weights than the DLRM's
    return BAHE(id_tables(names, dim), DENSE_IN, list(dense), list(over), text_arch=text_arch).eval()


@pytest.fixture(scope="module")
def dlrm() -> DLRM:
    return make_dlrm()


def logits(model, behaviours=None) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs(), behaviours) if behaviours is not None else model(*inputs())


def test_without_text_the_logits_are_the_dlrms_bit_for_bit(dlrm):
    model = make_bahe()
    assert not torch.equal(logits(model), logits(dlrm))
    report = load_dlrm_weights(model, dlrm.state_dict())
    torch.testing.assert_close(logits(model), logits(dlrm), rtol=0, atol=0)
    assert set(report.copied) == set(make_bahe().state_dict()) and report.skipped == () and report.zero_initialised_columns == 0
    assert report.skipped == ()


@pytest.mark.parametrize("flavour", ["dlrm_train", "ddp_prefixed", "dmp_prefixed", "torch_file", "safetensors"])
def test_every_state_dict_flavour_and_file_format_loads(dlrm, tmp_path, flavour):
    state = dlrm.state_dict()
    source = {
        "dlrm_train": lambda: DLRMTrain(dlrm).state_dict(),
        "ddp_prefixed": lambda: {f"module.model.{k}": v for k, v in state.items()},
        "dmp_prefixed": lambda: {f"_dmp_wrapped_module.module.model.{k}": v for k, v in state.items()},
        "torch_file": lambda: torch.save(state, tmp_path / "dlrm.pt") or tmp_path / "dlrm.pt",
        "safetensors": lambda: save_file(dict(state), str(tmp_path / "d.safetensors")) or str(tmp_path / "d.safetensors"),
    }[flavour]()
    model = make_bahe()
    load_dlrm_weights(BAHETrain(model) if flavour == "dlrm_train" else model, source)
    torch.testing.assert_close(logits(model), logits(dlrm), rtol=0, atol=0)


@pytest.fixture(scope="module")
def text_arch_factory(tmp_path_factory):
    """Builds a real BehaviourTextArch: a random 2-layer Llama's layer 1 over a random behaviour table."""
    from bahe.model.behaviour_lookup import BehaviourLookup
    from bahe.model.deep_layers import DeepLayerAggregator
    from bahe.model.text_arch import BehaviourTextArch
    from tests.llm_fixtures import make_tiny_llama

    llm = make_tiny_llama(tmp_path_factory.mktemp("warm") / "llm", layers=2, hidden=16)

    def build():
        torch.manual_seed(7)
        lookup = BehaviourLookup(30, 16, ["seq_liked", "seq_skipped", ITEM_TEXT_KEY],
                                 {"seq_liked": 5, "seq_skipped": 5, ITEM_TEXT_KEY: 1})
        torch.nn.init.normal_(lookup.embedding_collection.embeddings["behaviours"].weight)
        return BehaviourTextArch(lookup, DeepLayerAggregator(llm, 1, 1), ["seq_liked", "seq_skipped"], D)
    return build


def behaviours(batch: int = 16) -> KeyedJaggedTensor:
    generator = torch.Generator().manual_seed(2)
    lengths = torch.cat([torch.randint(0, 6, (2 * batch,), generator=generator), torch.ones(batch, dtype=torch.long)])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["seq_liked", "seq_skipped", ITEM_TEXT_KEY], lengths=lengths,
        values=torch.randint(0, 30, (int(lengths.sum()),), generator=generator))


def test_with_text_the_new_columns_are_zero_and_the_logits_are_the_dlrms(dlrm, text_arch_factory):
    model = make_bahe(text_arch=text_arch_factory())
    text_before = {k: v.clone() for k, v in model.text_arch.state_dict().items()}
    report = load_dlrm_weights(model, dlrm.state_dict())
    # F = 3 ID features, N + 1 = 3 text features: 4 + C(4, 2) = 10 DLRM columns, 4 + C(7, 2) = 25 in BAHE
    assert model.state_dict()[FIRST_OVER].shape == (8, 25) and report.zero_initialised_columns == 15
    assert int((model.state_dict()[FIRST_OVER].abs().sum(0) == 0).sum()) == 15
    # equal up to float summation order: the wider matmul adds zero products (bit-equal on CPU here)
    torch.testing.assert_close(logits(model, behaviours()), logits(dlrm), rtol=1e-6, atol=1e-6)
    assert report.skipped == tuple(f"text_arch.{k}" for k in text_before)
    assert all(torch.equal(v, text_before[k]) for k, v in model.text_arch.state_dict().items())
    assert FIRST_OVER in report.copied and TABLE_KEY.format("t_cat") in report.copied

    kept = make_bahe(text_arch=text_arch_factory())
    built = kept.state_dict()[FIRST_OVER].clone()
    assert load_dlrm_weights(kept, dlrm.state_dict(), new_columns="keep").zero_initialised_columns == 0
    weight, zeroed = kept.state_dict()[FIRST_OVER], model.state_dict()[FIRST_OVER]
    new = zeroed.abs().sum(0) == 0
    assert torch.equal(weight[:, new], built[:, new]) and torch.equal(weight[:, ~new], zeroed[:, ~new])


def test_a_new_id_table_can_be_left_as_built_and_the_logits_still_match(dlrm):
    names = ("t_user", "t_new", "t_item", "t_cat")  # a gap in the middle of the interaction columns
    model = make_bahe(names)
    new_table = model.state_dict()[TABLE_KEY.format("t_new")].clone()
    with pytest.raises(ValueError, match=r"embedding_bags\.t_new\.weight: BAHE has it \(12, 4\), the DLRM does not"):
        load_dlrm_weights(model, dlrm.state_dict())
    report = load_dlrm_weights(model, dlrm.state_dict(), ignore_missing=("t_new",))
    assert report.skipped == (TABLE_KEY.format("t_new"),) and report.zero_initialised_columns == 4
    assert torch.equal(model.state_dict()[TABLE_KEY.format("t_new")], new_table)
    torch.testing.assert_close(logits(model), logits(dlrm), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("dlrm_kwargs", "offending"), [
    ({"names": (*TABLES, "t_extra")}, [TABLE_KEY.format("t_extra"), FIRST_OVER,
                                       "build table 't_extra' in BAHE's EBC with num_embeddings=12, embedding_dim=4"]),
    ({"dim": 6, "dense": (8, 6)}, [*(TABLE_KEY.format(t) for t in TABLES), "dense_arch.model._mlp.1._linear.weight",
                                   "dense_arch.model._mlp.1._linear.bias", FIRST_OVER, "(12, 6) vs BAHE (12, 4)"]),
    ({"dense": (16, D)}, ["dense_arch.model._mlp.0._linear.weight", "dense_arch.model._mlp.0._linear.bias",
                          "dense_arch.model._mlp.1._linear.weight", "DLRM (16, 3) vs BAHE (8, 3)"]),
    ({"dense": (8, 8, D)}, ["dense_arch.model._mlp.1._linear.weight", "dense_arch.model._mlp.2._linear.weight",
                            "dense_arch.model._mlp.2._linear.bias", "BAHE does not"]),
    ({"over": (16, 1)}, [FIRST_OVER, "over_arch.model.0._mlp.0._linear.bias", "over_arch.model.1.weight",
                         "over_arch_layer_sizes"]),
    ({"names": ("t_item", "t_user", "t_cat")}, ["ID tables", "['t_item', 't_user', 't_cat']", "DLRM's order"]),
])
def test_mismatches_list_every_offending_name_and_change_nothing(dlrm_kwargs, offending):
    model = make_bahe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot warm-start BAHE from this DLRM") as error:
        load_dlrm_weights(model, make_dlrm(**dlrm_kwargs, steps=0).state_dict())
    assert all(name in str(error.value) for name in offending), str(error.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class NotATensor:
    pass


def test_a_file_with_pickled_objects_is_refused(dlrm, tmp_path):
    torch.save({**dlrm.state_dict(), "extra": NotATensor()}, tmp_path / "dlrm.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_dlrm_weights(make_bahe(), tmp_path / "dlrm.pt")
    torch.save({**dlrm.state_dict(), "step": 3}, tmp_path / "step.pt")
    with pytest.raises(ValueError, match="step: a int, not a plain tensor"):
        load_dlrm_weights(make_bahe(), tmp_path / "step.pt")


@pytest.fixture
def one_gloo_rank(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    from bahe.embeddings.process_group import close_process_group

    close_process_group()


def test_a_sharded_bahe_loads_a_sharded_dlrms_state_dict(dlrm, one_gloo_rank):
    """DMP on one gloo rank, table-wise: the DLRM's state dict holds ShardedTensors under ``model.``."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from bahe.model.sharding import shard_model

    cpu, meta = torch.device("cpu"), torch.device("meta")
    sharded_dlrm = shard_model(DLRMTrain(DLRM(id_tables(device=meta), DENSE_IN, [8, D], [8, 1])), cpu,
                               id_sharding="table_wise", id_tables=list(TABLES))
    sharded_dlrm.load_state_dict(DLRMTrain(dlrm).state_dict())
    state = sharded_dlrm.state_dict()
    assert isinstance(state["model." + TABLE_KEY.format("t_user")], ShardedTensor)

    bahe = shard_model(BAHETrain(BAHE(id_tables(device=meta), DENSE_IN, [8, D], [8, 1])), cpu,
                       id_sharding="table_wise", id_tables=list(TABLES))
    report = load_dlrm_weights(bahe, state)
    assert set(report.copied) == set(make_bahe().state_dict()) and report.skipped == ()
    dense_x, sparse = inputs(names=TABLES)
    bahe.eval()
    with torch.no_grad():
        _, (_, sharded_logits, _) = bahe(Batch(dense_features=dense_x, sparse_features=sparse,
                                               labels=torch.zeros(16)))
        torch.testing.assert_close(sharded_logits, dlrm(dense_x, sparse).squeeze(-1), rtol=1e-6, atol=1e-6)


def test_a_sharded_bahe_with_text_warm_starts_and_keeps_its_frozen_table(dlrm, text_arch_factory, one_gloo_rank):
    """torchrec's load hook of the sharded behaviour table wants its key: the warm start hands the
    table its own values, so it loads, the table is unchanged and the logits are the DLRM's."""
    from bahe.model.behaviour_lookup import BehaviourLookup
    from bahe.model.sharding import shard_model
    from bahe.model.text_arch import BehaviourTextArch

    cpu, meta = torch.device("cpu"), torch.device("meta")
    built = text_arch_factory()
    lookup = BehaviourLookup(30, 16, ["seq_liked", "seq_skipped", ITEM_TEXT_KEY],
                             {"seq_liked": 5, "seq_skipped": 5, ITEM_TEXT_KEY: 1}, device=meta)
    text_arch = BehaviourTextArch(lookup, built.aggregator, ["seq_liked", "seq_skipped"], D)
    bahe = shard_model(BAHETrain(BAHE(id_tables(device=meta), DENSE_IN, [8, D], [8, 1], text_arch=text_arch)), cpu,
                       id_sharding="table_wise", id_tables=list(TABLES))
    table_key = next(k for k in bahe.state_dict() if k.endswith("embeddings.behaviours.weight"))
    before = bahe.state_dict()[table_key].local_shards()[0].tensor.clone()
    report = load_dlrm_weights(bahe, dlrm.state_dict())
    assert report.zero_initialised_columns == 15
    assert torch.equal(bahe.state_dict()[table_key].local_shards()[0].tensor, before)
    dense_x, sparse = inputs(names=TABLES)
    bahe.eval()
    with torch.no_grad():
        _, (_, sharded_logits, _) = bahe(BaheBatch(dense_features=dense_x, sparse_features=sparse,
                                                   labels=torch.zeros(16), behaviour_features=behaviours()))
    torch.testing.assert_close(sharded_logits, dlrm(dense_x, sparse).squeeze(-1), rtol=1e-6, atol=1e-6)
