"""A BAHE model trained briefly on synthetic data beats the DLRM-only arm, built from the same
config and head, on the data's planted text signal (labels depend on the behaviour texts)."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc
from torchrec.optim.optimizers import in_backward_optimizer_filter

from bahe.model.bahe import BAHETrain
from bahe.model.behaviour_lookup import load_store_rows
from bahe.model.factory import build_model
from tests.model_fixtures import make_tiny_pipeline

pytestmark = pytest.mark.integration


SEEDS = (0, 1, 2)


def train_and_score(pipeline, text: bool, seed: int, epochs: int = 4) -> float:
    torch.manual_seed(seed)
    model, batcher, store = build_model(pipeline.config(text=text, dim=16), pipeline.schema)
    if store is not None:
        load_store_rows(model, store)
    train = BAHETrain(model)
    optimizer = torch.optim.Adam(dict(in_backward_optimizer_filter(model.named_parameters())).values(), lr=5e-3)
    table = pipeline.table()
    cut = int(table.num_rows * 0.8)  # time-ordered: train on the first 80%, test on the rest
    for _ in range(epochs):
        for start in range(0, cut, 64):
            loss, _ = train(batcher(table.slice(start, min(64, cut - start))))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        batch = batcher(table.slice(cut))
        logits = model(batch.dense_features, batch.sparse_features, batch.behaviour_features).squeeze(-1)
    return binary_auroc(torch.sigmoid(logits), batch.labels.long()).item()


def test_bahe_beats_the_dlrm_only_arm_on_the_text_signal(tmp_path):
    """The text signal is a match of the item title's topic with the user's behaviour topics: a product of
    two learned text projections, whose gradient starts near zero, so a run leaves that plateau at a seed-,
    thread- and CPU-dependent step or not at all within 4 epochs. Each arm therefore trains 3 seeds and the
    best of each is compared; a broken text path fails every seed.

    Spread measured (2026-12-06, this data, 4 epochs, seeds 0-2; 1 and 2 torch threads): DLRM-only
    0.561-0.580; BAHE 0.795-0.900 per seed, gap to DLRM-only 0.215-0.327 per seed, best-of-3 gap 0.316
    (1 thread) and 0.327 (2 threads). Another 2-core machine gave BAHE 0.732 at seed 0 (a gap of about
    0.15), which failed the absolute BAHE > 0.75 this test asserted before (issue 32). Other synthetic data
    seeds show the plateau more often (seed by seed gaps from -0.03 to 0.41; bench notes in issue 32's
    closing note). Margin: the asserted best-of-3 gap of 0.1 is 0.2 below the lowest best-of-3 gap measured
    here and 0.05 below the lowest single-seed gap seen on any machine."""
    # many users, few repeat visits: ids cannot learn a user's interest, the behaviour texts can
    pipeline = make_tiny_pipeline(tmp_path, samples=4000, hidden=64, num_topics=2, num_users=20_000,
                                  topic_affinity=0.8)
    dlrm_auc = max(train_and_score(pipeline, text=False, seed=seed) for seed in SEEDS)
    bahe_auc = max(train_and_score(pipeline, text=True, seed=seed) for seed in SEEDS)
    assert bahe_auc > dlrm_auc + 0.1, (bahe_auc, dlrm_auc)
