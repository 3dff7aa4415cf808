"""attention_block_eigenvalues / report_section against dense curvlinops blocks (float64)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from backpack_attention import param_index
from backpack_attention._compat import curvlinops_operator
from backpack_attention.models import default_problem
from backpack_attention.report.sections.spectra import report_section
from backpack_attention.spectra import attention_block_eigenvalues, plot_block_spectra


@pytest.fixture(scope="module")
def problem():
    model, loss_func, (X, y) = default_problem(num_sequences=6)
    return model, loss_func, [(X[:3], y[:3]), (X[3:], y[3:])]


def _dense_block(kind, model, loss_func, data, module, block, head):
    """Dense block of curvlinops' matrix over all of ``module``'s parameters, sliced by param_index."""
    params = list(module.parameters())
    with sdpa_kernel(SDPBackend.MATH):
        op = curvlinops_operator(kind, model, loss_func, params, data, check_deterministic=False)
        D = op @ torch.eye(op.shape[1], dtype=torch.float64)
    idx = param_index(module, block, head)
    return D[idx][:, idx]


CASES = [  # eigsh path (dense_max=0) and dense path
    (0, ("W_Q",), True, ("full", "functional"), ("LA", "SA")),
    (0, ("W_K",), False, ("outer",), ("LA",)),
    (10_000, ("W_K", "W_V", "W_O"), False, ("full", "outer", "functional"), ("LA", "SA")),
]


@pytest.mark.parametrize("dense_max, blocks, per_head, parts, which", CASES)
def test_block_eigenvalues_match_dense(problem, dense_max, blocks, per_head, parts, which):
    """Against eigvalsh of blocks sliced from curvlinops' dense matrices."""
    model, loss_func, data = problem
    module = model.attention_layers()[0]
    # dense_max=0: every block through eigsh on the operator; else the layer's dense matrix, sliced
    rows = attention_block_eigenvalues(model, loss_func, data, k=3, blocks=blocks, per_head=per_head,
                                       parts=parts, which=which, dense_max=dense_max, tol=1e-10,
                                       dense_layer_max=0 if dense_max == 0 else 4096)
    heads = module.num_heads if per_head else 0
    assert len(rows) == len(blocks) * (1 + heads) * len(parts) * len(which)
    cache = {}
    for r in rows:
        key = (r["block"], r["head"])
        if key not in cache:
            Hd = _dense_block("hessian", model, loss_func, data, module, *key)
            Gd = _dense_block("ggn", model, loss_func, data, module, *key)
            cache[key] = {"full": Hd, "outer": Gd, "functional": Hd - Gd}
        ev = np.linalg.eigvalsh(cache[key][r["part"]].numpy())
        ref = ev[-3:][::-1] if r["which"] == "LA" else ev[:3][::-1]
        scale = max(1.0, np.abs(np.linalg.eigvalsh(cache[key]["full"].numpy())).max())
        np.testing.assert_allclose(r["eigenvalues"], ref, atol=1e-7 * scale, err_msg=str(r))
        assert r["size"] == len(param_index(module, *key))
    zero = [r for r in rows if r["part"] == "functional" and r["block"] in ("W_V", "W_O")]
    assert all(max(abs(e) for e in r["eigenvalues"]) < 1e-12 for r in zero)


def test_plot_and_report_section(problem, tmp_path):
    model, loss_func, data = problem
    ctx = {"model": model, "loss_func": loss_func, "data": data, "out_dir": str(tmp_path), "k": 2,
           "blocks": ("W_Q", "W_K"), "operator_kwargs": {"check_deterministic": False}}
    sec = report_section(ctx)
    assert "| layer | block |" in sec["markdown"] and len(sec["rows"]) == 2 * 3 * 2
    assert all(os.path.getsize(p) > 0 for p in sec["figures"])
    fig = plot_block_spectra(sec["rows"], str(tmp_path / "again.png"))
    assert len(fig.axes) == 3
    with pytest.raises(ValueError, match="loss_func"):
        report_section({"model": model})

    class Ctx:  # the report's ReportContext interface
        pass

    ctx2 = Ctx()
    ctx2.model, ctx2.loss_func, ctx2.data = model, loss_func, data
    sec2 = report_section(ctx2)
    assert sec2["figures"] == [] and len(sec2["rows"]) == 4 * 3 * 2 and sec2["draw"]() is not None


def test_bad_arguments(problem):
    model, loss_func, data = problem
    with pytest.raises(ValueError, match="blocks"):
        attention_block_eigenvalues(model, loss_func, data, blocks=("W_X",))
    with pytest.raises(ValueError, match="parts"):
        attention_block_eigenvalues(model, loss_func, data, parts=("diag",))
    with pytest.raises(ValueError, match="layers"):
        attention_block_eigenvalues(model, loss_func, data, layers=[3])


def test_progress_bar(problem, capsys):
    """A tqdm bar over the eigenproblems on stderr, and none with progress=False."""
    model, loss_func, data = problem
    kw = dict(k=2, blocks=("W_V",), per_head=True, parts=("outer",))
    rows = attention_block_eigenvalues(model, loss_func, data, progress=True, **kw)
    err = capsys.readouterr().err
    assert "attention block eigenvalues" in err and f"{len(rows)}/{len(rows)}" in err
    attention_block_eigenvalues(model, loss_func, data, progress=False, **kw)
    assert "attention block eigenvalues" not in capsys.readouterr().err


def test_report_cross_check_with_curvlinops():
    """The spectra section's cross-check table: ours and curvlinops' (on nn.MultiheadAttention)
    largest eigenvalues agree in float64; linear attention (no torch counterpart) is skipped."""
    import re

    from backpack_attention.report.sections.spectra import curvlinops_agreement

    model, loss_func, (X, y) = default_problem(num_sequences=4, d_model=8, num_heads=2)
    text = curvlinops_agreement(model, loss_func, [(X, y)])
    rows = re.findall(r"^\| (W_\w) \(layer 1\) \| (GGN|Hessian) \| (\S+) \| (\S+) \| (\S+) \|$", text, flags=re.M)
    assert [(b, c) for b, c, *_ in rows] == [("W_Q", "GGN"), ("W_Q", "Hessian"), ("W_V", "GGN"), ("W_V", "Hessian")]
    for _, _, ours, ref, diff in rows:
        assert abs(float(ours) - float(ref)) <= 1e-5 * abs(float(ref))  # the table rounds to 6 digits
        assert float(diff) < 1e-10
    lin, lf, (X, y) = default_problem(num_sequences=2, d_model=8, num_heads=2, attention="linear")
    assert "no linear attention" in curvlinops_agreement(lin, lf, [(X, y)])
