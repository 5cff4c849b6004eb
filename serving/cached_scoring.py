"""``bahe-predict --features EXPORT``: a run's rows scored with the text features of a ``bahe-export`` folder
in place of the LLM's deep layers.

Per row: the item feature is the export's row of the title's store id (normalised the store's way; an
empty title -> store id 0's row, a title the store has not encoded -> store id 1's row), the user features
are users.parquet's row of the user (a user the export does not hold -> ``manifest.empty_user_features``),
then the model's interaction part runs (``BAHE.forward_from_text_features``). Lookups are
serving/requests.py's :class:`~bahe.serving.requests.FeatureCache`, the reference a server follows.

An export serves only the weights it was computed with: one made from another checkpoint than the one
bahe-predict selected (its manifest's ``producer.checkpoint_sha256``), or from a run that is not
``--arm bahe``, is refused before the model is built; opening the version verifies its checksums.
Scores equal the full model's for rows that are their user's sample in the export (its ``as_of``); for a
later row, the user's features are those of the export's cut-off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from bahe.ctr_data.schema import ITEM_TEXT, USER_ID
from bahe.embeddings.store import MANIFEST_DIGEST
from bahe.embeddings.vocabulary import PAD_ID, UNKNOWN_ID
from bahe.model.batch import SampleBatcher
from bahe.serving.export_store import MANIFEST, ExportError, ExportVersion
from bahe.serving.requests import FeatureCache


def open_export(path: Path) -> ExportVersion:
    """The export at ``path``: an export folder (its LATEST version) or one version folder (vNNNNNN holding a
    manifest.json); verified (manifest digest, every file's SHA-256)."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"--features {path} is not a folder: give a bahe-export --out folder or one of its "
                          "version folders (vNNNNNN)")
    if (path / MANIFEST).is_file():
        return ExportVersion.open(path.parent, path.name)
    return ExportVersion.open(path)


def id_batcher(batcher: SampleBatcher) -> SampleBatcher:
    """``batcher`` without the behaviour lookups (dense and ID features, the same statistics and tables): with
    cached features the store ids of the behaviours are never read."""
    return SampleBatcher(batcher.schema, batcher.table_sizes, vocabulary=None, dense_normalizer=batcher.dense_normalizer)


def _short(digest: str | None) -> str:
    return f"{digest[:12]}..." if digest else "none recorded"


class CachedTextFeatures:
    """An export's text features for the rows of a scoring run (see the module doc).

    Args:
        export: the verified export version.

    Example::

        cached = CachedTextFeatures.for_run(Path("serving/ml"), plan)   # refused unless plan's checkpoint made it
        text = cached(table, real)                                      # B x (N + 1) x D: N user, 1 item
    """

    def __init__(self, export: ExportVersion):
        self.export = export
        self.cache = FeatureCache(export)
        self.counts = {"rows": 0, "users_in_export": 0, "users_not_in_export": 0, "titles_empty": 0,
                       "titles_not_in_store": 0}

    @classmethod
    def for_run(cls, path: Path, plan) -> CachedTextFeatures:
        """Open ``path`` for ``plan`` (a :class:`~bahe.serving.restore.RestorePlan`): refused, in one line, for a
        run that is not --arm bahe, a damaged export, or one computed from another checkpoint."""
        from bahe.serving.restore import checkpoint_digest

        if plan.arm != "bahe":
            raise ValueError(f"--features {path}: {plan.run} trained the {plan.arm} arm; cached text features are "
                             "those of a BAHE run (--arm bahe): score this run without --features")
        from bahe.model.text_levers import refuse_item_dependent

        refuse_item_dependent(plan.model.text.user_aggregation, f"--features {path}: {plan.run}",
                              "score this run without --features (the full model)")
        export = open_export(path)
        producer = export.manifest.get("producer", {})
        digest = checkpoint_digest(plan.checkpoint)
        if producer.get("checkpoint_sha256") != digest:
            raise ExportError(
                f"--features {export.path} was exported from {producer.get('run')} {producer.get('checkpoint')} "
                f"(sha256 {_short(producer.get('checkpoint_sha256'))}), but bahe-predict selected {plan.checkpoint} "
                f"({plan.chosen}; sha256 {_short(digest)}): features of one checkpoint are meaningless to another; "
                "export this checkpoint (bahe-export), or choose the export's (--which)")
        return cls(export)

    def check_model(self, model) -> None:
        """The export's shapes are the model's (N sequence types in the same order, D)."""
        manifest, text_arch = self.export.manifest, model.text_arch
        ours = {"sequence_keys": list(text_arch.sequence_keys),
                "embedding_dim": text_arch.user_projection.out_features}
        theirs = {key: manifest.get(key) for key in ours}
        if ours != theirs:
            raise ExportError(f"--features {self.export.path}: its manifest has {theirs}, the run's model {ours}; "
                              "export this run again (bahe-export)")

    def __call__(self, table: pa.Table, real: int | None = None) -> torch.Tensor:
        """B x (N + 1) x D float32 text features of sample rows (N user features, then the item's); the first
        ``real`` rows (None: all) are counted in :attr:`counts`."""
        user_rows = self.cache.user_rows(table.column(USER_ID).to_numpy())
        store_ids = self.cache.store_ids(table.column(ITEM_TEXT))
        real = table.num_rows if real is None else real
        counts = self.counts
        counts["rows"] += real
        counts["users_not_in_export"] += int(np.count_nonzero(user_rows[:real] < 0))
        counts["users_in_export"] += int(np.count_nonzero(user_rows[:real] >= 0))
        counts["titles_empty"] += int(np.count_nonzero(store_ids[:real] == PAD_ID))
        counts["titles_not_in_store"] += int(np.count_nonzero(store_ids[:real] == UNKNOWN_ID))
        user_text, item_text = self.cache.user_text(user_rows), self.cache.item_text(store_ids)
        return torch.cat([user_text, item_text.unsqueeze(1)], dim=1)

    def record(self, counts: dict[str, int] | None = None) -> dict:
        """What the score file's metadata records: the export version, what produced it, the lookup counts."""
        manifest = self.export.manifest
        producer = manifest.get("producer", {})
        return {"from": "export", "export": str(self.export.path.resolve()), "version": self.export.version,
                "as_of": manifest.get("as_of"), "checkpoint": producer.get("checkpoint"),
                "checkpoint_sha256": producer.get("checkpoint_sha256"),
                MANIFEST_DIGEST: manifest.get(MANIFEST_DIGEST), **(counts or self.counts)}
