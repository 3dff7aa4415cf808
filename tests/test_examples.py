"""The operator example keeps running on the current engine (its numbers are tested elsewhere)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_lanczos_spectrum_example(tmp_path):
    out = tmp_path / "spectrum.png"
    proc = subprocess.run([sys.executable, "examples/lanczos_spectrum.py", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Hessian: top" in proc.stdout and "integral 1.000" in proc.stdout
    assert out.stat().st_size > 0
