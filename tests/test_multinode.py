"""Multi-node on one machine (issue 19, item 1): TorchX's local scheduler runs ``-j 2x1`` as two nodes of
one rank each -- two torchrun agents that meet through a c10d rendezvous on localhost -- for ``encode``
and ``train``. The planner sees 2 hosts; the 2x1 run trains like the 1x2 run (same global batch, same
rows: the same metrics), and the 2x1 encode writes the store a single process writes."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from bahe.embeddings.store import BehaviourStore
from bahe.launchers import submit
from bahe.model.sharding import hosts, topology
from tests.model_fixtures import make_tiny_pipeline, split_by_time

pytestmark = pytest.mark.usefixtures("keep_signal_handlers")

TRAIN = ["--arm", "bahe", "--steps", "6", "--", "--batch-size", "16", "--embedding-dim", "8", "--dense-arch", "16", "8",
         "--over-arch", "16", "1", "--table-rows", "200", "--max-behaviours", "4", "--log-every", "3", "--seed", "3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(component: str, j: str, logs: Path, args: list[str], capsys) -> tuple[Path, str]:
    """``launchers.submit --profile local COMPONENT --j J`` (a free rendezvous port): the job's log folder
    and what it streamed; fails unless the job SUCCEEDED."""
    code = submit.main(["--profile", "local", "--cfg", f"log_dir={logs}", component, "--", "--j", j,
                        "--rdzv_port", str(free_port()), *args])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    handle = next(line for line in out.splitlines() if line.startswith("local_cwd://"))
    return logs / "torchx" / handle.rsplit("/", 1)[1], out


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny Llama, synthetic samples and their store built by one process (1x1), train/valid/test splits."""
    root = tmp_path_factory.mktemp("multinode")
    pipeline = make_tiny_pipeline(root / "pipeline", samples=480)
    return pipeline, split_by_time(pipeline, root / "data"), root


def test_the_planner_sees_one_host_per_node(monkeypatch):
    """torchrun's LOCAL_WORLD_SIZE is the ranks per node: 2x1 is 2 hosts, 1x2 one; uneven hosts are refused."""
    cpu = torch.device("cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert hosts(topology(2, cpu)) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert hosts(topology(2, cpu)) == 1 and hosts(topology(4, cpu)) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE=3 does not divide the world size 4"):
        topology(4, cpu)


@pytest.mark.integration
def test_two_nodes_of_one_rank_train_as_one_node_of_two(pipeline, tmp_path, capsys):
    tiny, data, _ = pipeline
    common = ["--data_dir", str(data), "--store", str(tiny.store), *TRAIN, "--llm", str(tiny.llm)]
    two_nodes, streamed = launch("train", "2x1", tmp_path / "logs", ["--out", str(tmp_path / "2x1"), *common], capsys)
    # two torchrun agents (one per "node"), each with its own rank's log folder
    assert sorted(p.name for p in (two_nodes / "train").iterdir()) == ["0", "1"]
    assert "sharding plan for 2 hosts x 1 rank(s) (cpu)" in streamed  # LOCAL_WORLD_SIZE=1: the planner's 2 hosts
    _, one_node = launch("train", "1x2", tmp_path / "logs", ["--out", str(tmp_path / "1x2"), *common], capsys)
    assert "sharding plan for" not in one_node  # one host: the planner's usual topology, nothing printed
    two, one = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("2x1", "1x2"))
    assert two["world_size"] == one["world_size"] == 2 and two["steps"] == one["steps"] == 6
    for split in ("valid", "test"):
        for run in (two, one):  # each run's segment report names its own item-count file; all else is equal
            assert run[split]["segments"]["item_counts"].pop("file").endswith("item_counts.parquet")
        assert two[split] == one[split], split  # the same rows, the same global batches: the same numbers
    assert two["rank0_data_counters"] == one["rank0_data_counters"]


@pytest.mark.integration
def test_two_nodes_encode_the_store_one_process_builds(pipeline, tmp_path, capsys):
    """The pipeline's store was built by build_store in one process; 2x1 splits the chunks between the
    two nodes (small chunks, so both encode) and publishes the same texts and vectors."""
    tiny, _, _ = pipeline
    store = tmp_path / "store"
    launch("encode", "2x1", tmp_path / "logs", ["--store", str(store), "--data", str(tiny.data), "--model",
                                                str(tiny.llm), "--k", "2", "--device", "cpu", "--chunk_texts", "16",
                                                "--", "--batch-tokens", "64"], capsys)
    two, one = BehaviourStore.open(store), BehaviourStore.open(tiny.store)
    two.verify()
    assert two.vocabulary.texts == one.vocabulary.texts
    np.testing.assert_array_equal(two.rows(0, two.rows_count), one.rows(0, one.rows_count))
