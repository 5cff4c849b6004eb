"""A trained run's BAHE model, restored unsharded in one process, for exporting its serving parts.

The run is restored by bahe-predict's own code (training/restore.py: :func:`plan_restore` -- the
checkpoint, the best by valid from ``checkpoints/BEST.json`` else the latest, the model config, the train
split and its schema -- and :func:`restore_model` -- the model, the dense statistics the weights learned
on, the store's rows, the weights through the restricted loader). The one difference: the model is built
on the CPU without DistributedModelParallel (DCP reshards the run's sharded tables into plain tensors), so
torchrec's inference path (``quantize_inference_model``) and TorchScript can take its modules as they are.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from bahe.ctr_data.schema import SampleSchema
from bahe.embeddings.store import BehaviourStore
from bahe.model.bahe import BAHE
from bahe.model.batch import SampleBatcher
from bahe.model.config import BaheModelConfig
from bahe.model.dense_features import DenseNormalizer


@dataclass
class RestoredRun:
    """A run's model in eval mode on the CPU, with what serving needs around it.

    Attributes:
        model: the BAHE model (plain torchrec modules, weights of ``checkpoint``).
        batcher: the run's batcher (sample rows -> the model's inputs), dense statistics included.
        store: the behaviour store loaded into the model's frozen table.
        schema: the run's sample schema (from its train split).
        normalizer: the dense statistics the run's weights were trained with (None: without standardising).
        config: the run's model config.
        run, checkpoint, chosen, step: the run folder, the checkpoint folder, why it was chosen, its step.
    """

    model: BAHE
    batcher: SampleBatcher
    store: BehaviourStore
    schema: SampleSchema
    normalizer: DenseNormalizer | None
    config: BaheModelConfig
    run: Path
    checkpoint: Path
    chosen: str
    step: int

    def identity(self) -> dict:
        """What produced a feature: the run, its checkpoint (name, step, SHA-256 over its files), the store."""
        return {"run": str(self.run.resolve()), "checkpoint": self.checkpoint.name, "step": self.step,
                "checkpoint_sha256": checkpoint_digest(self.checkpoint), "chosen": self.chosen,
                "store": str(self.store.path.parent.resolve()), "store_version": self.store.version,
                "store_rows": self.store.rows_count}


def checkpoint_digest(folder: Path) -> str:
    """SHA-256 over a checkpoint folder's files (names and bytes, in name order): two exports come from the
    same weights exactly when their digests agree."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def restore_run(run: Path, *, which: str = "best", data_dir: Path | None = None, store: str | None = None,
                llm: str | None = None, llm_precision: str = "fp32") -> RestoredRun:
    """Restore ``run``'s checkpoint (``best`` or ``latest``, as bahe-predict) unsharded on the CPU, through
    bahe-predict's own steps (training/restore.py :func:`plan_restore`, :func:`restore_model`).

    Raises FileNotFoundError / ValueError (one line) for a run without a checkpoint or record, a missing
    train split, a store that does not hold the run's rows, or a damaged checkpoint.
    """
    from bahe.training.restore import plan_restore, restore_model

    plan = plan_restore(run, which, data_dir=data_dir, store=store, llm=llm, llm_precision=llm_precision)
    if plan.arm != "bahe":
        raise ValueError(f"{run} trained the {plan.arm} arm: only a BAHE run (--arm bahe) has text features to cache; "
                         "a DLRM-only run serves as it is (torchrec's inference path)")
    from bahe.model.text_levers import refuse_item_dependent

    refuse_item_dependent(plan.model.text.user_aggregation, str(run),
                          "its serving parts (cached text features, predictor) cannot be exported; score it with "
                          "the full model (bahe-predict or bahe-evaluate, without --features)")
    restored = restore_model(plan, torch.device("cpu"), sharded=False)
    return RestoredRun(restored.model, restored.batcher, restored.store, plan.schema, restored.normalizer, plan.model,
                       plan.run, plan.checkpoint, plan.chosen, restored.step)
