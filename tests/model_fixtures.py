"""A small real pipeline for model tests: synthetic samples -> a store from a tiny Llama -> configs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bahe.ctr_data.parquet_io import SampleReader
from bahe.ctr_data.synthetic import SyntheticConfig, write_synthetic
from bahe.embeddings.build import build_store
from bahe.embeddings.encoder import EncoderConfig
from bahe.model.config import ArchConfig, BaheModelConfig, TablesConfig, TextConfig
from tests.llm_fixtures import make_tiny_llama

TINY_LAYERS, TINY_HIDDEN, K = 4, 32, 2


@dataclass
class TinyPipeline:
    llm: Path
    data: Path
    store: Path

    def config(self, *, text: bool = True, dim: int = 8, **text_options) -> BaheModelConfig:
        return BaheModelConfig(
            tables=TablesConfig(embedding_dim=dim, default_rows=64, rows={"item_id": 128}),
            arch=ArchConfig(dense_arch_layer_sizes=(16, dim), over_arch_layer_sizes=(16, 1)),
            text=TextConfig(store=str(self.store), llm=str(self.llm), max_behaviours=6, **text_options)
            if text else None)

    def table(self, rows: int | None = None):
        table = SampleReader(self.data).read_all()
        return table.slice(0, rows) if rows else table

    @property
    def schema(self):
        return SampleReader(self.data).schema


def make_tiny_pipeline(root: Path, *, samples: int = 400, seed: int = 0, hidden: int = TINY_HIDDEN,
                       **synthetic) -> TinyPipeline:
    llm = make_tiny_llama(root / "llm", layers=TINY_LAYERS, hidden=hidden)
    data = root / "samples.parquet"
    options = {"num_users": 200, "num_items": 60, "num_samples": samples, "behaviours_per_sequence": 8,
               "tokens_per_behaviour": 6, "distinct_behaviours": 40, "num_topics": 4, "seed": seed, **synthetic}
    write_synthetic(SyntheticConfig(**options), data)
    build_store(root / "store", [data], EncoderConfig(model=str(llm), k=K, device="cpu", batch_tokens=64),
                show_progress=False)
    return TinyPipeline(llm, data, root / "store")


def split_by_time(pipeline: TinyPipeline, out_dir: Path, fractions=(0.8, 0.1, 0.1)) -> Path:
    """train/valid/test.parquet from the pipeline's (time-ordered) samples."""
    from bahe.ctr_data.parquet_io import SampleWriter

    table = pipeline.table()
    cuts = [0, int(table.num_rows * fractions[0]), int(table.num_rows * (fractions[0] + fractions[1])), table.num_rows]
    for name, start, stop in zip(("train", "valid", "test"), cuts, cuts[1:]):
        with SampleWriter(out_dir / f"{name}.parquet", pipeline.schema) as writer:
            writer.write(table.slice(start, stop - start))
    return out_dir
