"""bench/history_length_bench.py's pure parts: the side-by-side ratios, the analytic FLOP model (against
torch's FlopCounterMode on a real Llama layer), the token arm's projection and fit rule, the GPU
projection, and the quality table read from quality-bench JSON. Fast: no training, no store."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from bench.history_length_bench import (
    GIB,
    arm_flops_per_sample,
    fit_activations,
    fits,
    gpu_seconds_per_million,
    layer_forward_flops,
    layer_linear_params,
    project_step,
    quality_rows,
    quality_table,
    round_order,
    side_by_side,
)

SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
           "head_dim": 64}


def test_side_by_side_reports_ratio_of_medians_and_median_of_paired_ratios():
    times = {"bahe": [2.0, 3.0, 10.0], "dlrm": [1.0, 1.0, 2.0]}
    out = side_by_side(times, "bahe", "dlrm")
    assert out["of_medians"] == pytest.approx(3.0 / 1.0)
    assert out["paired_median"] == pytest.approx(statistics.median([2.0, 3.0, 5.0]))
    assert out["paired_range"] == [2.0, 5.0] and out["rounds"] == 3
    # an arm that ran fewer rounds (the token arm) pairs only the rounds both ran
    short = side_by_side({"token_level": [8.0], "bahe": [2.0, 4.0]}, "token_level", "bahe")
    assert short["rounds"] == 1 and short["paired_median"] == 4.0 and short["of_medians"] == pytest.approx(8.0 / 3.0)
    assert side_by_side({"bahe": [1.0], "dlrm": None}, "bahe", "dlrm")["of_medians"] is None


def test_rounds_alternate_the_arms_order():
    arms = ["dlrm", "bahe", "token_level"]
    assert round_order(arms, 0) == arms
    assert round_order(arms, 1) == arms[::-1]
    assert round_order(arms, 2) == arms


def test_layer_flops_match_flop_counter_on_a_llama_layer():
    """The analytic forward count equals FlopCounterMode's on a real (tiny) Llama decoder layer at the
    bench's attention convention (every query x key pair)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from bench.efficiency_setup import ATTENTION_FORMULAS

    llm = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2}
    config = LlamaConfig(**llm, num_hidden_layers=1, vocab_size=16)
    config._attn_implementation = "sdpa"
    layer, rope = LlamaDecoderLayer(config, 0), LlamaRotaryEmbedding(config)
    batch, width = 3, 7
    x = torch.randn(batch, width, llm["hidden_size"])
    positions = torch.arange(width).unsqueeze(0).expand(batch, width)
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FORMULAS) as counter, torch.no_grad():
        layer(x, attention_mask=None, position_ids=positions, position_embeddings=rope(x, positions))
    assert counter.get_total_flops() == batch * layer_forward_flops(llm, width)


def test_arm_flops_bahe_grows_linearly_with_m_and_the_token_arm_pays_the_frozen_layers():
    per_layer = layer_linear_params(SMOLLM2)
    assert per_layer == 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    bahe5 = arm_flops_per_sample("bahe", SMOLLM2, k=4, deep=1, widths=[5, 5, 1])
    bahe50 = arm_flops_per_sample("bahe", SMOLLM2, k=4, deep=1, widths=[50, 50, 1])
    assert bahe5 == 3 * (2 * layer_forward_flops(SMOLLM2, 5) + layer_forward_flops(SMOLLM2, 1))
    assert 9 < bahe50 / bahe5 < 11  # ~linear in M: the attention term is small at these widths
    token = arm_flops_per_sample("token_level", SMOLLM2, k=4, deep=1, widths=[200, 10])
    assert token == (3 + 4) * (layer_forward_flops(SMOLLM2, 200) + layer_forward_flops(SMOLLM2, 10))
    assert arm_flops_per_sample("dlrm", SMOLLM2, k=4, deep=1, widths=[]) == 0


def test_activation_fit_recovers_linear_and_quadratic_parts():
    b, c = 1000.0, 3.0
    points = [(x, z, b * x + c * z) for x, z in ((100.0, 1e4), (400.0, 1.6e5))]
    assert fit_activations(points) == pytest.approx((b, c))
    assert fit_activations(points[-1:]) == pytest.approx(((b * 400 + c * 1.6e5) / 400, 0.0))
    # a negative coefficient (noise) falls back to the line through the last point
    assert fit_activations([(100.0, 1e4, 5e5), (200.0, 4e4, 4e5)])[1] == 0.0


def test_projection_scales_time_by_flops_and_keeps_the_state():
    measured = [{"median_s": 2.0, "flops": 1e12, "positions": 100.0, "quadratic": 1e4, "state_bytes": 50.0,
                 "step_peak_bytes": 1000.0 * 100 + 3.0 * 1e4},
                {"median_s": 8.0, "flops": 4e12, "positions": 400.0, "quadratic": 1.6e5, "state_bytes": 50.0,
                 "step_peak_bytes": 1000.0 * 400 + 3.0 * 1.6e5}]
    out = project_step(measured, flops_to=1e13, positions_to=1000.0, quadratic_to=1e6)
    assert out["median_s"] == pytest.approx(8.0 * 1e13 / 4e12)
    assert out["peak_bytes"] == pytest.approx(50.0 + 1000.0 * 1000 + 3.0 * 1e6)


def test_fits_says_why_not():
    assert fits({"median_s": 10.0, "peak_bytes": GIB}, steps=6, budget_s=60, memory_cap_bytes=2 * GIB) is None
    why = fits({"median_s": 100.0, "peak_bytes": 8 * GIB}, steps=6, budget_s=60, memory_cap_bytes=2 * GIB)
    assert "100 s/step x 6 steps > 60 s" in why and "8.0 GiB > 2.0 GiB" in why


def test_gpu_projection_is_flops_over_sustained_throughput():
    # 1e9 FLOPs a sample x 1e6 samples at 1000 TFLOP/s x 0.5 = 2 s
    assert gpu_seconds_per_million(1e9, peak_tflops=1000.0, utilisation=0.5) == pytest.approx(2.0)


def test_quality_rows_read_seed0_valid_and_the_command(tmp_path):
    def report(m, seeds, bahe, dlrm):
        def arm(values):
            return {"auc": {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                            "values": values}, "valid_auc": {"values": [v - 0.01 for v in values]},
                    "wall_seconds": {"mean": 10.0 * m}}
        return {"config": {"preset": {"max_history": m, "k": 4}, "steps": 600, "seeds": seeds, "llm_precision": "bf16"},
                "machine": {"cpu_model": "x"}, "summary": {"bahe": arm(bahe), "dlrm": arm(dlrm), "floor": {"auc": 0.74}}}

    (tmp_path / "q50.json").write_text(json.dumps(report(50, [0], [0.757], [0.7517])))
    (tmp_path / "q50.md").write_text("# Quality\n\nProduced by `python -m bench.quality_bench --max-history 50` (x).\n")
    (tmp_path / "q5.json").write_text(json.dumps(report(5, [1, 0], [0.750, 0.754], [0.751, 0.7517])))
    rows = quality_rows([tmp_path / "q50.json", tmp_path / "q5.json"])
    assert [r["m"] for r in rows] == [5, 50]  # ordered by k, then M
    assert rows[0]["arms"]["bahe"]["auc_seed0"] == 0.754  # seed 0 is the second run of that file
    assert rows[1]["command"] == "python -m bench.quality_bench --max-history 50" and rows[0]["command"] is None
    text = quality_table(rows)
    assert "| 50 | 4 | 600 | bf16 | [0] | 0.7570 (valid 0.7470) | 0.7517 (valid 0.7417) | +0.0053 |" in text
    assert "0.7520 +- 0.0028 (seed 0 0.7540; valid 0.7440)" in text


def test_findings_name_the_ratio_where_the_token_arm_stops_and_the_slow_demo():
    from bench.history_length_bench import findings

    def entry(m, bahe_s, token=None, skipped=None):
        times = {"dlrm": [0.02, 0.02], "bahe": [bahe_s, bahe_s], "token_level": token}
        shape = {"real": {"user": 2 * m * 0.4, "item": 1.0}, "padded_per_sample": 2 * m + 1}
        arms = {"dlrm": {"measured": {"median_s": 0.02}}, "bahe": {"measured": {"median_s": bahe_s}, "shape": shape},
                "token_level": {"measured": {"median_s": token[0]}} if token else {}}
        return {"m": m, "arms": arms, "skipped": {"token_level": skipped} if skipped else {},
                "ratios": {"bahe_over_dlrm": side_by_side(times, "bahe", "dlrm"),
                           "token_over_bahe": side_by_side(times, "token_level", "bahe")},
                "gpu": {"bahe": {"flops_per_sample": 1e9, "source": "counted", "gpu_s_per_million": 3.0},
                        "token_level": {"flops_per_sample": 1e11, "source": "analytic", "gpu_s_per_million": 300.0}}}

    result = {"config": {"batch_size": 64},
              "histories": [entry(5, 0.3, token=[6.0]), entry(100, 4.0, skipped="projected 900 s/step x 6 steps > 360 s")]}
    lines = findings(result)
    assert lines[0] == "BAHE / DLRM-only step time (ratio of medians; median of paired rounds): M = 5: 15x; 15x, M = 100: 200x; 200x."
    assert lines[1] == "token-level / BAHE step time: M = 5: 20x."
    assert "stops fitting at M = 100: projected 900 s/step" in lines[2]
    assert "passes 30 min of training on these cores from M = 100" in lines[3]
    assert "at M = 100, 201 a sample for 81 real ones" in lines[4]
    assert "100x" in lines[5] and ">= 19.2 ms vs >= 0.19 ms" in lines[5]


def test_quality_only_rebuilds_the_quality_table_and_keeps_the_measured_step_costs(tmp_path):
    """``--quality-only`` times nothing: the step-cost section of an existing report stays as measured, the
    quality table is rebuilt from the files given, and the page says which command tabulated it."""
    import shutil
    from pathlib import Path

    from bench.history_length_bench import main

    docs = Path(__file__).resolve().parents[1] / "docs" / "bench"
    out = tmp_path / "history_length.json"
    shutil.copy(docs / "history_length.json", out)
    before = json.loads(out.read_text())
    assert main(["--quality-only", "--quality", str(docs / "quality.json"), "--out", str(out)]) == 0
    after = json.loads(out.read_text())
    assert after["histories"] == before["histories"] and after["command"] == before["command"]
    assert [row["m"] for row in after["quality"]] == [5] and after["config"]["quality"] == [str(docs / "quality.json")]
    page = out.with_suffix(".md").read_text()
    assert "| 100 | bahe | 201 ; 74 |" in page  # the step-cost table, as measured
    assert f"Tabulated by `python -m bench.history_length_bench --quality-only --quality {docs / 'quality.json'}" in page
    assert page.count("[quality.json](quality.json)") == 1 and "quality_m20.json" not in page.split("## Quality")[1]
    with pytest.raises(SystemExit, match="does not exist"):
        main(["--quality-only", "--out", str(tmp_path / "none.json")])
