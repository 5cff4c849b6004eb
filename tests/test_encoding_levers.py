"""The encoding levers of issue 17 item 3: sink-aware pooling, a frozen post-transform from the store's
statistics, and every encoding choice versioned in the manifest (refused when it differs, a different
store for the trainer's lineage check, an old manifest read as pooling mean / post-transform none)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from bahe.embeddings.build import build_store
from bahe.embeddings.cli import main
from bahe.embeddings.encoder import EncoderConfig, ShallowEncoder, pool_tokens
from bahe.embeddings.encoding import TOKENIZER_FILES, tokenizer_facts
from bahe.embeddings.post_transform import POST_TRANSFORM_FILE, PostTransform
from bahe.embeddings.store import MANIFEST, BehaviourStore, Expected, StoreError, manifest_digest
from bahe.embeddings.store_stats import anisotropy
from bahe.embeddings.vocabulary import RESERVED
from bahe.training.run_record import describe_store, lineage_problem, store_record
from tests.llm_fixtures import make_tiny_llama
from tests.test_store import texts, write_samples

K, HIDDEN = 2, 32
TEXTS = ["Purchase at Starbucks Coffee 12.50 CNY", "Search: cheap flights to Shanghai", "Toy Story (1995)",
         "Café crème · 北京烤鸭 🍜🎬", "a", "Visit mini-program Metro Pass"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def config(model, **kw) -> EncoderConfig:
    return EncoderConfig(model=str(model), k=K, device="cpu", batch_tokens=64, **kw)


def build(root, files, model, **kw):
    return build_store(root, files, config(model, **kw), show_progress=False)


def text_rows(store: BehaviourStore) -> np.ndarray:
    return store.rows(len(RESERVED), store.rows_count)


# --- pooling ---------------------------------------------------------------------------------------

def hand_pooled(states: np.ndarray, pooling: str, factor: float) -> tuple[np.ndarray, list[int]]:
    """One text's L x H states (float64) pooled by hand; returns (vector, the positions averaged)."""
    positions = list(range(len(states)))
    if pooling == "last":
        positions = [len(states) - 1]
    elif pooling == "mean_skip_first" and len(states) > 1:
        positions = positions[1:]
    elif pooling == "mean_skip_massive":
        norms = [float(np.sqrt(sum(v * v for v in state))) for state in states]
        positions = [i for i in positions if norms[i] <= factor * min(norms)]
    return sum(states[i] for i in positions) / len(positions), positions


@pytest.mark.parametrize("pooling", ["mean", "last", "mean_skip_first", "mean_skip_massive"])
def test_each_pooling_matches_a_hand_computation_from_hugging_face_hidden_states(tiny_llama, pooling):
    """Reference: the full Hugging Face model's own ``hidden_states[k]`` of each text alone (no padding),
    pooled by hand. The random tiny model has no massive activations, so the factor here is 1.3: some
    tokens of every long text are left out, some kept."""
    from transformers import AutoModel, AutoTokenizer

    factor = 1.3
    vectors, _ = ShallowEncoder(config(tiny_llama, pooling=pooling, massive_factor=factor)).encode(TEXTS)
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_llama), AutoModel.from_pretrained(tiny_llama).eval()
    dropped = []
    for text, vector in zip(TEXTS, vectors):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            states = model(input_ids=ids, output_hidden_states=True).hidden_states[K][0].double().numpy()
        expected, kept = hand_pooled(states, pooling, factor)
        dropped.append(len(states) - len(kept))
        np.testing.assert_allclose(vector, expected, rtol=1e-5, atol=1e-5)
    if pooling == "mean_skip_first":
        assert dropped == [1] * len(TEXTS)  # the tokenizer's [CLS] (position 0) left out of every text
    if pooling == "mean_skip_massive":
        assert any(dropped) and not all(dropped)


def test_a_one_token_text_keeps_its_token_and_the_smallest_norm_is_never_dropped():
    hidden = torch.randn(3, 1, 8)
    assert torch.equal(pool_tokens(hidden, "mean_skip_first"), hidden[:, 0])
    assert torch.equal(pool_tokens(hidden, "mean_skip_massive", 1.0), hidden[:, 0])
    sink = torch.ones(1, 4, 8)
    sink[0, 0] *= 50.0  # an attention sink at position 0: 50x the others' norm
    assert torch.equal(pool_tokens(sink, "mean_skip_massive", 4.0), torch.ones(1, 8))
    assert torch.equal(pool_tokens(sink, "mean_skip_massive", 60.0), sink.mean(dim=1))
    with pytest.raises(ValueError, match="massive_factor must be >= 1"):
        EncoderConfig(pooling="mean_skip_massive", massive_factor=0.5)


def test_the_tokenizer_facts_say_what_position_zero_is(tiny_llama):
    """The tiny fixtures use MiniLM's BERT tokenizer: [CLS] before a text (so position 0 is [CLS]), [SEP]
    after; the hash covers the tokenizer's files."""
    from transformers import AutoTokenizer

    facts = tokenizer_facts(tiny_llama, AutoTokenizer.from_pretrained(tiny_llama))
    assert facts["special_tokens"] == {"prefix": ["[CLS]"], "suffix": ["[SEP]"]} and facts["bos_prepended"] is True
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (tiny_llama / name).is_file():
            digest.update(name.encode() + b"\0" + (tiny_llama / name).read_bytes() + b"\0")
    assert facts["tokenizer_sha256"] == digest.hexdigest()


@pytest.mark.integration
@pytest.mark.parametrize("alias, prefix", [("smollm2-135m", []), ("gemma3-270m", ["<bos>"])])
def test_smollm2_adds_no_bos_and_gemma_prepends_one(alias, prefix):
    """SmolLM2: position 0 is the text's first word (its attention sink); Gemma: position 0 is <bos>."""
    from transformers import AutoTokenizer

    from bahe.embeddings.pretrained import resolve_model_dir

    model_dir = resolve_model_dir(alias)
    facts = tokenizer_facts(model_dir, AutoTokenizer.from_pretrained(model_dir))
    assert facts["special_tokens"]["prefix"] == prefix and facts["bos_prepended"] == bool(prefix)


# --- post-transform ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def days(tmp_path_factory, tiny_llama):
    """Two days of data (day 1: 70 texts > H = 32 dims; day 2 adds 20) and a none / whiten store of day 1."""
    from bahe.ctr_data.schema import SampleSchema

    schema = SampleSchema(categorical=("genre",), dense=("age",), sequences=("liked", "disliked"), dataset="tiny")
    root = tmp_path_factory.mktemp("days")
    day1 = write_samples(root / "d1.parquet", schema, [texts("Pay", 35), texts("Visit", 33)], ["T1", "T2"])
    day2 = write_samples(root / "d2.parquet", schema, [texts("Ride", 20)], ["T1"])
    build(root / "plain", [day1], tiny_llama)
    build(root / "whiten", [day1], tiny_llama, post_transform="whiten")
    return root, day1, day2


def test_whiten_gives_identity_covariance_on_the_fitted_rows(days, tiny_llama, tmp_path):
    """With a negligible eps the covariance of the stored rows is the identity; with the default eps it is
    ``U diag(lambda / (lambda + eps mean(lambda))) U^T`` (below 1 only where the raw variance is tiny)."""
    root, day1, _ = days
    build(tmp_path / "exact", [day1], tiny_llama, post_transform="whiten", whiten_eps=1e-12)
    exact = text_rows(BehaviourStore.open(tmp_path / "exact")).astype(np.float64)
    assert len(exact) > HIDDEN
    np.testing.assert_allclose(exact.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.cov(exact.T, bias=True), np.eye(HIDDEN), atol=1e-4)
    plain, white = BehaviourStore.open(root / "plain"), BehaviourStore.open(root / "whiten")
    rows = text_rows(white).astype(np.float64)
    np.testing.assert_allclose(rows.mean(axis=0), 0.0, atol=1e-5)
    assert not white.rows(0, len(RESERVED)).any()  # pad and unknown rows stay zero
    # the rows are the raw vectors (the plain store's) through a ZCA whitening worked out here
    raw = text_rows(plain).astype(np.float64)
    mean = raw.mean(axis=0)
    eigenvalues, vectors = np.linalg.eigh(np.cov(raw.T, bias=True))
    zca = vectors @ np.diag(1 / np.sqrt(np.clip(eigenvalues, 0, None) + 1e-4 * eigenvalues.mean())) @ vectors.T
    np.testing.assert_allclose(rows, (raw - mean) @ zca, rtol=1e-4, atol=1e-4)
    shrink = np.clip(eigenvalues, 0, None) / (np.clip(eigenvalues, 0, None) + 1e-4 * eigenvalues.mean())
    np.testing.assert_allclose(np.cov(rows.T, bias=True), vectors @ np.diag(shrink) @ vectors.T, atol=1e-4)
    assert white.encoding["post_transform_sha256"] == hashlib.sha256(
        (white.path / POST_TRANSFORM_FILE).read_bytes()).hexdigest()
    white.verify()  # the statistics file is checksummed with the others


def test_center_subtracts_the_mean_of_the_first_builds_texts(days, tiny_llama, tmp_path):
    root, day1, _ = days
    build(tmp_path / "center", [day1], tiny_llama, post_transform="center")
    centred, plain = BehaviourStore.open(tmp_path / "center"), BehaviourStore.open(root / "plain")
    raw = text_rows(plain).astype(np.float64)
    np.testing.assert_allclose(text_rows(centred), raw - raw.mean(axis=0), atol=1e-5)
    assert centred.post_transform().matrix is None


def test_an_incremental_build_reuses_the_frozen_statistics_and_keeps_old_rows_byte_identical(days, tiny_llama,
                                                                                            tmp_path):
    root, day1, day2 = days
    import shutil

    shutil.copytree(root / "whiten", tmp_path / "w")
    first = BehaviourStore.open(tmp_path / "w")
    report = build(tmp_path / "w", [day1, day2], tiny_llama, post_transform="whiten")
    second = BehaviourStore.open(tmp_path / "w")
    assert report.new_texts == 20 and second.version == "v000002"
    assert second.rows(0, first.rows_count).tobytes() == first.rows(0, first.rows_count).tobytes()
    assert (second.path / POST_TRANSFORM_FILE).read_bytes() == (first.path / POST_TRANSFORM_FILE).read_bytes()
    assert second.manifest["post_transform_fit"] == {"version": "v000001", "rows": first.rows_count - 2}
    # the new rows: the first version's frozen statistics applied to the encoder's raw vectors
    new_texts = second.vocabulary.texts[first.rows_count:]
    raw, _ = ShallowEncoder(config(tiny_llama)).encode(new_texts)
    frozen = first.post_transform()
    assert second.rows(first.rows_count, second.rows_count).tobytes() == frozen.apply(raw).tobytes()
    # not a refit: a scratch build of both days fits other statistics and gives other rows
    build(tmp_path / "scratch", [day1, day2], tiny_llama, post_transform="whiten")
    scratch = BehaviourStore.open(tmp_path / "scratch")
    assert scratch.encoding["post_transform_sha256"] != second.encoding["post_transform_sha256"]
    assert not np.allclose(scratch.rows(2, first.rows_count), first.rows(2, first.rows_count), atol=1e-3)


def test_a_rows_transform_does_not_depend_on_the_rows_beside_it():
    rng = np.random.default_rng(0)
    fitted = rng.normal(size=(300, 40)).astype(np.float32)
    transform = PostTransform.fit("whiten", lambda: iter([fitted[:100], fitted[100:]]), 1e-4)
    together = transform.apply(fitted)
    alone = np.concatenate([transform.apply(fitted[i:i + 1]) for i in range(len(fitted))])
    assert together.tobytes() == alone.tobytes()


# --- versioned choices -------------------------------------------------------------------------------

def test_a_refresh_with_other_choices_is_refused_in_one_line_naming_both_sides(days, tiny_llama, tmp_path, capsys):
    root, day1, day2 = days
    plain = root / "plain"
    for choice, message in (({"pooling": "mean_skip_first"}, "pooling: parent 'mean', now 'mean_skip_first'"),
                            ({"post_transform": "whiten"}, "post_transform: parent 'none', now 'whiten'")):
        with pytest.raises(StoreError, match=message) as refused:
            build(plain, [day1, day2], tiny_llama, **choice)
        assert "\n" not in str(refused.value)
    with pytest.raises(StoreError, match="whiten_eps: parent 0.0001, now 0.01"):
        build(root / "whiten", [day2], tiny_llama, post_transform="whiten", whiten_eps=1e-2)
    with pytest.raises(StoreError, match="post_transform: parent 'whiten', now 'none'"):
        build(root / "whiten", [day2], tiny_llama)
    assert BehaviourStore.open(plain).version == "v000001"  # nothing was published
    # the CLI: a refresh without the flags takes the store's own choices; a flag that differs is refused
    import shutil

    shutil.copytree(root / "whiten", tmp_path / "w")
    common = ["build", "--store", str(tmp_path / "w"), "--model", str(tiny_llama), "--k", str(K), "--device", "cpu",
              "--batch-tokens", "64", "--quiet"]
    assert main([*common, "--data", str(day1), "--post-transform", "center"]) == 2
    assert "post_transform: parent 'whiten', now 'center'" in capsys.readouterr().err
    assert main([*common, "--data", str(day1), str(day2)]) == 0
    assert BehaviourStore.open(tmp_path / "w").encoding["post_transform"] == "whiten"


def test_the_lineage_check_treats_another_choice_as_another_store(days, tiny_llama, tmp_path):
    root, day1, _ = days
    recorded = store_record(BehaviourStore.open(root / "plain"))
    assert lineage_problem(recorded, BehaviourStore.open(root / "plain")) is None
    white = BehaviourStore.open(root / "whiten")
    assert "post_transform 'whiten' (the run's 'none')" in lineage_problem(recorded, white)
    build(tmp_path / "skip", [day1], tiny_llama, pooling="mean_skip_massive", massive_factor=1.5)
    skip = BehaviourStore.open(tmp_path / "skip")
    assert "pooling 'mean_skip_massive' (the run's 'mean')" in lineage_problem(recorded, skip)
    assert "massive_factor 1.5 (the run's None)" in lineage_problem(recorded, skip)
    # another fit of the statistics (same choices, other texts) is another store too
    other = store_record(white)
    assert "post_transform_sha256" in lineage_problem({**other, "encoder": {**other["encoder"],
                                                                            "post_transform_sha256": "0" * 64}}, white)
    assert "pooling mean_skip_massive (x1.5)" in describe_store(store_record(skip))
    assert "post-transform whiten (eps 0.0001, stats" in describe_store(other)
    assert "pooling" not in describe_store(recorded)  # the defaults: the description as before
    white.check(Expected(pooling="mean", post_transform="whiten"))
    with pytest.raises(StoreError, match="post_transform: store has 'whiten', config asks for 'none'"):
        white.check(Expected(post_transform="none"))


def as_old_manifest(version_dir) -> dict:
    """Rewrite a version's manifest as stores were written before the levers: no pooling factor, no
    post-transform, no tokenizer facts (its digest recomputed, as the old code wrote it)."""
    path = version_dir / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["encoder"] = {key: manifest["encoder"][key] for key in
                           ("k", "pooling", "dtype", "max_tokens", "batch_tokens", "fixed_shapes")}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def test_an_old_manifest_reads_as_mean_and_no_post_transform_and_keeps_working(days, tiny_llama, tmp_path, capsys):
    import shutil

    root, day1, day2 = days
    shutil.copytree(root / "plain", tmp_path / "old")
    old_encoder = as_old_manifest(tmp_path / "old" / "v000001")["encoder"]
    old = BehaviourStore.open(tmp_path / "old")
    old.verify()
    assert old.encoding["pooling"] == "mean" and old.encoding["post_transform"] == "none"
    assert old.encoding["tokenizer_sha256"] is None and old.post_transform() is None
    old.check(Expected(pooling="mean", post_transform="none"))
    assert main(["info", str(tmp_path / "old"), "--stats"]) == 0
    assert "pooling mean, post-transform none" in capsys.readouterr().out
    # a run recorded on it by the old code (its raw encoder section) still matches it, and its refresh
    recorded = {**store_record(old), "encoder": old_encoder}
    assert lineage_problem(recorded, old) is None
    assert main(["build", "--store", str(tmp_path / "old"), "--data", str(day1), str(day2), "--model",
                 str(tiny_llama), "--k", str(K), "--device", "cpu", "--batch-tokens", "64", "--quiet"]) == 0
    refreshed = BehaviourStore.open(tmp_path / "old")
    assert refreshed.version == "v000002" and refreshed.encoding["tokenizer_sha256"]  # now recorded
    assert lineage_problem(recorded, refreshed) is None
    # the old store refused to be read as another encoding all the same
    with pytest.raises(StoreError, match="post_transform: parent 'none', now 'center'"):
        build(tmp_path / "old", [day2], tiny_llama, post_transform="center")


def test_info_stats_reports_on_the_transformed_rows_and_whitening_drops_the_anisotropy(days, capsys):
    root, _, _ = days
    figures = {}
    for name in ("plain", "whiten"):
        assert main(["info", str(root / name), "--stats", "--json"]) == 0
        figures[name] = json.loads(capsys.readouterr().out)["stats"]
        assert figures[name] == pytest.approx(anisotropy(text_rows(BehaviourStore.open(root / name))))
    assert figures["plain"]["mean_cosine"] > 0.5 and abs(figures["whiten"]["mean_cosine"]) < 0.05
    assert figures["whiten"]["effective_rank"] > 4 * figures["plain"]["effective_rank"]
    assert figures["whiten"]["top_channel_energy"] < figures["plain"]["top_channel_energy"] / 2
    assert main(["info", str(root / "whiten"), "--stats"]) == 0
    out = capsys.readouterr().out
    assert "post-transform whiten (eps 0.0001" in out and "(rows as stored, post-transform whiten)" in out
    assert "adds ['[CLS]'] before a text and ['[SEP]'] after it (BOS prepended: yes)" in out


def test_the_quality_bench_names_stores_and_runs_by_their_choices():
    """bench.quality_bench: a cell's store and run folders carry its non-default choices, so every cell keeps
    its own and a finished run is found again; the defaults keep the names the bench always used."""
    from bahe.launchers.demo import PRESETS
    from bench.quality_bench import cell_suffix, run_name, store_suffix

    defaults = {"k": PRESETS["cpu"]["k"], "deep_layers": PRESETS["cpu"]["deep_layers"]}
    plain = {"pooling": "mean", "post_transform": "none"}
    lever = {"pooling": "mean_skip_first", "post_transform": "whiten"}
    assert store_suffix(8, "mean_skip_first", "whiten", 4) == "-k8-mean_skip_first-whiten"
    assert store_suffix(4, "mean", "none", 4) == ""
    deep = dict(PRESETS["cpu"], k=15, deep_layers=2)
    assert cell_suffix("bahe", deep, lever, defaults) == "-k15-d2-mean_skip_first-whiten"
    assert cell_suffix("token_level", deep, lever, defaults) == "-k15-d2"  # reads no store rows
    assert cell_suffix("dlrm", deep, lever, defaults) == ""
    assert cell_suffix("bahe", PRESETS["cpu"], plain, defaults) == ""
    assert run_name("bahe", 0, 20, "auto", "", "", cell_suffix("bahe", PRESETS["cpu"], lever, defaults)) == \
        "bahe-seed0-steps20-mean_skip_first-whiten"
    assert run_name("bahe", 0, 600, "bf16", "-m20", "-gemma3-270m", "-k8") == "bahe-seed0-steps600-m20-gemma3-270m-k8-bf16"
    # the text arch's model levers (bahe-train --user-projection / --user-aggregation): the BAHE arm's runs only
    both = {"user_projection": "per_type", "user_aggregation": "target_attention"}
    assert cell_suffix("bahe", deep, lever, defaults, both) == "-k15-d2-mean_skip_first-whiten-pertype-tattn"
    assert cell_suffix("bahe", PRESETS["cpu"], plain, defaults, {"user_aggregation": "target_attention"}) == "-tattn"
    assert cell_suffix("bahe", PRESETS["cpu"], plain, defaults, {"user_projection": "per_type"}) == "-pertype"
    assert cell_suffix("bahe", PRESETS["cpu"], plain, defaults, {"user_projection": "shared",
                                                                 "user_aggregation": "pooled"}) == ""
    assert cell_suffix("token_level", deep, lever, defaults, both) == "-k15-d2"
    # the store's row dtype (--store-dtype): its own store and BAHE runs; the other arms read no store rows
    half = {**plain, "store_dtype": "bfloat16"}
    assert store_suffix(4, "mean", "none", 4, "bfloat16") == "-bfloat16"
    assert store_suffix(4, "mean", "none", 4, "float32") == ""
    assert cell_suffix("bahe", PRESETS["cpu"], half, defaults) == "-bfloat16"
    assert cell_suffix("dlrm", PRESETS["cpu"], half, defaults) == cell_suffix("token_level", PRESETS["cpu"], half,
                                                                              defaults) == ""
    assert cell_suffix("dlrm", deep, lever, defaults, both) == ""
