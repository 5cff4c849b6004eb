"""A BAHE model trained briefly on synthetic data beats the DLRM-only arm, built from the same
config and head, on the data's planted text signal (labels depend on the behaviour texts)."""

from __future__ import annotations

import pytest
import torch
from bahe.model.bahe import BAHETrain
from bahe.model.behaviour_lookup import load_store_rows
from bahe.model.factory import build_model
from torchmetrics.functional.classification import binary_auroc
from torchrec.optim.optimizers import in_backward_optimizer_filter

from tests.model_fixtures import make_tiny_pipeline

pytestmark = pytest.mark.integration


def train_and_score(pipeline, text: bool, epochs: int = 4) -> float:
    torch.manual_seed(0)
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
    # many users, few repeat visits: ids cannot learn a user's interest, the behaviour texts can
    pipeline = make_tiny_pipeline(tmp_path, samples=4000, hidden=64, num_topics=2, num_users=20_000,
                                  topic_affinity=0.8)
    dlrm_auc = train_and_score(pipeline, text=False)
    bahe_auc = train_and_score(pipeline, text=True)
    assert bahe_auc > dlrm_auc + 0.1, (bahe_auc, dlrm_auc)
    assert bahe_auc > 0.75
