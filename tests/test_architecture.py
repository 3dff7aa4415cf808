"""The package's layering (docs/design.md): who may import whom, and one home for the layout."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "backpack_attention"


def _imports(path: Path):
    """Modules imported by a file, as absolute dotted names (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(PKG.parent).with_suffix("")
    here = list(rel.parts)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _files(sub: str):
    return sorted((PKG / sub).rglob("*.py")) if (PKG / sub).is_dir() else [PKG / sub]


@pytest.mark.parametrize("path", _files("derivatives"), ids=lambda p: p.name)
def test_math_does_not_import_the_module_or_faces(path):
    bad = {m for m in _imports(path) if re.match(
        r"backpack_attention\.(module|blocks|operators|backpack_ext|report|spectra|models|extensions)\b", m)}
    assert not bad, f"{path.name} imports {sorted(bad)}; the math may import layout and derivatives only"


def test_layout_is_the_bottom():
    bad = {m for m in _imports(PKG / "layout.py") if m.startswith("backpack_attention")}
    assert not bad


def test_library_does_not_import_the_application():
    for path in PKG.rglob("*.py"):
        if "report" in path.relative_to(PKG).parts:
            continue
        bad = {m for m in _imports(path) if m.startswith("backpack_attention.report")}
        assert not bad, f"{path} imports the report application: {sorted(bad)}"


# The 3E row split and head slicing, as code (not prose): chunk(3, ...), view/reshape into
# (3, H, d) or (..., H, d), 3 * E sizes, h * d offsets.
LAYOUT_CODE = re.compile(
    r"\.chunk\(3\b|\.view\(3\b|\b3 \* (E|embed_dim)\b|\bh \* d\b|reshape\([^)]*\bH, d\)|view\([^)]*\bH, d\)"
)


def test_parameter_layout_has_one_home():
    hits = []
    for path in PKG.rglob("*.py"):
        if path.name == "layout.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if '"""' in code or "``" in code:  # docstrings describing the layout
                continue
            if LAYOUT_CODE.search(code):
                hits.append(f"{path.relative_to(PKG)}:{i}: {line.strip()}")
    assert not hits, "parameter layout written outside layout.py:\n" + "\n".join(hits)


def test_one_transformer_model_class():
    import torch.nn as nn

    import backpack_attention.models as models

    classes = [c for c in vars(models).values()
               if isinstance(c, type) and issubclass(c, nn.Module) and c.__module__ == models.__name__
               and "Transformer" in c.__name__]
    assert len(classes) == 1, classes
    assert not (PKG / "backpack_ext" / "models.py").exists()


def test_no_spec_references():
    root = PKG.parent
    files = list(PKG.rglob("*.py")) + list((root / "docs").glob("*.md")) + [root / "README.md"]
    files += list((root / "examples").glob("*.py")) + list((root / "benchmarks").glob("*.py"))
    hits = [f"{p.relative_to(root)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"\bSPEC\b", line)]
    assert not hits, "references to the internal spec (use docs/math.md):\n" + "\n".join(hits)
