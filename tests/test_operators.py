"""AttentionGGNLinearOperator / AttentionHessianLinearOperator against curvlinops (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import eigsh
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from backpack_attention import MultiheadSelfAttention, param_index
from backpack_attention._compat import (
    LanczosApproximateSpectrumCached,
    SubmatrixLinearOperator,
    curvlinops_operator,
    hutchinson_diag,
    hutchinson_trace,
    xtrace,
)
from backpack_attention.models import addition_data
from backpack_attention.operators import PARTS, AttentionGGNLinearOperator, AttentionHessianLinearOperator
from cases import addition_model
from reference import rel_error

DT = torch.float64
TOL = 1e-10


class PaddedNet(nn.Module):
    """Two non-causal attention layers that get a key-padding mask (token 0 = padding), MLP between."""

    def __init__(self, vocab=7, d=8, heads=2, length=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, d, dtype=DT)
        self.pos = nn.Embedding(length, d, dtype=DT)
        self.attn1 = MultiheadSelfAttention(d, heads, dtype=DT)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d, dtype=DT), nn.Tanh(), nn.Linear(2 * d, d, dtype=DT))
        self.attn2 = MultiheadSelfAttention(d, heads, dtype=DT)
        self.head = nn.Linear(d, 3, dtype=DT)

    def forward(self, X):
        kpm = X == 0
        h = self.embed(X) + self.pos(torch.arange(X.shape[1]))
        h = h + self.attn1(h, kpm)
        h = h + self.mlp(h)
        h = h + self.attn2(h, key_padding_mask=kpm)
        return self.head(h).transpose(1, 2)  # [N, C, L] for token-level CE


class FloatNet(nn.Module):
    """Float inputs [N, L, E], one attention layer with a float attn_mask, MSE-ready output."""

    def __init__(self, d=8, heads=2, length=5):
        super().__init__()
        self.attn = MultiheadSelfAttention(d, heads, dtype=DT)
        mask = torch.zeros(length, length, dtype=DT)
        mask[0, 3:] = float("-inf")
        mask[2, 0] = float("-inf")
        self.register_buffer("mask", mask)
        self.out = nn.Linear(d, 2, dtype=DT)

    def forward(self, x):
        return self.out(torch.tanh(self.attn(x, attn_mask=self.mask)))


class SharedNet(nn.Module):
    """One causal attention layer applied twice (weight sharing), an MLP in between."""

    def __init__(self, vocab=6, d=8, heads=2, length=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, d, dtype=DT)
        self.pos = nn.Embedding(length, d, dtype=DT)
        self.attn = MultiheadSelfAttention(d, heads, causal=True, dtype=DT)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d, dtype=DT), nn.GELU(), nn.Linear(2 * d, d, dtype=DT))
        self.head = nn.Linear(d, vocab, dtype=DT)

    def forward(self, X):
        h = self.embed(X) + self.pos(torch.arange(X.shape[1]))
        h = h + self.attn(h)
        h = h + self.mlp(h)
        h = h + self.attn(h)
        return self.head(h).transpose(1, 2)


def _tiny(seed=0, **kw):
    # non-trivial LayerNorm affine params and biases
    return addition_model(seed, norm="pre", perturb_scale=0.3, **kw)


def _problem(name):
    """``(model, loss_func, data)``; data has two batches of unequal size."""
    if name == "ce":
        model = _tiny()
        X, y = addition_data(7, seed=3)
        return model, nn.CrossEntropyLoss(), [(X[:4], y[:4]), (X[4:], y[4:])]
    if name == "mse":
        model = _tiny(seed=1)
        X, _ = addition_data(5, seed=4)
        y = torch.randn(5, 12, 6, dtype=DT, generator=torch.Generator().manual_seed(0))
        return model, nn.MSELoss(), [(X[:3], y[:3]), (X[3:], y[3:])]
    if name == "padded":
        torch.manual_seed(2)
        model = PaddedNet()
        X = torch.randint(1, 7, (5, 6))
        X[1, 4:] = 0
        X[3, 2:] = 0
        y = torch.randint(0, 3, (5, 6))
        return model, nn.CrossEntropyLoss(), [(X[:2], y[:2]), (X[2:], y[2:])]
    if name == "float_sum":
        torch.manual_seed(3)
        model = FloatNet()
        X = torch.randn(4, 5, 8, dtype=DT)
        y = torch.randn(4, 5, 2, dtype=DT)
        return model, nn.MSELoss(reduction="sum"), [(X[:2], y[:2]), (X[2:], y[2:])]
    if name == "shared":
        torch.manual_seed(4)
        model = SharedNet()
        X = torch.randint(0, 6, (5, 5))
        y = torch.randint(0, 6, (5, 5))
        return model, nn.CrossEntropyLoss(reduction="sum"), [(X[:2], y[:2]), (X[2:], y[2:])]
    raise KeyError(name)


def _attn_params(model):
    return [p for m in model.modules() if isinstance(m, MultiheadSelfAttention) for p in m.parameters()]


def _subsets(model):
    ps = _attn_params(model)
    per = len(ps) // 2 if len(ps) >= 8 else len(ps)
    yield "all", ps
    if len(ps) >= 8:
        # layer-2 in_proj_weight before layer-1 out_proj_bias and in_proj_bias: cross-layer, unordered
        yield "cross", [ps[per], ps[3], ps[1]]
    yield "one", [ps[-2]]



def _reference(kind, model, loss_func, params, data, V):
    with sdpa_kernel(SDPBackend.MATH):
        op = curvlinops_operator(kind, model, loss_func, params, data, check_deterministic=False)
        return op @ V


@pytest.mark.parametrize("problem", ["ce", "mse", "padded", "float_sum", "shared"])
def test_parts_match_curvlinops(problem):
    model, loss_func, data = _problem(problem)
    for label, params in _subsets(model):
        P = sum(p.numel() for p in params)
        V = torch.randn(P, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
        G_ref = _reference("ggn", model, loss_func, params, data, V)
        H_ref = _reference("hessian", model, loss_func, params, data, V)
        assert G_ref.norm() > 0 and H_ref.norm() > 0
        G = AttentionGGNLinearOperator(model, loss_func, params, data)
        assert rel_error(G @ V, G_ref) < TOL, (problem, label)
        for part, ref in [("full", H_ref), ("outer", G_ref), ("functional", H_ref - G_ref)]:
            op = AttentionHessianLinearOperator(model, loss_func, params, data, part=part)
            assert rel_error(op @ V, ref, scale=H_ref.norm()) < TOL, (problem, label, part)


def test_fused_equals_math_and_input_formats():
    model, loss_func, data = _problem("padded")
    params = _attn_params(model)
    v_list = [torch.randn_like(p) for p in params]
    v_flat = torch.cat([v.flatten() for v in v_list])
    for part in ("full", "functional"):
        op = AttentionHessianLinearOperator(model, loss_func, params, data, part=part)
        fused = op @ v_flat
        op.clear_cache()
        with sdpa_kernel(SDPBackend.MATH):
            math_ = op @ v_flat
        assert rel_error(fused, math_) < TOL
        # tensor-list vector, tensor-list matrix, flat matrix
        as_list = op @ v_list
        assert [a.shape for a in as_list] == [p.shape for p in params]
        assert rel_error(torch.cat([a.flatten() for a in as_list]), fused) < TOL
        M_list = [torch.stack([v, 2 * v], dim=-1) for v in v_list]
        out = op @ M_list
        assert all(o.shape == (*p.shape, 2) for o, p in zip(out, params))
        assert rel_error(torch.cat([o[..., 1].flatten() for o in out]), 2 * fused) < TOL
        assert rel_error((op @ torch.stack([v_flat, -v_flat], 1))[:, 1], -fused) < TOL


def _dense(op):
    return op @ torch.eye(op.shape[1], dtype=DT)


def test_eigsh_matches_dense():
    model, loss_func, data = _problem("ce")
    ps = _attn_params(model)
    params = [ps[4 + 2], ps[1]]  # layer-2 out_proj_weight, layer-1 in_proj_bias
    for part in ("full", "functional"):
        op = AttentionHessianLinearOperator(model, loss_func, params, data, part=part)
        D = _dense(op)
        assert torch.allclose(D, D.T, atol=1e-12)
        ev = np.linalg.eigvalsh(D.numpy())
        v0 = np.ones(op.shape[0])
        for which, ref in (("LA", ev[-3:]), ("SA", ev[:3])):
            got = eigsh(op.to_scipy(), k=3, which=which, v0=v0, tol=1e-12, return_eigenvectors=False)
            np.testing.assert_allclose(np.sort(got), np.sort(ref), rtol=1e-8, atol=1e-12)
        if part == "functional":
            assert ev[0] < 0 < ev[-1]  # indefinite


def test_estimators_spectrum_and_submatrix():
    model, loss_func, data = _problem("ce")
    layers = model.attention_layers()
    params = list(layers[0].parameters()) + list(layers[1].parameters())
    G = AttentionGGNLinearOperator(model, loss_func, params, data)
    # block view via param_index, offset by the first layer's size for the second layer
    offset = sum(p.numel() for p in layers[0].parameters())
    idx = (offset + param_index(layers[1], "W_Q", head=1)).tolist()
    sub = SubmatrixLinearOperator(G, idx, idx)
    D_sub = _dense(sub)
    small = [layers[1].in_proj_weight]
    D_block = _dense(AttentionGGNLinearOperator(model, loss_func, small, data))
    local = param_index(layers[1], "W_Q", head=1).tolist()
    assert rel_error(D_sub, D_block[local][:, local]) < TOL
    # trace and diagonal estimators on the one-layer block (exact values from its dense matrix)
    trace = torch.trace(D_block).item()
    G1 = AttentionGGNLinearOperator(model, loss_func, small, data)
    torch.manual_seed(0)
    assert abs(xtrace(G1, 120) - trace) < 0.3 * abs(trace)
    assert abs(hutchinson_trace(G1, 120) - trace) < 0.5 * abs(trace)
    diag = hutchinson_diag(G1, 40)
    assert diag.shape == (G1.shape[0],) and torch.isfinite(torch.as_tensor(diag)).all()
    # Lanczos spectral density of the (indefinite) Hessian block
    H1 = AttentionHessianLinearOperator(model, loss_func, small, data)
    ev = torch.linalg.eigvalsh(_dense(H1))
    lam = LanczosApproximateSpectrumCached(H1, ncv=30, boundaries=(ev[0].item(), ev[-1].item()))
    grid, density = lam.approximate_spectrum(num_repeats=2, num_points=200, kappa=3)
    assert abs(np.trapezoid(density, grid) - 1) < 0.05


def test_bad_inputs_raise_before_work():
    model, loss_func, data = _problem("ce")
    ps = _attn_params(model)

    class Exploding:
        def __iter__(self):
            raise AssertionError("data was touched")

    stranger = nn.Parameter(torch.zeros(3, 2, dtype=DT))
    with pytest.raises(ValueError, match=r"params\[1\] \(a tensor of shape \[3, 2\]\) is not a parameter of the model"):
        AttentionGGNLinearOperator(model, loss_func, [ps[0], stranger], Exploding())
    with pytest.raises(ValueError, match="params is empty"):
        AttentionGGNLinearOperator(model, loss_func, [], Exploding())
    with pytest.raises(ValueError, match="part must be one of"):
        AttentionHessianLinearOperator(model, loss_func, ps, Exploding(), part="diag")
    with pytest.raises(ValueError, match="reduction"):
        AttentionGGNLinearOperator(model, nn.CrossEntropyLoss(reduction="none"), ps, Exploding())
    with pytest.raises(ValueError, match="data is empty"):
        AttentionGGNLinearOperator(model, loss_func, ps, [])
    with pytest.raises(ValueError, match="more than once"):
        AttentionGGNLinearOperator(model, loss_func, [ps[0], ps[0]], Exploding())
    fmodel, floss, fdata = _problem("float_sum")
    bad = [(X.float(), y) for X, y in fdata]
    with pytest.raises(ValueError, match="dtype"):
        AttentionGGNLinearOperator(fmodel, floss, _attn_params(fmodel), bad)


class _Noisy(nn.Module):
    """A random forward that is not a dropout module (only the determinism check can see it)."""

    def forward(self, x):
        return x + 0.1 * torch.randn_like(x)


def test_check_deterministic_catches_random_forward():
    torch.manual_seed(0)
    model = nn.Sequential(FloatNet(), _Noisy())
    X = torch.randn(4, 5, 8, dtype=DT)
    data = [(X, torch.randn(4, 5, 2, dtype=DT))]
    with pytest.raises(RuntimeError, match="deterministic"):
        AttentionGGNLinearOperator(model, nn.MSELoss(), _attn_params(model), data)


def test_active_dropout_is_named_before_any_work():
    model = nn.Sequential(FloatNet(), nn.Dropout(0.5)).train()

    class Exploding:
        def __iter__(self):
            raise AssertionError("data was touched")

    with pytest.raises(ValueError, match=r"dropout modules \['1'\] are active"):
        AttentionGGNLinearOperator(model, nn.MSELoss(), _attn_params(model), Exploding())


def test_linear_attention_no_bias_and_converted_mha():
    """Linear attention, bias=False and a converted nn.MultiheadAttention also match curvlinops."""
    from backpack_attention import convert_attention

    X, y = addition_data(6, seed=7)
    data = [(X[:3], y[:3]), (X[3:], y[3:])]
    for kw in (dict(attention="linear"), dict(bias=False)):
        model = _tiny(seed=4, **kw)
        params = _attn_params(model)
        V = torch.randn(sum(p.numel() for p in params), 2, dtype=DT, generator=torch.Generator().manual_seed(2))
        for kind, op in (("hessian", AttentionHessianLinearOperator), ("ggn", AttentionGGNLinearOperator)):
            ref = _reference(kind, model, nn.CrossEntropyLoss(), params, data, V)
            assert rel_error(op(model, nn.CrossEntropyLoss(), params, data) @ V, ref) < 1e-10, (kw, kind)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True, dtype=DT)
            self.out = nn.Linear(8, 3, dtype=DT)

        def forward(self, x):
            return self.out(self.mha(x, x, x, need_weights=False)[0]).transpose(1, 2)

    torch.manual_seed(5)
    net = Net().eval()
    data = [(torch.randn(4, 5, 8, dtype=DT), torch.randint(0, 3, (4, 5)))]
    params = [net.mha.in_proj_weight, net.mha.out_proj.weight]
    V = torch.randn(sum(p.numel() for p in params), dtype=DT, generator=torch.Generator().manual_seed(3))
    ref = _reference("hessian", net, nn.CrossEntropyLoss(), params, data, V)
    convert_attention(net)
    a = net.mha.attention
    got = AttentionHessianLinearOperator(net, nn.CrossEntropyLoss(), [a.in_proj_weight, a.out_proj_weight], data) @ V
    assert rel_error(got, ref) < TOL


@pytest.mark.parametrize("problem", ["ce", "padded"])
def test_equal_dense_hessian_blocks(problem):
    """Each layer's operator equals the closed-form blocks of hessian_blocks (all parts), on random columns."""
    from backpack_attention import hessian_blocks

    model, loss_func, data = _problem(problem)
    layers = [m for m in model.modules() if isinstance(m, MultiheadSelfAttention)]
    assert len(layers) == 2
    for layer in layers:
        params = list(layer.parameters())
        blocks = hessian_blocks(model, loss_func, layer, data)
        V = torch.randn(sum(p.numel() for p in params), 3, dtype=DT, generator=torch.Generator().manual_seed(5))
        HV = blocks.matrix("full") @ V
        for part in PARTS:
            op = AttentionHessianLinearOperator(model, loss_func, params, data, part=part)
            assert rel_error(op @ V, blocks.matrix(part) @ V, scale=HV.norm()) < TOL, (problem, part)
        G = AttentionGGNLinearOperator(model, loss_func, params, data)
        assert rel_error(G @ V, blocks.matrix("outer") @ V) < TOL


def test_frozen_params_and_flags_restored():
    """A selected parameter with requires_grad=False still works; the model's flags are left as they were."""
    model, loss_func, data = _problem("padded")
    params = _attn_params(model)
    model.mlp[0].weight.requires_grad_(False)
    params[0].requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    V = torch.randn(sum(p.numel() for p in params), 2, dtype=DT, generator=torch.Generator().manual_seed(2))
    G = AttentionGGNLinearOperator(model, loss_func, params, data) @ V
    H = AttentionHessianLinearOperator(model, loss_func, params, data) @ V
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    params[0].requires_grad_(True)  # curvlinops differentiates only parameters that require grad
    assert rel_error(G, _reference("ggn", model, loss_func, params, data, V)) < TOL
    assert rel_error(H, _reference("hessian", model, loss_func, params, data, V)) < TOL


def test_inference_mode_and_vector_dtype():
    """Operators built and applied under torch.inference_mode (data and vectors are then inference
    tensors) give the same products; a vector of another dtype is refused by name, harmlessly."""
    model, loss_func, data = _problem("padded")
    params = _attn_params(model)
    P = sum(p.numel() for p in params)
    V = torch.randn(P, 2, dtype=DT, generator=torch.Generator().manual_seed(5))
    G_ref = _reference("ggn", model, loss_func, params, data, V)
    H_ref = _reference("hessian", model, loss_func, params, data, V)
    with torch.inference_mode():
        data_inf = [(X.clone(), y.clone()) for X, y in data]
        V_inf = V.clone()
        assert V_inf.is_inference() and data_inf[0][0].is_inference()
        G = AttentionGGNLinearOperator(model, loss_func, params, data_inf)
        H = AttentionHessianLinearOperator(model, loss_func, params, data_inf)
        g, h = G @ V_inf, H @ V_inf
    assert rel_error(g, G_ref) < TOL and rel_error(h, H_ref) < TOL
    # another floating dtype is computed in the operator's and returned in the vector's (as curvlinops)
    g32 = G @ V.float()
    assert g32.dtype == torch.float32 and rel_error(g32.double(), G_ref) < 1e-6
    with pytest.raises(ValueError, match="dtype torch.int64"):
        G @ V.long()
    assert rel_error(G @ V, G_ref) < TOL


class DictNet(nn.Module):
    """PaddedNet behind a dict input ``{"tokens": X}`` (data with dict-like X needs batch_size_fn)."""

    def __init__(self):
        super().__init__()
        self.net = PaddedNet()

    def forward(self, X):
        return self.net(X["tokens"])


def test_streaming_chunked_columns_num_data_and_dict_inputs():
    """max_cached_batches (all, one, none cached), column_chunk (batched and single columns),
    an explicit num_data and dict-like X with batch_size_fn all give curvlinops' products."""
    model, loss_func, data = _problem("padded")  # 2 batches, mean reduction
    params = _attn_params(model)
    P = sum(p.numel() for p in params)
    V = torch.randn(P, 5, dtype=DT, generator=torch.Generator().manual_seed(6))
    G_ref = _reference("ggn", model, loss_func, params, data, V)
    H_ref = _reference("hessian", model, loss_func, params, data, V)
    for cached in (8, 1, 0):
        for chunk in (16, 2):  # 5 columns: one batched chunk, or chunks of 2, 2 and a single column
            kw = dict(max_cached_batches=cached, column_chunk=chunk)
            G = AttentionGGNLinearOperator(model, loss_func, params, data, **kw)
            H = AttentionHessianLinearOperator(model, loss_func, params, data, part="functional", **kw)
            for _ in range(2):  # the second round reuses whatever was cached
                assert rel_error(G @ V, G_ref) < TOL, (cached, chunk)
                assert rel_error(H @ V, H_ref - G_ref, scale=H_ref.norm()) < TOL, (cached, chunk)
    # num_data other than the number of data points rescales mean-reduced products as in curvlinops
    N = sum(X.shape[0] for X, _ in data)
    with sdpa_kernel(SDPBackend.MATH):
        ref = curvlinops_operator("ggn", model, loss_func, params, data, num_data=3 * N, check_deterministic=False) @ V
    G = AttentionGGNLinearOperator(model, loss_func, params, data, num_data=3 * N)
    assert rel_error(G @ V, ref) < TOL and rel_error(ref, G_ref / 3) < TOL
    # dict-like X
    dict_model = DictNet()
    dict_model.net.load_state_dict(model.state_dict())
    dict_data = [({"tokens": X}, y) for X, y in data]
    dict_params = _attn_params(dict_model)
    size = lambda X: X["tokens"].shape[0]  # noqa: E731
    with pytest.raises(ValueError, match="batch_size_fn"):
        AttentionGGNLinearOperator(dict_model, loss_func, dict_params, dict_data)
    G = AttentionGGNLinearOperator(dict_model, loss_func, dict_params, dict_data, batch_size_fn=size)
    assert rel_error(G @ V, G_ref) < TOL
