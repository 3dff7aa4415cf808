"""AttentionKFACLinearOperator / AttentionEKFACLinearOperator (float64, tiny models).

References, all independent of the operator's factor code:

* the exact GGN blocks: ``AttentionGGNLinearOperator`` (checked against curvlinops' GGN elsewhere)
  and ``hessian_blocks(...).outer``;
* curvlinops' ``KFACLinearOperator`` / ``EKFACLinearOperator`` on the ``nn.Linear`` twin below
  (attention computed from separate q/k/v/o ``nn.Linear`` layers and a plain softmax);
* dense linear algebra for inverse, trace, logdet, determinant and Frobenius norm.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import backpack_attention as ba
from backpack_attention.models import LinearProjectionAttention

with warnings.catch_warnings():
    warnings.filterwarnings("ignore")
    from curvlinops import EKFACLinearOperator, KFACLinearOperator

DT = torch.float64
N, L, E, H, C, MLP = 3, 4, 6, 2, 5, 8


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
class Net(nn.Module):
    """attention (+ optional residual MLP) + linear readout; ``ce``: logits ``[N, C, L]``."""

    def __init__(self, causal=True, mlp=True, readout=True, ce=True, bias=True, pool=False):
        super().__init__()
        self.pool = pool  # mean over tokens before the readout: one output [N, C] per sequence
        self.attn = ba.MultiheadSelfAttention(E, H, causal=causal, bias=bias, dtype=DT)
        self.mlp = nn.Sequential(nn.Linear(E, MLP, dtype=DT), nn.ReLU(), nn.Linear(MLP, E, dtype=DT)) if mlp else None
        self.readout = nn.Linear(E, C, dtype=DT) if readout else None
        self.ce = ce

    def forward(self, x, key_padding_mask=None):
        h = self.attn(x, key_padding_mask) if key_padding_mask is not None else self.attn(x)
        if self.mlp is not None:
            h = h + self.mlp(h)
        if self.pool:
            h = h.mean(1)
        if self.readout is not None:
            h = self.readout(h)
        return h.transpose(1, 2) if self.ce and not self.pool else h


def twin(model: Net) -> Net:
    t = copy.deepcopy(model)
    t.attn = LinearProjectionAttention(model.attn)
    return t


def twin_params(t: Net):
    """Twin parameters in the flat order of ``list(model.parameters())``."""
    ps = t.attn.linear_params()
    for m in (t.mlp, t.readout):
        if m is not None:
            ps += list(m.parameters())
    return ps


def problem(seed=0, ce=True, **kw):
    torch.manual_seed(seed)
    model = Net(ce=ce, **kw)
    with torch.no_grad():
        for p in model.attn.parameters():
            p.add_(0.3 * torch.randn_like(p))
    X = torch.randn(N, L, E, dtype=DT)
    if ce:
        y = torch.randint(0, C, (N,) if model.pool else (N, L))
    else:
        y = torch.randn(N, L, C if model.readout is not None else E, dtype=DT)
    return model, (nn.CrossEntropyLoss() if ce else nn.MSELoss()), X, y


def flat_index(full_params, sub):
    """Positions of the parameters ``sub`` in the concatenation of ``full_params``."""
    offsets, o = {}, 0
    for p in full_params:
        offsets[id(p)] = torch.arange(o, o + p.numel())
        o += p.numel()
    return torch.cat([offsets[id(p)] for p in sub])


def dense(op, P):
    return op @ torch.eye(P, dtype=DT)


def exact_ggn(model, loss_func, X, y):
    """The attention layer's exact GGN ``[P, P]`` (closed-form blocks), parameters in module order."""
    return ba.hessian_blocks(model, loss_func, model.attn, (X, y)).matrix("outer")


# ---------------------------------------------------------------------------------------------
# the attention recipe: exact V (and O) for one layer with MSE
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("readout", [False, True], ids=["attention-only", "linear-readout"])
@pytest.mark.parametrize("separate", [False, True], ids=["joint", "separate"])
def test_attention_V_blocks_exact_one_layer_mse(separate, readout):
    model, loss_func, X, y = problem(1, ce=False, mlp=False, readout=readout)
    attn = model.attn
    params = list(attn.parameters())
    K = ba.AttentionKFACLinearOperator(model, loss_func, params, [(X, y)], separate_weight_and_bias=separate)
    D = dense(K, sum(p.numel() for p in params))
    blocks = ba.hessian_blocks(model, loss_func, attn, (X, y))
    for h in range(H):
        for a in ("W_V", "b_V"):
            for b in ("W_V", "b_V"):
                if separate and a != b:
                    continue  # weight-bias couplings are dropped by separate blocks
                ref = blocks[(a, h), (b, h)].outer
                got = D[ba.param_index(attn, a, h)][:, ba.param_index(attn, b, h)]
                assert rel(got, ref) < 1e-10, (a, b, h)
    i = ba.param_index(attn, "W_O")
    assert rel(D[i][:, i], blocks[("W_O", None), ("W_O", None)].outer) < 1e-10
    # b_K has no curvature, exactly
    i = ba.param_index(attn, "b_K")
    assert D[i].abs().max() == 0


@pytest.mark.parametrize("separate", [False, True], ids=["joint", "separate"])
def test_attention_reduce_V_and_O_blocks_exact_for_pooled_output_mse(separate):
    """A model that averages over positions (mean-pool readout, MSE on [N, C]): with
    kfac_approx="attention-reduce" every head's V block and the O block equal the exact GGN
    blocks; the per-token "attention" recipe is not exact there."""
    torch.manual_seed(3)
    model = Net(ce=False, mlp=False, readout=True, pool=True)
    with torch.no_grad():
        for p in model.attn.parameters():
            p.add_(0.3 * torch.randn_like(p))
    X, y = torch.randn(N, L, E, dtype=DT), torch.randn(N, C, dtype=DT)
    loss_func, attn = nn.MSELoss(), model.attn
    params = list(attn.parameters())
    P = sum(p.numel() for p in params)
    blocks = ba.hessian_blocks(model, loss_func, attn, (X, y))
    errors = {}
    for approx in ("attention-reduce", "attention"):
        D = dense(ba.AttentionKFACLinearOperator(model, loss_func, params, [(X, y)], kfac_approx=approx,
                                                 separate_weight_and_bias=separate), P)
        errs = []
        for h in range(H):
            for a, b in (("W_V", "W_V"), ("b_V", "b_V")) + ((("W_V", "b_V"),) if not separate else ()):
                ref = blocks[(a, h), (b, h)].outer
                errs.append(rel(D[ba.param_index(attn, a, h)][:, ba.param_index(attn, b, h)], ref))
        i = ba.param_index(attn, "W_O")
        errs.append(rel(D[i][:, i], blocks[("W_O", None), ("W_O", None)].outer))
        errors[approx] = max(errs)
    assert errors["attention-reduce"] < 1e-10
    assert errors["attention"] > 1e-3


def test_attention_beats_expand_on_V_and_K_with_cross_entropy():
    """Not exact with CE, but closer to the GGN than the generic recipe (errors vs AttentionGGN)."""
    model, loss_func, X, y = problem(2, mlp=False)
    params = list(model.attn.parameters())
    G = exact_ggn(model, loss_func, X, y)
    P = G.shape[0]
    ours = dense(ba.AttentionKFACLinearOperator(model, loss_func, params, [(X, y)]), P)
    generic = dense(ba.AttentionKFACLinearOperator(model, loss_func, params, [(X, y)], kfac_approx="expand"), P)
    for name in ("W_V", "W_K"):
        i = ba.param_index(model.attn, name)
        assert rel(ours[i][:, i], G[i][:, i]) < rel(generic[i][:, i], G[i][:, i]), name


# ---------------------------------------------------------------------------------------------
# expand / reduce = curvlinops on the nn.Linear twin
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type,mc", [("type-2", 1), ("mc", 2), ("empirical", 1)])
@pytest.mark.parametrize("ce,separate", [(True, True), (False, False)], ids=["ce-separate", "mse-joint"])
def test_generic_recipes_match_curvlinops_on_linear_twin(kfac_approx, fisher_type, mc, ce, separate):
    model, loss_func, X, y = problem(3, ce=ce)
    params = list(model.parameters())
    t = twin(model)
    kw = dict(fisher_type=fisher_type, mc_samples=mc, kfac_approx=kfac_approx, separate_weight_and_bias=separate)
    data = [(X[:2], y[:2]), (X[2:], y[2:])]
    ours = dense(ba.AttentionKFACLinearOperator(model, loss_func, params, data, **kw), sum(p.numel() for p in params))
    ref = dense(KFACLinearOperator(t, loss_func, twin_params(t), data, check_deterministic=False, **kw), ours.shape[0])
    assert rel(ours, ref) < 1e-10


def test_ekfac_expand_matches_curvlinops_on_linear_twin():
    model, loss_func, X, y = problem(4, pool=True)  # curvlinops' EKFAC needs one output per sequence
    params = list(model.parameters())
    t = twin(model)
    kw = dict(fisher_type="type-2", kfac_approx="expand")
    ours = dense(ba.AttentionEKFACLinearOperator(model, loss_func, params, [(X, y)], **kw),
                 sum(p.numel() for p in params))
    ref = dense(EKFACLinearOperator(t, loss_func, twin_params(t), [(X, y)], check_deterministic=False, **kw),
                ours.shape[0])
    assert rel(ours, ref) < 1e-10


def test_subset_and_order_of_params():
    """Any subset in any order: the blocks of the full operator, permuted."""
    model, loss_func, X, y = problem(5)
    full_params = list(model.parameters())
    full = dense(ba.AttentionKFACLinearOperator(model, loss_func, full_params, [(X, y)], kfac_approx="expand"),
                 sum(p.numel() for p in full_params))
    sub = [model.readout.weight, model.attn.in_proj_weight, model.attn.out_proj_bias]
    ours = dense(ba.AttentionKFACLinearOperator(model, loss_func, sub, [(X, y)], kfac_approx="expand"),
                 sum(p.numel() for p in sub))
    idx = flat_index(full_params, sub)
    assert rel(ours, full[idx][:, idx]) < 1e-12


@pytest.mark.parametrize("cls", [ba.AttentionKFACLinearOperator, ba.AttentionEKFACLinearOperator])
def test_attention_layer_without_its_output_projection(cls):
    """An attention layer whose W_O/b_O are not among ``params`` (EKFAC used to raise KeyError):
    the blocks of the operator on all parameters (separate weight and bias blocks)."""
    model, loss_func, X, y = problem(6)
    kw = dict(kfac_approx="attention", separate_weight_and_bias=True)
    full_params = list(model.parameters())
    full = dense(cls(model, loss_func, full_params, [(X, y)], **kw), sum(p.numel() for p in full_params))
    sub = [model.readout.weight, model.attn.in_proj_weight, model.attn.in_proj_bias]
    ours = dense(cls(model, loss_func, sub, [(X, y)], **kw), sum(p.numel() for p in sub))
    idx = flat_index(full_params, sub)
    assert rel(ours, full[idx][:, idx]) < 1e-12


# ---------------------------------------------------------------------------------------------
# MC converges to type-2 (attention recipe: per-token columns have no cross-token terms)
# ---------------------------------------------------------------------------------------------
def test_mc_fisher_converges_to_type2():
    model, loss_func, X, y = problem(6, mlp=False)
    params = list(model.parameters())
    P = sum(p.numel() for p in params)
    ref = dense(ba.AttentionKFACLinearOperator(model, loss_func, params, [(X, y)]), P)
    errs = []
    for samples in (4, 400):
        mc = ba.AttentionKFACLinearOperator(model, loss_func, params, [(X, y)], fisher_type="mc",
                                            mc_samples=samples, seed=1)
        errs.append(rel(dense(mc, P), ref))
    assert errs[1] < 0.1 and errs[1] < errs[0] / 3, errs  # ~1/sqrt(samples)


# ---------------------------------------------------------------------------------------------
# inverse, scalars, state
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [ba.AttentionKFACLinearOperator, ba.AttentionEKFACLinearOperator])
def test_inverse_and_scalars(cls):
    model, loss_func, X, y = problem(7)
    params = list(model.parameters())
    K = cls(model, loss_func, params, [(X, y)], separate_weight_and_bias=False)
    P = sum(p.numel() for p in params)
    D = dense(K, P)
    eye = torch.eye(P, dtype=DT)
    for damping in (1e-3, "heuristic", {"Q": 1e-2, "K": 1e-1, "default": 1e-3}):
        inv = K.inverse(damping)
        d = torch.tensor([inv.damping[b.name] for b in K.blocks() for _ in range(b.index.numel())], dtype=DT)
        order = torch.cat([b.index.reshape(-1) for b in K.blocks()])
        delta = torch.zeros(P, dtype=DT)
        delta[order] = d
        assert rel(dense(inv, P) @ (D + torch.diag(delta)), eye) < 1e-8, damping
    assert abs(K.trace().item() - D.trace().item()) < 1e-10 * D.trace().abs().item()
    assert abs(K.frobenius_norm().item() - D.norm().item()) < 1e-10 * D.norm().item()
    Dd = D + 1e-2 * eye  # a definite matrix with the same structure, for logdet and det
    Kd = K.inverse(1e-2)
    ref_logdet = -torch.linalg.slogdet(dense(Kd, P))[1]
    assert abs(ref_logdet - torch.logdet(Dd)) < 1e-8 * abs(ref_logdet)
    # logdet/det of the operator itself against dense eigenvalues (singular blocks allowed: -inf / 0)
    ev = torch.linalg.eigvalsh(D).clamp_min(0)
    if (ev > 1e-12 * ev.max()).all():
        assert abs(K.logdet() - ev.log().sum()) < 1e-6 * abs(ev.log().sum())
    else:
        assert K.det().abs() < 1e-30


def test_heuristic_damping_scales_with_each_block():
    model, loss_func, X, y = problem(8)
    K = ba.AttentionKFACLinearOperator(model, loss_func, list(model.parameters()), [(X, y)])
    damp = K.resolve_damping("heuristic", relative=0.1)
    for b in K.blocks():
        scale = (b.out_factor.trace() * b.in_factor.trace()).item() / b.index.numel()
        assert damp[b.name] == pytest.approx(max(0.1 * scale, 1e-8 * max(
            (c.out_factor.trace() * c.in_factor.trace()).item() / c.index.numel() for c in K.blocks())), rel=1e-6)


def test_state_dict_roundtrip():
    model, loss_func, X, y = problem(9)
    params = list(model.parameters())
    K1 = ba.AttentionEKFACLinearOperator(model, loss_func, params, [(X, y)])
    P = sum(p.numel() for p in params)
    D1 = dense(K1, P)
    sd = K1.state_dict()
    with torch.no_grad():
        model.attn.in_proj_weight.add_(1.0)  # the loaded factors, not the model, define the operator
    K2 = ba.AttentionEKFACLinearOperator(model, loss_func, params, [(X, y)])
    K2.load_state_dict(sd)
    assert rel(dense(K2, P), D1) < 1e-14
    K3 = ba.AttentionKFACLinearOperator(model, loss_func, params, [(X, y)], kfac_approx="expand")
    with pytest.raises(ValueError, match="configuration"):
        K3.load_state_dict(sd)


# ---------------------------------------------------------------------------------------------
# EKFAC
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ce", [True, False], ids=["ce", "mse"])
def test_ekfac_error_at_most_kfac_error_per_block(ce):
    model, loss_func, X, y = problem(10, ce=ce, mlp=False)
    params = list(model.parameters())
    G = exact_ggn(model, loss_func, X, y)
    K = ba.AttentionKFACLinearOperator(model, loss_func, params, [(X, y)], separate_weight_and_bias=False)
    Ek = ba.AttentionEKFACLinearOperator(model, loss_func, params, [(X, y)], separate_weight_and_bias=False)
    P = sum(p.numel() for p in params)
    Dk, De = dense(K, P), dense(Ek, P)
    n_attn = G.shape[0]
    for b in K.blocks():
        if b.module != "attn":
            continue
        i = b.index.reshape(-1)
        assert i.max() < n_attn
        ref = G[i][:, i]
        if ref.norm() == 0:
            continue
        ek, kf = rel(De[i][:, i], ref), rel(Dk[i][:, i], ref)
        assert ek <= kf + 1e-10, (b.name, ek, kf)


# ---------------------------------------------------------------------------------------------
# bad input: clear errors before any work, model untouched
# ---------------------------------------------------------------------------------------------
def test_bad_input():
    model, loss_func, X, y = problem(11)
    params = list(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    flags = [p.requires_grad for p in model.parameters()]
    data = [(X, y)]
    Op = ba.AttentionKFACLinearOperator
    with pytest.raises(ValueError, match="kfac_approx"):
        Op(model, loss_func, params, data, kfac_approx="full")
    with pytest.raises(ValueError, match="fisher_type"):
        Op(model, loss_func, params, data, fisher_type="type-1")
    with pytest.raises(ValueError, match="mc_samples"):
        Op(model, loss_func, params, data, mc_samples=3)
    with pytest.raises(ValueError, match="loss_func"):
        Op(model, nn.L1Loss(), params, data)
    with pytest.raises(TypeError, match="one-shot"):
        Op(model, loss_func, params, iter(data))
    with pytest.raises(ValueError, match="same parameter"):
        Op(model, loss_func, params + params[:1], data)
    K = Op(model, loss_func, params, data)
    for bad in (0.0, -1.0, float("nan"), "big", {"Q": -1.0, "default": 1.0}, {"nonsense": 1.0}, {"Q": 1.0}):
        with pytest.raises(ValueError, match="damping"):
            K.inverse(bad)
    assert not K._factors_ready  # refused before computing anything
    for p, b, f in zip(model.parameters(), before, flags):
        assert torch.equal(p, b) and p.requires_grad == f


def test_unsupported_parameters_are_named():
    torch.manual_seed(0)
    from backpack_attention.models import language_model
    model = language_model(vocab=C, d_model=E, num_heads=H, num_layers=1, dtype=DT)
    X = torch.randint(0, C, (N, L))
    y = torch.randint(0, C, (N, L))
    with pytest.raises(ValueError, match=r"blocks\.0\.ln1\.weight \(LayerNorm\).*embed\.weight \(Embedding\)|"
                                         r"embed\.weight \(Embedding\).*blocks\.0\.ln1\.weight \(LayerNorm\)"):
        ba.AttentionKFACLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), [(X, y)])
    # excluding them works, and covers every Linear and attention parameter
    keep = [p for n, p in model.named_parameters() if "ln" not in n and "embed" not in n]
    K = ba.AttentionKFACLinearOperator(model, nn.CrossEntropyLoss(), keep, [(X, y)])
    v = [torch.randn_like(p) for p in keep]
    assert all(torch.isfinite(o).all() for o in K @ v)
    mha = nn.Sequential(nn.Linear(E, E, dtype=DT))
    mha.add_module("mha", nn.MultiheadAttention(E, H, batch_first=True, dtype=DT))
    with pytest.raises(ValueError, match="convert_attention"):
        ba.AttentionKFACLinearOperator(mha, nn.MSELoss(), [mha.mha.in_proj_weight], [(torch.randn(N, L, E, dtype=DT),
                                                                                    torch.randn(N, L, E, dtype=DT))])


# ---------------------------------------------------------------------------------------------
# kfac_quality
# ---------------------------------------------------------------------------------------------
def test_kfac_quality_numbers_are_computed():
    model, loss_func, X, y = problem(12, ce=False, mlp=False, readout=False)
    q = ba.kfac_quality(model, loss_func, model.attn, (X, y))
    G = exact_ggn(model, loss_func, X, y)
    for (block, head), errs in q.errors.items():
        assert set(errs) >= {"attention", "expand", "ekfac"}
        if block == "layer":
            continue
        # the best single Kronecker product is a lower bound for any one Kronecker product
        assert errs["best_kronecker"] <= errs["expand"] + 1e-12
        if head is not None:
            assert errs["best_kronecker"] <= errs["attention"] + 1e-12
    for h in range(H):  # one layer, MSE: the attention recipe is exact on V and O
        assert q.errors[("W_V", h)]["attention"] < 1e-10 and q.errors[("W_O", h)]["attention"] < 1e-10
    # an independent recomputation of one entry
    idx = ba.param_index(model.attn, "W_K", 1)
    params = list(model.attn.parameters())
    K = ba.AttentionKFACLinearOperator(model, loss_func, params, [(X, y)], kfac_approx="expand",
                                       separate_weight_and_bias=False)
    D = dense(K, G.shape[0])
    assert q.errors[("W_K", 1)]["expand"] == pytest.approx(rel(D[idx][:, idx], G[idx][:, idx]), rel=1e-10)
    assert all(0.0 <= a <= 180.0 for a in q.angles.values())
    assert "| W_V | 0 |" in q.table()


def test_layer_without_curvature_gets_finite_factors():
    """A layer whose output does not reach the loss has trace weights summing to 0: its data side
    is not divided by that 0 (no NaN), and its blocks are exactly zero."""

    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = ba.MultiheadSelfAttention(4, 2, causal=True, dtype=torch.float64)
            self.out = nn.Linear(4, 3, dtype=torch.float64)

        def forward(self, x):
            return self.out(x + 0.0 * self.attn(x)).transpose(1, 2)  # [N, C, L] for CE

    torch.manual_seed(0)
    model = Dead()
    data = [(torch.randn(2, 5, 4, dtype=torch.float64), torch.randint(0, 3, (2, 5)))]
    params = list(model.attn.parameters())
    K = ba.AttentionKFACLinearOperator(model, nn.CrossEntropyLoss(), params, data, kfac_approx="attention",
                                       check_deterministic=False)
    K.compute_kronecker_factors()
    for b in K._blocks:
        assert torch.isfinite(b.in_factor).all() and torch.isfinite(b.out_factor).all(), b.name
    v = torch.randn(K.shape[1], dtype=torch.float64)
    assert (K @ v).abs().max() == 0
    assert torch.isfinite(K.inverse(damping=1e-2) @ v).all()
