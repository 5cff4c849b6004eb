"""bench/lookup_bench.py in its --quick mode: it runs to the end from the repository root into a
temporary output (never docs/), records its results in the documented structure, and every ratio it
prints is the ratio of the numbers it records (a bench whose table drifted from its measurements would
publish wrong figures). Timings themselves are not asserted. (bench/encode_bench.py --quick takes about
3.5 CPU-minutes: too long for CI; it is run by hand, see docs/testing.md.)"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("ec", "ec1", "ebc", "ebc1")
MEASURES = ("no_grad", "fwd", "fwd_bwd")
NUMBER = re.compile(r"-?[\d,]+(?:\.\d+)?")


def run_bench(module: str, args: list[str], timeout: int) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def numbers(text: str) -> list[float]:
    return [float(x.replace(",", "")) for x in NUMBER.findall(text)]


def close(printed: float, value: float, decimals: int) -> bool:
    """``printed`` is ``value`` rounded to ``decimals`` places (half a unit of slack for the rounding)."""
    return abs(printed - value) <= 0.5 * 10**-decimals + 1e-9 * abs(value)


# lookup_bench --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lookup(tmp_path_factory):
    out = tmp_path_factory.mktemp("lookup") / "lookup.json"
    done = run_bench("bench.lookup_bench", ["--quick", "--json", str(out)], timeout=600)
    return done.stdout, json.loads(out.read_text())


@pytest.mark.integration
def test_lookup_quick_records_the_quick_sizes_and_every_cell(lookup):
    from bench.lookup_bench import QUICK, sample_ids

    stdout, record = lookup
    assert record["command"] == f"python -m bench.lookup_bench --quick --json {record['command'].split()[-1]}"
    assert {"machine", "versions", "repeats", "results", "structure", "table"} <= set(record)
    assert record["repeats"] == 7  # --quick's default
    assert [(r["rows"], r["H"], r["N"], r["M"]) for r in record["results"]] == [tuple(s) for s in QUICK]
    cells = [f"kjt/{lay}" for lay in LAYOUTS] + [f"{ms}/{mode}/{lay}" for mode in ("plain", "dmp")
                                                  for ms in MEASURES for lay in LAYOUTS]
    for seed, r in enumerate(record["results"]):
        assert set(r["ms"]) == set(r["repeats"]) == set(cells)
        assert all(v > 0 for v in r["ms"].values())
        assert all(3 <= n <= 7 for n in r["repeats"].values())
        assert set(r["peak_mib"]) == {f"{mode}/{ms}/{lay}" for mode in ("plain", "dmp")
                                      for ms in ("no_grad", "fwd_bwd") for lay in LAYOUTS}
        assert r["exact"] == {f"{mode}/{lay}": True for mode in ("plain", "dmp") for lay in LAYOUTS}
        # the bench's sample is seeded by the size's index: recount its filled positions here
        sample = sample_ids(r["rows"], r["N"], r["M"], np.random.default_rng(seed))
        assert r["filled_positions"] == int(sum(x.sum() for x in sample["lengths"]))
    assert stdout == "\n".join(record["table"]) + "\n"  # the printed table is the recorded one


@pytest.mark.integration
def test_lookup_quick_prints_ratios_of_the_recorded_times_and_memory(lookup):
    stdout, record = lookup
    lines = stdout.splitlines()
    others = LAYOUTS[1:]
    for r in record["results"]:
        head = f"{r['rows']:>7} {r['H']:>3} {r['N']:>1} {r['M']:>2}"
        for mode in ("plain", "dmp"):
            (line,) = [x for x in lines if x.startswith(f"{head} {mode:5} |")]
            cells = [numbers(c) for c in line.split("|")[1:1 + len(MEASURES)]]
            for measure, printed in zip(MEASURES, cells):
                base = r["ms"][f"{measure}/{mode}/ec"]
                assert close(printed[0], base, 2)
                for lay, p in zip(others, printed[1:]):
                    assert close(p, r["ms"][f"{measure}/{mode}/{lay}"] / base, 2), (mode, measure, lay)
        # the second table: KJT construction time, then peak memory per mode and measure
        (line,) = [x for x in lines if x.startswith(f"{head} |")]
        groups = [numbers(c) for c in line.split("|")[1:]]
        sources = [(r["ms"], "kjt")] + [(r["peak_mib"], f"{mode}/{ms}") for mode in ("plain", "dmp")
                                        for ms in ("no_grad", "fwd_bwd")]
        assert len(groups) == len(sources)
        for printed, (values, prefix) in zip(groups, sources):
            base = values[f"{prefix}/ec"]
            assert close(printed[0], base, 2)
            for lay, p in zip(others, printed[1:]):
                assert close(p, values[f"{prefix}/{lay}"] / base, 2), (prefix, lay)
    # geometric means over the sizes, per mode and measure
    for mode in ("plain", "dmp"):
        for measure in MEASURES:
            (line,) = [x for x in lines if x.startswith(f"  {mode:5} {measure:7}")]
            printed = numbers(line[len(f"  {mode:5} {measure:7}"):])
            pairs = [(lay, "ec") for lay in others] + [("ebc1", "ec1")]
            assert len(printed) == len(pairs)
            for p, (num, den) in zip(printed, pairs):
                logs = [math.log(r["ms"][f"{measure}/{mode}/{num}"] / r["ms"][f"{measure}/{mode}/{den}"])
                        for r in record["results"]]
                assert close(p, math.exp(sum(logs) / len(logs)), 2), (mode, measure, num, den)
