"""The seed-paper examples attention_entropy (JoMA) and icl_dual_form (Dai et al.): their ``--quick``
runs, the committed full-size outputs under ``docs/examples/``, the dual form of linear attention as
a direct float64 unit test, and the example's entropy against an independent computation.

No test depends on a wall-clock limit: the examples run as subprocesses without a timeout.
"""

import importlib.util
import json
import math

import pytest
import torch
from torch import nn

import backpack_attention as ba

from test_seed_examples import DOCS, ROOT, run_example


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def committed(name):
    path = DOCS / name / "results.json"
    if not path.exists():
        pytest.skip(f"{path} not committed yet")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# the dual form of linear attention (Dai et al.), independent of the example
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal,heads", [(True, 1), (True, 2), (False, 2)])
def test_linear_attention_dual_form(causal, heads):
    """Output at a query = W_O [(W_ZSL + Σ_demos v_i k_iᵀ) q / sqrt(d_K)]_heads + b_O, in float64."""
    torch.manual_seed(0)
    E, m, extra = 8, 5, 3
    L = m + extra
    attn = ba.MultiheadSelfAttention(E, heads, causal=causal, attention="linear", dtype=torch.float64)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.5)
    x = torch.randn(3, L, E, dtype=torch.float64)
    with torch.no_grad():
        out = attn(x)
    # projections from the raw torch-layout parameters (rows q | k | v, head h = rows h*d .. h*d + d)
    d = E // heads
    q, k, v = (x @ attn.in_proj_weight.T + attn.in_proj_bias).detach().split(E, dim=-1)
    q, k, v = (t.reshape(3, L, heads, d) for t in (q, k, v))
    dW = torch.einsum("nihe,nihf->nhef", v[:, :m], k[:, :m])  # ΔW_ICL per head

    def dual_form(delta):
        outs = []
        for t in range(m, L):
            end = t + 1 if causal else L
            W_zsl = torch.einsum("nihe,nihf->nhef", v[:, m:end], k[:, m:end])
            o = torch.einsum("nhef,nhf->nhe", W_zsl + delta, q[:, t]) / math.sqrt(d)
            outs.append(o.reshape(3, E) @ attn.out_proj_weight.detach().T + attn.out_proj_bias.detach())
        return torch.stack(outs, dim=1)

    scale = out[:, m:].abs().max()
    assert (dual_form(dW) - out[:, m:]).abs().max() <= 1e-12 * scale
    # the demonstrations matter: without ΔW_ICL the outputs are far off
    assert (dual_form(torch.zeros_like(dW)) - out[:, m:]).abs().max() > 1e-2 * scale
    # ΔW_ICL is one GD step (step size 1, from zero) of a linear layer on the demonstrations' keys
    # (inputs) with their values as back-propagated errors, loss -Σ_i v_iᵀ W k_i
    for n in range(3):
        for h in range(heads):
            lin = nn.Linear(d, d, bias=False, dtype=torch.float64)
            nn.init.zeros_(lin.weight)
            opt = torch.optim.SGD(lin.parameters(), lr=1.0)
            (-(v[n, :m, h] * lin(k[n, :m, h])).sum()).backward()
            opt.step()
            assert (lin.weight.detach() - dW[n, h]).abs().max() <= 1e-13 * dW[n, h].abs().max()


def test_example_dual_form_function_matches_layer():
    ex = load_example("icl_dual_form")
    for causal in (True, False):
        attn = ex.random_linear_attention(8, 2, causal=causal, seed=3)
        x = torch.randn(2, 7, 8, dtype=torch.float64)
        with torch.no_grad():
            ref = attn(x)[:, 4:]
        for gd in (False, True):
            got = ex.dual_form_output(attn, x, 4, gd_step=gd)
            assert (got - ref).abs().max() <= 1e-12 * ref.abs().max(), (causal, gd)
    # the preconditioner formula of the reduced layer reproduces its predictions (random W_Q, W_K; W_K's y column 0)
    attn, _ = ex.make_lsa(4, seed=1)
    with torch.no_grad():
        attn.in_proj_weight[:10].normal_(0.0, 0.5)
        attn.in_proj_weight[5:10, 4] = 0.0
    _, root = ex.covariance(4, 0)
    Z, _ = ex.sample_tasks(16, 9, root, torch.Generator().manual_seed(0))
    with torch.no_grad():
        direct = ex.predict(attn, Z)
    formula = ex.gamma_predict(ex.effective_gamma(attn, 9), Z)
    assert (direct - formula).abs().max() <= 1e-12 * direct.abs().max()


# ---------------------------------------------------------------------------------------------
# icl_dual_form
# ---------------------------------------------------------------------------------------------
def check_icl(results):
    assert results["dual_form_max"] < 1e-12
    for r in results["icl"]:
        c = r["cos"]
        assert r["KFAC factor vs covariance"]["rel diff A vs S (trace-normalised)"] < 1e-10
        # the learned preconditioner is closer to Γ* than to plain GD, and its predictions are those of the formula
        assert c["Γ*"] > c["I"], r["n"]
        t = r["test loss"]
        assert t["trained layer"] < t["c·I (best c)"] < t["zero predictor"], r["n"]
        assert t["Γ (formula)"] == pytest.approx(t["trained layer"], rel=0.05), r["n"]


def test_icl_dual_form_quick(tmp_path):
    stdout, results, summary = run_example("icl_dual_form", tmp_path, "--quick")
    assert results["config"]["quick"] and [r["n"] for r in results["icl"]] == [20]
    check_icl(results)
    assert "dual form" in stdout and "cos(Γ, Γ*)" in summary
    assert (tmp_path / "preconditioner.png").stat().st_size > 1000


def test_committed_icl_dual_form():
    results = committed("icl_dual_form")
    assert not results["config"]["quick"] and len(results["icl"]) >= 3
    check_icl(results)
    for r in results["icl"]:
        assert r["cos"]["Γ*"] > 0.98, r["n"]  # the optimum of Ahn et al. is what linear attention learns
    assert (DOCS / "icl_dual_form" / "preconditioner.png").exists()


# ---------------------------------------------------------------------------------------------
# attention_entropy
# ---------------------------------------------------------------------------------------------
def test_attention_entropy_function_is_independent():
    """The example's entropy equals one computed from the raw weights (softmax with a causal mask)."""
    ex = load_example("attention_entropy")
    model = ex.make_model(11, 9, 8, seed=0)
    X = torch.randint(0, 11, (4, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        blk = model.blocks[0]
        h = blk.ln1(model.embed(X) + model.pos.weight[:9])
        q, k, _ = (h @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias).split(8, dim=-1)
        s = q @ k.transpose(1, 2) / math.sqrt(8)
        s = s.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
        A = torch.softmax(s, dim=-1)
        ref = -(A * torch.log(A.clamp_min(1e-300))).sum(-1).mean().item()
    assert ex.attention_entropy(model, X) == pytest.approx(ref, rel=1e-12)
    assert ex.uniform_entropy(35) == pytest.approx(math.lgamma(36) / 35, rel=1e-14)  # JoMA's 2.632 for bptt 35
    assert ex.uniform_entropy(35) == pytest.approx(2.632, abs=5e-4)


def check_entropy(results):
    runs, uniform = results["runs"], results["uniform_entropy"]
    assert uniform == pytest.approx(math.lgamma(results["config"]["length"] + 1) / results["config"]["length"], rel=1e-12)
    assert len(runs) == len(results["config"]["lrs"]) >= 2
    # the same initialisation and the same held-out data: identical measurements at step 0
    assert runs[0]["curvature"][0]["blocks"] == runs[1]["curvature"][0]["blocks"]
    assert runs[0]["hist"]["entropy"][0] == runs[1]["hist"]["entropy"][0]
    for r in runs:
        e = r["hist"]["entropy"]
        assert all(0.0 <= v <= uniform + 1e-12 for v in e)
        a = results["analysis"][f"{r['lr']:g}"]
        assert a["entropy at end"] == e[-1] and a["collapsed"] == (e[-1] < 0.1)
        for c in r["curvature"]:
            for b in ("W_Q", "W_K", "W_V"):
                blk = c["blocks"][b]
                assert blk["outer"] >= 0 and (blk["ratio"] is None) == (blk["outer"] == 0)
                if blk["ratio"] is not None:
                    assert blk["ratio"] == pytest.approx(blk["functional"] / blk["outer"], rel=1e-12)
            assert c["blocks"]["W_V"]["outer"] > 0


def test_attention_entropy_quick(tmp_path):
    stdout, results, summary = run_example("attention_entropy", tmp_path, "--quick")
    assert results["config"]["quick"] and results["config"]["checkpoints"] == [0, 200]
    check_entropy(results)
    assert "entropy" in stdout and "collapsed" in summary
    for n in ("entropy.png", "curvature.png"):
        assert (tmp_path / n).stat().st_size > 1000, n


def test_committed_attention_entropy():
    results = committed("attention_entropy")
    assert not results["config"]["quick"] and results["config"]["steps"] >= 3000
    check_entropy(results)
    for n in ("entropy.png", "curvature.png"):
        assert (DOCS / "attention_entropy" / n).exists(), n
