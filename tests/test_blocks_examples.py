"""Keep ``benchmarks/blocks.py`` runnable: its ``--quick`` mode must exit 0 and match torch.func.

The script's ``main`` is imported and called with ``--quick`` (in-process, which saves a second
``import torch``; the script's ``__main__`` block only wraps ``main`` in ``sys.exit``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "blocks.py")


def load_script():
    if os.path.dirname(SCRIPT) not in sys.path:  # as when run as a script: benchmarks/ is on sys.path
        sys.path.insert(0, os.path.dirname(SCRIPT))
    spec = importlib.util.spec_from_file_location("benchmark_blocks_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_blocks_benchmark_quick_runs_and_matches_torch_func(tmp_path, capsys):
    out = tmp_path / "blocks.md"
    threads = torch.get_num_threads()
    try:
        rc = load_script().main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # the script sets its own thread count
    stdout = capsys.readouterr().out
    assert rc == 0, stdout[-3000:]
    found = re.findall(r"^max relative error: (\S+)$", stdout, flags=re.M)
    assert len(found) == 1, stdout[-3000:]
    assert float(found[0]) < 1e-10
    # every part was checked, and the table made it into the written report
    text = out.read_text()
    check = next(line for line in text.splitlines() if line.startswith("- Check:"))
    for part in ("full", "outer", "functional"):
        err = re.search(rf"\b{part} ([0-9.e+-]+)", check)
        assert err is not None and float(err.group(1)) < 1e-10, part
    assert "| **ours: total** (factors + block) |" in text
    assert "torch.func: full block, `hessian`" in text


def test_docs_blocks_snippets_run(capsys):
    """The code blocks of docs/blocks.md run as printed and print what their comments say."""
    text = open(os.path.join(ROOT, "docs", "blocks.md")).read()
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(code) == 2
    exec(compile("\n".join(code), "docs/blocks.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "torch.Size([32, 32]) torch.Size([32, 32]) torch.Size([32, 32])"
    assert lines[1:4] == ["True", "0.0", "0.0"]
    assert float(lines[4]) < 1e-15
    assert lines[-2].startswith("False torch.Size([4, 5, 8, 5, 8])") and lines[-1] == "True"


def test_factor_terms_example_rebuilds_blocks():
    """examples/factor_terms.py rebuilds GGN (V,V), GGN (Q,Q) and functional (Q,Q) from the terms."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("factor_terms", os.path.join(ROOT, "examples", "factor_terms.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main() < 1e-12
