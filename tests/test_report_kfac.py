"""The report section ``kfac``: its table and angles are ``kfac_quality`` called directly on the same
model (parsed back from report.md, at the printed precision), and its figure is written."""

from __future__ import annotations

import math

import pytest

import backpack_attention as ba
from backpack_attention.kfac_quality import METHODS
from backpack_attention.models import default_problem
from backpack_attention.report import ReportOptions, run_report
from backpack_attention.report.sections.kfac import FIGURE_NAME, KFAC_SEQUENCES, TITLES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _table(text, header_start):
    """Rows (lists of cells) of the Markdown table whose header starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return lines[start], rows


def _close(cell, value):
    """``cell`` is ``value`` printed in 4 significant digits."""
    return float(cell) == pytest.approx(value, rel=6e-4, abs=1e-300)


# the report's default width on fewer sequences than the section takes; two small layers on more (a subset)
@pytest.mark.parametrize(("layers", "d_model", "sequences"), [(1, 16, 6), (2, 8, KFAC_SEQUENCES + 3)])
def test_kfac_section_matches_kfac_quality(tmp_path, layers, d_model, sequences):
    opts = ReportOptions(out=str(tmp_path), layers=layers, d_model=d_model, sequences=sequences, seed=2,
                         sections=["kfac"], progress=False, plots=layers == 1)
    assert run_report(opts) == 0
    text = (tmp_path / "report.md").read_text()
    assert "## KFAC and EKFAC against the exact GGN" in text and "failed" not in text.split("## Run log")[0]

    # the same model as the report's ReportContext builds, and kfac_quality called directly on it
    model, loss_func, (X, y) = default_problem(seed=2, num_sequences=sequences, d_model=d_model, num_heads=opts.heads,
                                               num_layers=layers, init_std=0.8 / math.sqrt(d_model))
    n = min(sequences, KFAC_SEQUENCES)
    assert f"on the first {n} of the report's sequences" in text
    mods = [m for m in model.modules() if isinstance(m, ba.MultiheadSelfAttention)]
    assert len(mods) == layers
    direct = [ba.kfac_quality(model, loss_func, m, [(X[:n], y[:n])]) for m in mods]

    header, rows = _table(text, "| layer | block | head |")
    assert header == "| layer | block | head | " + " | ".join(TITLES[m] for m in METHODS) + " |"
    expected_rows = [(i, b, h) for i, q in enumerate(direct) for (b, h) in q.errors]
    assert [(int(r[0]), r[1], None if r[2] == "all" else int(r[2])) for r in rows] == expected_rows
    for r in rows:
        errs = direct[int(r[0])].errors[(r[1], None if r[2] == "all" else int(r[2]))]
        for cell, m in zip(r[3:], METHODS):
            if m in errs:
                assert _close(cell, errs[m]), (r, m)
            else:
                assert cell == "–" and r[1] == "layer"

    header, rows = _table(text, "| layer | damping |")
    assert len(rows) == layers
    for r in rows:
        q = direct[int(r[0])]
        assert _close(r[1], q.damping)
        for cell, m in zip(r[2:], ("attention", "expand", "ekfac")):
            assert _close(cell, q.angles[m]), (r, m)

    png = tmp_path / FIGURE_NAME
    if opts.plots:
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000
        assert f"]({FIGURE_NAME})" in text
    else:
        assert not png.exists()
