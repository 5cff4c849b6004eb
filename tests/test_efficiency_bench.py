"""bench/efficiency_bench.py: its attention FLOP formulas, and its quick mode in both pipelines (the
counted matmul FLOPs must match the arms' analytic count). Timings are not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is not an installed package

from bench.efficiency_setup import ATTENTION_FORMULAS, _attention_backward, _attention_forward  # noqa: E402


def test_attention_formulas_follow_torchs_own_convention():
    q, k = (2, 4, 16, 8), (2, 4, 24, 8)
    assert _attention_forward(q, k, k) == sdpa_flop_count(q, k, k)
    assert _attention_backward(q, q, k, k) == sdpa_backward_flop_count(q, q, k, k)
    grouped = (2, 2, 24, 8)  # grouped kv heads count at the query's head count
    assert _attention_forward(q, grouped, grouped) == _attention_forward(q, k, k)


def test_cpu_sdpa_is_counted_forward_and_backward():
    q, k, v = (torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FORMULAS) as counter:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    shape = (1, 2, 8, 4)
    assert counter.get_total_flops() == _attention_forward(shape, shape, shape) + _attention_backward(
        shape, shape, shape, shape)


def _linear_per_position(mc: dict) -> int:
    h, i = mc["hidden_size"], mc["intermediate_size"]
    kv = h // mc["num_attention_heads"] * mc["num_key_value_heads"]
    return 2 * (2 * h * h + 2 * h * kv + 3 * h * i)


@pytest.mark.integration
@pytest.mark.parametrize("pipeline", ["full", "core"])
def test_quick_run_measures_both_arms(tmp_path, pipeline):
    out = tmp_path / "eff.json"
    done = subprocess.run([sys.executable, "-m", "bench.efficiency_bench", "--quick", "--pipeline", pipeline,
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["pipeline"] == pipeline
    mc, batch = result["config"]["model"], result["config"]["batch_size"]
    k, deep = mc["k"], mc["deep_layers"]
    for c in result["configs"]:
        assert c["status"] == "ok", c["status"]
        token, bahe = c["arms"]["token"], c["arms"]["bahe"]
        assert token["positions_per_sample"]["user"] == c["tokens"] == c["n"] * c["m"] * c["k"]
        assert bahe["positions_per_sample"]["user"] == c["n"] * c["m"]
        # every position through k frozen layers (forward) + deep trainable ones (forward + 2x backward);
        # the token arm's item title is padded to 32 tokens, BAHE's is one vector
        expected = {"token": batch * (c["tokens"] + 32) * (k + 3 * deep),
                    "bahe": batch * (c["n"] * c["m"] + 1) * 3 * deep}
        for name, arm in (("token", token), ("bahe", bahe)):
            # the LLM's linears have no bias (mm); the head's and projections' have one: addmm forward,
            # and at most 2 mm of the same size each in backward (grad input, grad weight)
            llm = expected[name] * _linear_per_position(mc)
            head = 2 * arm["flops"]["by_op"].get("aten.addmm", 0)
            assert 0.99 * llm <= arm["flops"]["by_op"]["aten.mm"] <= 1.01 * llm + head, name
            assert arm["flops"]["attention"] > 0 and arm["median_ms"] > 0 and arm["memory_mib"]["peak"] > 0
        assert c["ratios"]["flops"] > 1
    assert "targets at 2048" in out.with_suffix(".md").read_text()
