"""The benchmark scripts keep running (tiny settings; their timings are not asserted)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_operators_benchmark_quick():
    out = _run("benchmarks/operators.py", "--quick")
    assert "eigsh" in out and "curvlinops" in out
    assert "Whole model, GPT-2-style" in out and "Whole-model targets" in out  # the HF GPT-2 row (tiny)


def test_backpack_benchmark_tiny(tmp_path):
    report = tmp_path / "bp.md"
    _run("benchmarks/backpack_extensions.py", "--repeats", "1", "--warmup", "0", "--sizes", "4x8x2",
         "--out", str(report))
    text = report.read_text()
    assert "DiagGGNExact" in text and "KFAC" in text


def test_memory_benchmark_quick():
    out = _run("benchmarks/memory.py", "--quick")
    assert "fresh process: gradient" in out  # the per-measurement subprocess path
    for row in ("ours: GGN product", "curvlinops: Hessian product", "`attention_factors`", "`hessian_blocks`",
                "`AttentionKFACLinearOperator`", "BackPACK `KFAC`", "BackPACK `DiagGGNExact`"):
        assert row in out, row


def test_kfac_benchmark_quick():
    out = _run("benchmarks/kfac.py", "--quick")
    assert "ours attention KFAC" in out and "curvlinops KFAC (twin)" in out
    assert "ours `expand` equals curvlinops' KFAC" in out
