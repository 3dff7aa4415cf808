"""The report section ``phases``: short training of the built-in model, Q/K-vs-V curvature ratios.

The step-0 numbers are checked against a dense autodiff reference on the model's ``torch_twin``
(``nn.MultiheadAttention``, math SDPA kernel): GGN = Jᵀ (∂²ℓ/∂F²) J with ``torch.func``, the full
Hessian of the block with ``torch.func.hessian`` (exact here: the model has no LayerNorm),
functional = full − GGN.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call, hessian, jacrev

from backpack_attention import torch_math_attention
from backpack_attention.models import default_problem, torch_twin
from backpack_attention.report import ReportOptions, run_report
from backpack_attention.report.sections import phases


def small_problem(num_sequences=8, **kw):
    # the report's problem (ReportContext), 8 sequences
    return default_problem(seed=0, num_sequences=num_sequences, dtype=torch.float64, d_model=16, num_heads=2, num_layers=1,
                           init_std=0.8 / math.sqrt(16), **kw)


def reference_block_norms(model, loss_func, X, y):
    """``{block: (‖GGN‖_F, ‖H - GGN‖_F)}`` of the (W_b, W_b) blocks (all heads), by autodiff on the twin."""
    twin = torch_twin(model)
    name = "blocks.0.attn.mha.in_proj_weight"
    params = dict(twin.named_parameters())
    W = params[name].detach()
    E = W.shape[1]
    out = {}
    with torch_math_attention():
        for k, b in enumerate(("W_Q", "W_K", "W_V")):
            rows = slice(k * E, (k + 1) * E)

            def f(theta, rows=rows):
                full = W.clone()
                full[rows] = theta
                return functional_call(twin, {**params, name: full}, (X,))

            theta = W[rows].clone()
            F = f(theta)
            J = jacrev(f)(theta).reshape(F.numel(), -1)
            HF = hessian(lambda o: loss_func(o, y))(F).reshape(F.numel(), F.numel())
            ggn = J.T @ HF @ J
            n = theta.numel()
            H = hessian(lambda t: loss_func(f(t), y))(theta).reshape(n, n)  # no LayerNorm: torch.func is exact here
            out[b] = (ggn.norm().item(), (H - ggn).norm().item())
    return out


def test_step_zero_matches_autodiff_and_model_untouched():
    model, loss_func, (X, y) = small_problem(num_sequences=10)
    before = [p.detach().clone() for p in model.parameters()]
    res = phases.training_phases(model, loss_func, X, y, steps=5, checkpoints=(0, 5), curvature_sequences=6)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # a copy was trained
    ref = reference_block_norms(model, loss_func, X[:6], y[:6])  # curvature on the first 6 sequences
    got = res["rows"][0]["layers"][0]["blocks"]
    for b, (ggn, functional) in ref.items():
        assert got[b]["outer"] == pytest.approx(ggn, rel=1e-10), b
        assert got[b]["functional"] == pytest.approx(functional, rel=1e-9, abs=1e-12 * ggn), b
    # training ran: the loss went down and the blocks changed
    r0, r1 = res["rows"]
    assert [r0["step"], r1["step"]] == [0, 5] and r1["loss"] < r0["loss"]
    with torch.no_grad():
        assert r0["loss"] == pytest.approx(loss_func(model(X), y).item(), rel=1e-12)  # loss on all sequences
    assert r1["layers"][0]["blocks"]["W_Q"]["outer"] != got["W_Q"]["outer"]
    # the entropy is that of probability rows: between 0 and the uniform causal value
    L = X.shape[1]
    uniform = sum(math.log(i) for i in range(1, L + 1)) / L
    assert 0 < r0["layers"][0]["entropy"] <= uniform + 1e-12


def test_section_in_report(tmp_path):
    out = tmp_path / "rep"
    assert run_report(ReportOptions(out=str(out), sequences=8, progress=False, sections=["phases"])) == 0
    text = (out / "report.md").read_text()
    assert "## Training phases" in text and "failed" not in text.split("## Run log")[0]
    assert (out / phases.FIGURE_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, loss_func, (X, y) = small_problem()
    # the table's first row: the study's step-0 measurement of the same problem, computed directly
    r = {"step": 0, **phases.measure(model, loss_func, X, y)}
    q = phases.ratios(r["layers"][0])
    assert f"| 0 | 1 | {r['loss']:.4f} | {r['layers'][0]['entropy']:.3f} | {q['Q/V']:.3g} | {q['K/V']:.3g} |" in text
    assert len([line for line in text.splitlines() if line.startswith("| ") and " | 1 | " in line]) == len(phases.CHECKPOINTS)


def test_linear_attention_has_no_entropy_and_bad_arguments():
    model, loss_func, (X, y) = small_problem(attention="linear")
    res = phases.training_phases(model, loss_func, X, y, steps=1, checkpoints=(0,))
    assert res["rows"][0]["layers"][0]["entropy"] is None
    assert "| 0 | 1 |" in phases.phases_markdown(res) and "–" in phases.phases_markdown(res)
    for kw, msg in ((dict(steps=-1), "steps"), (dict(steps=3, checkpoints=(0, 4)), "checkpoints"),
                    (dict(checkpoints=()), "checkpoints"), (dict(lr=0.0), "lr"),
                    (dict(curvature_sequences=0), "curvature_sequences")):
        with pytest.raises(ValueError, match=msg):
            phases.training_phases(model, loss_func, X, y, **kw)
