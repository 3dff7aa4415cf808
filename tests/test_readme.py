"""The README's Python snippets run as printed."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    namespace = {}
    exec(compile("\n".join(blocks), str(README), "exec"), namespace)
    assert len(namespace["top"]) == 5
    assert all(hasattr(p, "diag_ggn_exact") and hasattr(p, "grad_batch") for p in namespace["net"].parameters())
