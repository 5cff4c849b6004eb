"""A trained run's BAHE model, restored unsharded in one process, for exporting its serving parts.

The run's checkpoint, model config, feature schema and dense statistics are chosen exactly as
``bahe-predict`` chooses them (training/scoring.py: :func:`select_checkpoint` -- the best by valid from
``checkpoints/BEST.json``, else the latest --, :func:`run_model_config`, :func:`training_split`); the
weights are read through the same restricted loader (training/checkpoint.py ``load_into``, which goes
through training/safe_load.py). The difference: the model is built on the CPU without
DistributedModelParallel (DCP reshards the run's sharded tables into plain tensors), so torchrec's
inference path (``quantize_inference_model``) and TorchScript can take its modules as they are.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from bahe.ctr_data.parquet_io import SampleReader
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
    """Restore ``run``'s checkpoint (``best`` or ``latest``, as bahe-predict) unsharded on the CPU.

    Raises FileNotFoundError / ValueError (one line) for a run without a checkpoint or record, a missing
    train split, a store that does not hold the run's rows, or a damaged checkpoint.
    """
    from bahe.model.bahe import BAHETrain
    from bahe.model.behaviour_lookup import load_store_rows
    from bahe.model.factory import build_model
    from bahe.training.checkpoint import load_into
    from bahe.training.run_record import check_run_store
    from bahe.training.scoring import run_dense_statistics, run_model_config, select_checkpoint, training_split

    run = Path(run)
    checkpoint, chosen = select_checkpoint(run, which)
    config, standardize, _, record = run_model_config(run, store=store, llm=llm, llm_precision=llm_precision)
    if config.text is None or config.text.arm != "bahe":
        arm = config.text.arm if config.text else "dlrm"
        raise ValueError(f"{run} trained the {arm} arm: only a BAHE run (--arm bahe) has text features to cache; "
                         "a DLRM-only run serves as it is (torchrec's inference path)")
    train = training_split(run, data_dir, record)
    schema = SampleReader(train).schema
    normalizer = run_dense_statistics(run, train) if standardize else None  # those the weights learned on
    model, batcher, behaviour_store = build_model(config, schema, device="cpu", dense_normalizer=normalizer)
    check_run_store(run, behaviour_store)  # a store that does not hold the run's rows unchanged is refused
    load_store_rows(model, behaviour_store)
    progress = {"step": torch.tensor(0)}
    load_into(checkpoint, BAHETrain(model), progress=progress)  # restricted loaders; the model only
    model.eval()
    return RestoredRun(model, batcher, behaviour_store, schema, normalizer, config, run, checkpoint, chosen,
                       int(progress["step"]))
