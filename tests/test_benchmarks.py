"""The benchmark scripts run end to end at a toy size and report structurally right figures.

Timings are not asserted (they are noise at this size); what is: every variant is present,
ratios to a variant itself are exactly 1, the saved-activation bytes order as the fused path
promises, and bad counts are refused by the argument parser.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--hidden", "64", "--intermediate", "128", "--layers", "1", "--heads", "4", "--vocab", "128",
        "--batch", "2", "--seq", "16", "--r", "4", "--threads", "1"]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=BENCH, capture_output=True, text=True, timeout=300)


def test_bench_train_reports_every_variant_with_paired_ratios(tmp_path):
    out = tmp_path / "train.json"
    run = _run("bench_train.py", *TINY, "--steps", "2", "--warmup", "1", "--with-plain", "--no-memory",
               "--json", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"0.05", "0.0"}
    for figures in results.values():
        assert set(figures) == {"hf_lora", "plain", "peft", "floor"}
        assert figures["peft"]["wall_x_peft"] == 1.0 and figures["floor"]["cpu_x_floor"] == 1.0
        assert all(f["median_ms"] > 0 and f["wall_x_floor"] > 0 for f in figures.values())
    dropped, plain = results["0.05"], results["0.0"]
    # With dropout the fused path keeps neither the dropped copies nor their masks; the plain
    # formula keeps what PEFT keeps. Without dropout all three keep the same tensors.
    assert dropped["hf_lora"]["saved_mb"] < 0.8 * dropped["peft"]["saved_mb"]
    assert dropped["plain"]["saved_mb"] == pytest.approx(dropped["peft"]["saved_mb"])
    assert plain["hf_lora"]["saved_mb"] == pytest.approx(plain["peft"]["saved_mb"])
    assert dropped["floor"]["saved_mb"] < dropped["hf_lora"]["saved_mb"]


def test_bench_merge_and_infer_run_both_libraries():
    merge = _run("bench_merge.py", *TINY, "--repeats", "1")
    assert merge.returncode == 0, merge.stderr[-2000:]
    assert [line.split()[0] for line in merge.stdout.splitlines()[1:]] == ["hf_lora", "peft"]
    infer = _run("bench_infer.py", *TINY, "--steps", "1", "--warmup", "1")
    assert infer.returncode == 0, infer.stderr[-2000:]
    assert "merged model has the base's module classes: True" in infer.stdout
    diff = float(infer.stdout.split("logit difference: ")[1].split()[0])
    assert diff < 1e-4  # merged and unmerged give the same logits
    assert "hf_lora_merged" in infer.stdout and "peft_unmerged" in infer.stdout


@pytest.mark.parametrize(("script", "flag"), [("bench_train.py", "--steps"), ("bench_merge.py", "--repeats"),
                                              ("bench_infer.py", "--steps"), ("bench_switch.py", "--repeats")])
def test_counts_below_one_are_refused(script, flag):
    run = _run(script, flag, "0")
    assert run.returncode == 2
    assert f"argument {flag}: 0 must be at least 1" in run.stderr
