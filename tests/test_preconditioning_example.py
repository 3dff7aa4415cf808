"""examples/preconditioning.py: its --quick run writes consistent outputs (every stated divergence
step, loss and acceptance line follows from the recorded histories; the GD run equals plain gradient
descent computed here), and the committed docs/examples/preconditioning/summary.md shows exactly the
committed results.json.

The example runs as a subprocess without a timeout (no wall-clock assertion)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "examples" / "preconditioning"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("preconditioning")
    proc = subprocess.run([sys.executable, "examples/preconditioning.py", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, json.loads((out / "results.json").read_text()), (out / "summary.md").read_text()


def check_results(res):
    """Every run's reported numbers follow from its history; the acceptance follows from the runs."""
    cfg = res["config"]
    factor = cfg["diverge_factor"]
    for key, r in res["runs"].items():
        h = r["hist"]
        steps, losses = h["step"], h["loss"]
        assert steps == sorted(set(steps)) and steps[0] == 0, key
        assert losses[0] == pytest.approx(r["loss0"]) and math.isfinite(r["loss0"]), key
        finite = [v for v in losses if v is not None]
        assert r["min_loss"] == min(finite), key
        if r["diverged_at"] is None:
            assert steps[-1] == cfg["steps"], key
            assert all(v is not None and v <= factor * r["loss0"] for v in losses), key
            assert r["final_loss"] == losses[-1] == r["last_finite_loss"], key
            assert r["path_QK"] is not None and r["path_VW"] is not None, key
            assert r["path_ratio"] == pytest.approx(r["path_QK"] / r["path_VW"]), key
        else:
            assert r["final_loss"] is None and r["diverge_reason"], key
            assert steps[-1] == r["diverged_at"] <= cfg["steps"], key
            before = losses[:-1] if "curvature" not in r["diverge_reason"] else losses
            assert all(v is not None and v <= factor * r["loss0"] for v in before), key  # nothing earlier
            if "curvature" not in r["diverge_reason"]:  # the last recorded step is the divergent one
                last = losses[-1]
                assert last is None or last > factor * r["loss0"] or r["diverge_reason"] == "non-finite parameters", key
            i = max(j for j, v in enumerate(losses) if v is not None)
            assert (r["last_finite_step"], r["last_finite_loss"]) == (steps[i], losses[i]), key
        # the path length is at least the distance from the initialisation
        for blocks, path in ((("W_Q", "W_K"), r["path_QK"]), (("W_V", "W"), r["path_VW"])):
            d = [r["dist_end"][b] for b in blocks]
            if path is not None and None not in d:
                assert path >= math.sqrt(sum(x * x for x in d)) * (1 - 1e-9), key
    acc = res["acceptance"]
    gen = res["runs"][acc["generic"]]
    assert acc["generic diverged at"] == gen["diverged_at"]
    for k, d in acc["aware"].items():
        assert d == res["runs"][k]["diverged_at"]
    expected = [gen["diverged_at"] is not None] + [res["runs"][k]["diverged_at"] is None for k in acc["aware"]]
    assert list(acc["checks"].values()) == expected
    assert acc["holds"] == all(expected)
    if res["grid"]:  # the map facts, recomputed from the cells
        f = acc["grid facts"]
        st = {(c["lr"], c["damping"], c["kfac_approx"], c["style"]): c["diverged_at"] is None for c in res["grid"]}
        pts = sorted({k[:2] for k in st})
        assert f["pairs"] == 2 * len(pts)
        assert f["style changes outcome"] == sum(st[(*p, a, "global")] != st[(*p, a, "per-block")]
                                                 for p in pts for a in ("expand", "attention"))
        assert f["attention stable, expand diverges"] == [
            list(p) for p in pts if st[(*p, "attention", "global")] and not st[(*p, "expand", "global")]]
        assert f["expand stable, attention diverges"] == [
            list(p) for p in pts if st[(*p, "expand", "global")] and not st[(*p, "attention", "global")]]
    for c in res["grid"]:  # stability map: a divergence step within the cell's steps, or stable
        assert c["diverged_at"] is None or 0 <= c["diverged_at"] <= cfg["grid_steps"], c
        if c["style"] == "per-block" and c["damping"] == cfg["qk_damping"]:  # the dict is the global damping there
            twin = next(d for d in res["grid"] if (d["lr"], d["damping"], d["kfac_approx"], d["style"])
                        == (c["lr"], c["damping"], c["kfac_approx"], "global"))
            assert twin["diverged_at"] == c["diverged_at"], c


def _rows(text, header_start, header=False):
    """Cells of the Markdown table whose header starts with ``header_start`` (or of its header)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    split = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    if header:
        return split(lines[start])
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(split(line))
    return rows


def check_summary(summary, res):
    """The Runs and Acceptance tables of summary.md show the numbers of results.json."""
    rows = _rows(summary, "| method | lr | damping δ |")
    runs = list(res["runs"].values())
    assert len(rows) == len(runs)

    def same(cell, value, rel=6e-4):  # printed with 4 (rel=6e-4) or 3 (rel=6e-3) significant digits
        if value is None:
            return cell == "–"
        return float(cell) == pytest.approx(value, rel=rel)

    for row, r in zip(rows, runs):
        assert row[0] == r["label"]
        assert float(row[1]) == pytest.approx(r["lr"])
        assert row[3] == ("did not diverge" if r["diverged_at"] is None else str(r["diverged_at"]))
        assert same(row[4], r["final_loss"]) and same(row[5], r["last_finite_loss"]) and same(row[6], r["min_loss"])
        assert row[7] == ("–" if r["T1"] is None else str(r["T1"]))
        assert same(row[8], r["path_QK"], 6e-3) and same(row[9], r["path_VW"], 6e-3) and same(row[10], r["path_ratio"], 6e-3)
    for claim, holds in res["acceptance"]["checks"].items():
        assert f"| {claim} | {'yes' if holds else '**no**'} |" in summary
    assert f"{res['config']['steps']} full-batch steps per method" in summary
    if res["grid"]:
        cells = {(c["lr"], c["damping"], c["kfac_approx"], c["style"]): c for c in res["grid"]}
        styles = [tuple(h.split(", ")) for h in _rows(summary, "| lr | δ |", header=True)[2:]]
        for row in _rows(summary, "| lr | δ |"):
            for cell, (approx, style) in zip(row[2:], styles):
                c = cells[(float(row[0]), float(row[1]), approx, style)]
                assert cell == ("stable" if c["diverged_at"] is None else f"step {c['diverged_at']}")
        assert len(_rows(summary, "| lr | δ |")) * len(styles) == len(cells)


def test_quick_outputs(quick):
    out, stdout, res, summary = quick
    for name in ("losses.png", "distances.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC and (out / name).stat().st_size > 1000
    assert res["config"]["quick"] is True and res["config"]["steps"] == 40
    assert "python examples/preconditioning.py --quick" in summary
    assert f"acceptance holds: {res['acceptance']['holds']}" in stdout
    check_results(res)
    check_summary(summary, res)
    # the curvature record: the damping the inverse used per block (every KFAC/EKFAC run computed its curvature)
    cfg = res["config"]
    qk, d = cfg["qk_damping"], cfg["global_damping"]
    for key in ("attention_per_block", "ekfac_per_block", "expand_per_block"):
        r = res["runs"][key]["curvature_at_0"]
        assert [r[b]["damping"] for b in ("W_Q", "W_K", "W_V", "W")] == [qk, qk, d, d], key
    for key in ("expand_global", "attention_global"):
        assert {b["damping"] for b in res["runs"][key]["curvature_at_0"].values()} == {d}, key
    for key in ("attention_heuristic", "ekfac_heuristic"):  # delta_b = max(1e-2 x own scale, 1e-8 x largest scale)
        rec = res["runs"][key]["curvature_at_0"].values()
        floor = 1e-8 * max(b["scale"] for b in rec)
        for b in rec:
            assert b["damping"] == pytest.approx(max(1e-2 * b["scale"], floor), rel=1e-6), key
    # the acceptance line at this setting (deterministic, float64)
    assert res["acceptance"]["holds"] is True, res["acceptance"]


def test_quick_gd_run_is_plain_gradient_descent(quick):
    """The first GD losses equal gradient descent on the example's model, computed here."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from cooccurrence_phases import CooccurrenceModel, cooccurrence_data
    finally:
        sys.path.remove(str(ROOT / "examples"))
    _, _, res, _ = quick
    r = res["runs"]["gd"]
    tokens, y, _ = cooccurrence_data(res["config"]["seed"])
    model = CooccurrenceModel(res["config"]["seed"], res["config"]["init_scale"])
    params = model.trained_parameters()
    losses = []
    for _ in range(4):
        loss = nn.functional.binary_cross_entropy_with_logits(model(tokens), y)
        losses.append(loss.item())
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(r["lr"] * g)
    assert r["hist"]["step"][:4] == [0, 1, 2, 3]
    assert r["hist"]["loss"][:4] == pytest.approx(losses, rel=1e-12)


def test_committed_outputs_consistent():
    res = json.loads((DOCS / "results.json").read_text())
    summary = (DOCS / "summary.md").read_text()
    assert res["config"]["quick"] is False
    check_results(res)
    check_summary(summary, res)
    for name in ("losses.png", "distances.png"):
        assert (DOCS / name).read_bytes()[:8] == PNG_MAGIC
    index = (DOCS / "index.md").read_text()
    assert '--8<-- "examples/preconditioning/summary.md:2:"' in index
