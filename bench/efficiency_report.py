"""The table, markdown and plots of bench/efficiency_bench.py (from its result dict / JSON).

``python -m bench.efficiency_report docs/bench/efficiency.json`` prints the table of a saved run and
redraws its plots (matplotlib needed for the plots only).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGETS = {"length": 2048, "step_time": 10.0, "peak_memory": 6.0}  # the targets at 2048 tokens per user
PAPER = {"step_time": 928 / 164, "peak_memory": 75.4 / 12.6}  # the paper's table at 2048 (bahe.md)


# (header, width, value of a configuration): x = token / bahe, except samples/s (bahe / token)
COLUMNS = [
    ("tok ms", 9, lambda c: f"{c['arms']['token']['median_ms']:.1f}"),
    ("bahe ms", 8, lambda c: f"{c['arms']['bahe']['median_ms']:.1f}"),
    ("x", 6, lambda c: f"{c['ratios']['step_time']:.1f}x"),
    ("tok MiB", 9, lambda c: f"{c['arms']['token']['memory_mib']['peak']:.0f}"),
    ("bahe MiB", 9, lambda c: f"{c['arms']['bahe']['memory_mib']['peak']:.0f}"),
    ("x", 6, lambda c: f"{c['ratios']['peak_memory']:.1f}x"),
    ("tok GFLOP", 10, lambda c: f"{c['arms']['token']['flops']['total'] / 1e9:.1f}"),
    ("bahe GFLOP", 11, lambda c: f"{c['arms']['bahe']['flops']['total'] / 1e9:.2f}"),
    ("x", 7, lambda c: f"{c['ratios']['flops']:.1f}x"),
    ("attn", 5, lambda c: f"{c['arms']['token']['flops']['attention'] / max(1, c['arms']['token']['flops']['total']):.0%}"),
    ("tok s/s", 9, lambda c: f"{c['arms']['token']['samples_per_s']:.1f}"),
    ("bahe s/s", 9, lambda c: f"{c['arms']['bahe']['samples_per_s']:.1f}"),
    ("%mm", 6, lambda c: f"{c['arms']['bahe']['of_matmul']:.0%}"),
    ("enc ms/s", 9, lambda c: f"{c['encoding']['amortised_ms_per_sample']:.3f}"),
    ("dup", 5, lambda c: f"{c['encoding']['duplication']:.0f}"),
    ("x+enc", 7, lambda c: f"{c['ratios']['time_incl_encoding']:.1f}x"),
]


def _row(c: dict) -> str:
    head = f"{c['tokens']:>5}{c['k']:>4}{c['m']:>4}"
    if c["status"] != "ok":
        return f"{head}   {c['status']}"
    return head + "".join(f"{fn(c):>{width}}" for _, width, fn in COLUMNS)


def table(result: dict) -> str:
    cfg, mc = result["config"], result["config"]["model"]
    arms = next((c["arms"] for c in result["configs"] if c["status"] == "ok"), None)
    params = (f"token arm {arms['token']['params']['total'] / 1e6:.1f}M params ({arms['token']['params']['trainable'] / 1e6:.1f}M "
              f"trainable), BAHE {arms['bahe']['params']['total'] / 1e6:.1f}M ({arms['bahe']['params']['trainable'] / 1e6:.1f}M)"
              if arms else "")
    dev = result["machine"].get("gpu") or result["machine"]["cpu_model"]
    lines = [
        f"## BAHE vs token-level: {mc['preset']} Llama (hidden {mc['hidden_size']}, {mc['num_hidden_layers']} layers, "
        f"k={mc['k']} frozen + {mc['deep_layers']} trainable), {cfg['device']} {cfg['dtype']}, batch {cfg['batch_size']}, "
        f"N={cfg['sequence_types_n']}, pipeline {result['pipeline']}",
        f"{dev}; threads {result['machine']['torch_threads']}; {params}",
        f"matmul rate ({'bf16' if cfg['device'] == 'cuda' else 'fp32'}, square): median "
        f"{result.get('matmul_gflops_median', 0):,.0f} GFLOP/s over {len(result['matmul_gflops'])} runs "
        f"(range {min(result['matmul_gflops'], default=0):,.0f}-{max(result['matmul_gflops'], default=0):,.0f})",
        "",
        f"{'text':>5}{'K':>4}{'M':>4}" + "".join(f"{name:>{width}}" for name, width, _ in COLUMNS),
    ]
    for sweep, title in (("length", f"lengths sweep (K={cfg['tokens_per_behaviour']}, M varies)"),
                         ("k", f"K sweep (text length {cfg['k_sweep_length']})")):
        rows = [c for c in result["configs"] if sweep in c["sweep"].split("+")]
        if rows:
            lines += [f"-- {title}"] + [_row(c) for c in rows]
    lines += ["", "text = N*M*K tokens per user; ms = median training step; MiB = peak (state + step high-water "
              "mark); GFLOP = counted per step; x = token / bahe; attn = attention share of the token arm's FLOPs; "
              "s/s = samples/s; %mm = BAHE step's counted FLOP rate / matmul rate; enc ms/s = offline encoding "
              "amortised per sample (dup = occurrences per distinct text in that data); x+enc = token ms/sample / "
              "(BAHE ms/sample + enc ms/s)."]
    lines += targets(result)
    return "\n".join(lines)


def targets(result: dict) -> list[str]:
    at = [c for c in result["configs"] if c["status"] == "ok" and c["tokens"] == TARGETS["length"]
          and "length" in c["sweep"]]
    if not at:
        return [f"targets at {TARGETS['length']} tokens per user: not measured in this run"]
    r = at[0]["ratios"]
    out = [f"targets at {TARGETS['length']} tokens per user ({result['config']['device']}):"]
    for key, label in (("step_time", "step time"), ("peak_memory", "peak memory")):
        ok = r[key] >= TARGETS[key]
        out.append(f"  {label} {r[key]:.1f}x lower (target >= {TARGETS[key]:.0f}x: {'MET' if ok else 'NOT MET'}; "
                   f"paper {PAPER[key]:.1f}x)")
    t, b = (at[0]["arms"][arm]["memory_mib"] for arm in ("token", "bahe"))
    out.append(f"  peak memory = state (params, buffers, optimizer) + step high-water mark: state {t['state']['total']:.0f} "
               f"vs {b['state']['total']:.0f} MiB ({t['state']['total'] / b['state']['total']:.1f}x), step "
               f"{t['step_peak']:.0f} vs {b['step_peak']:.0f} MiB ({t['step_peak'] / max(b['step_peak'], 1e-9):.1f}x)")
    return out


def plot(result: dict, out_path: Path) -> list[str]:
    """Time and memory vs text length per arm (and vs K); [] with a message when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print("matplotlib is not installed: skipping the plots (the JSON and markdown are written)", file=sys.stderr)
        return []
    ok = [c for c in result["configs"] if c["status"] == "ok"]
    written = []
    for what, key, label in (("time", lambda a: a["median_ms"], "training step time (ms)"),
                             ("memory", lambda a: a["memory_mib"]["peak"], "peak memory (MiB)")):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, sweep, xkey, xlabel in ((axes[0], "length", "tokens", "text tokens per user (N*M*K)"),
                                        (axes[1], "k", "k", f"tokens per behaviour K (text length "
                                                                  f"{result['config']['k_sweep_length']}, M = length / (N*K))")):
            rows = sorted((c for c in ok if sweep in c["sweep"].split("+")), key=lambda c: c[xkey])
            for arm, style in (("token", "o-"), ("bahe", "s-")):
                ax.plot([c[xkey] for c in rows], [key(c["arms"][arm]) for c in rows], style,
                        label="token-level" if arm == "token" else "BAHE")
            for c in rows:
                ax.annotate(f"{key(c['arms']['token']) / key(c['arms']['bahe']):.1f}x", (c[xkey], key(c["arms"]["token"])),
                            textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
            if rows:
                ax.set_xscale("log", base=2)
                ax.set_xticks([c[xkey] for c in rows], [str(c[xkey]) for c in rows])
            ax.set_yscale("log")
            for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):  # label 1, 2, 3, 5 x 10^n
                axis(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "1235" else ""))
            ax.margins(x=0.08, y=0.12)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        cfg = result["config"]
        fig.suptitle(f"{label}: {cfg['model']['preset']} on {result['machine'].get('gpu') or 'CPU'} "
                     f"({cfg['dtype']}, batch {cfg['batch_size']}, pipeline {result['pipeline']})", fontsize=10)
        fig.tight_layout()
        path = out_path.with_name(f"{out_path.stem}_{what}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    return written


def write(result: dict, out_path: Path, doc: str, plots: bool) -> list[str]:
    """The JSON, the markdown beside it (``doc``: what the figures mean) and (plots=True) the PNGs;
    returns the PNG names written."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    names = plot(result, out_path) if plots else []
    out_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    m = result["machine"]
    images = "".join(f"![{n}]({n})\n" for n in names) if names else (
        "Plots: none in this run (matplotlib missing, or the run was cut short); "
        "`python -m bench.efficiency_report " + out_path.name + "` draws them where matplotlib exists.\n")
    out_path.with_suffix(".md").write_text(
        f"# Efficiency benchmark: BAHE vs the token-level baseline\n\nProduced by `{result['command']}` in "
        f"{result.get('seconds', 0):.0f} s on {m.get('gpu') or m['cpu_model']} ({m['cpu_count']} CPUs, torch "
        f"{result['versions']['torch']}, transformers {result['versions'].get('transformers')}, torchrec "
        f"{result['versions'].get('torchrec', 'absent')}; load average {m['loadavg_start'][0]:.2f} at start, "
        f"{m.get('loadavg_end', m['loadavg_start'])[0]:.2f} at end). Every figure in `{out_path.name}`.\n\n"
        f"```\n{table(result)}\n```\n\n{images}\n## What the figures mean\n\n{doc}")
    return names


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m bench.efficiency_report RESULT.json", file=sys.stderr)
        return 2
    path = Path(args[0])
    result = json.loads(path.read_text())
    print(table(result))
    plot(result, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
