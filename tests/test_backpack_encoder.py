"""BackPACK on PyTorch's own encoder layers, against references on the unconverted model.

The models are what users write: ``nn.Embedding -> nn.TransformerEncoder(nn.TransformerEncoderLayer,
pre- or post-LN, ReLU or GELU) -> mean pooling (``h.mean(1)``) or CLS token (``h[:, 0]``) ->
nn.Linear``, optionally with a ``src_key_padding_mask``. ``ba.extend(model, use_converter=True)``
replaces the encoder layers by traceable drop-ins and the readouts by modules. References run on
the original model (``nn.MultiheadAttention``, math SDPA kernel, no fast path): per-sample
gradients and the exact GGN by ``torch.func.jacrev``, Hessian diagonals by double backward (right
through LayerNorm), KFLR by curvlinops' type-2 KFAC on the same network with ``nn.Linear``
projections. float64 throughout.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from backpack import backpack
from curvlinops import KFACLinearOperator
from torch import nn
from torch.func import functional_call, hessian, jacrev

import backpack_attention as ba
import backpack_attention.extensions as E
from backpack.custom_module.slicing import Slicing
from backpack_attention.backpack_ext import extend
from backpack_attention.backpack_ext.encoder import Encoder, EncoderLayer, TokenMean, convert_encoders
from reference import OneHotEmbedding, dense_hessian_double_backward, rel_error

DT = torch.float64
# batch, length, vocabulary, classes, width, heads, feed-forward width
N, L, V, C, D, HEADS, FF = 3, 5, 6, 3, 6, 2, 8
RTOL = 1e-10


class Classifier(nn.Module):
    """Embedding -> nn.TransformerEncoder (2 layers) -> mean pooling or CLS token -> Linear."""

    def __init__(self, norm_first: bool, readout: str, activation: str):
        super().__init__()
        self.embed = nn.Embedding(V, D, dtype=DT)
        layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, activation=activation, batch_first=True,
                                           norm_first=norm_first, dtype=DT)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(D, dtype=DT) if norm_first else None,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(D, C, dtype=DT)
        self.readout = readout

    def forward(self, X, key_padding_mask=None):
        h = self.encoder(self.embed(X), src_key_padding_mask=key_padding_mask)
        h = h.mean(1) if self.readout == "mean" else h[:, 0]
        return self.head(h)


class WithMask(nn.Module):
    """``model(X, kpm)`` as a one-input model (for the references' helpers)."""

    def __init__(self, model, kpm):
        super().__init__()
        self.model, self.kpm = model, kpm

    def forward(self, X):
        return self.model(X, self.kpm)


class PackedLinearAttention(nn.Module):
    """``nn.MultiheadAttention``'s computation from ``nn.Linear`` in/out projections (what curvlinops'
    KFAC sees); same call signature and outputs."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        e = mha.embed_dim
        self.num_heads, self.batch_first = mha.num_heads, True
        self.in_proj = nn.Linear(e, 3 * e, dtype=DT)
        self.out_proj = nn.Linear(e, e, dtype=DT)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            self.in_proj.bias.copy_(mha.in_proj_bias)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, q, k, v, attn_mask=None, key_padding_mask=None, need_weights=False, is_causal=False):
        n, l, e = q.shape
        h = self.num_heads
        d = e // h
        Q, K, Vv = (t.reshape(n, l, h, d).transpose(1, 2) for t in self.in_proj(q).split(e, -1))
        s = Q @ K.transpose(-1, -2) / math.sqrt(d)
        if key_padding_mask is not None:
            m = key_padding_mask[:, None, None, :]
            s = s.masked_fill(m, float("-inf")) if m.dtype == torch.bool else s + m
        z = (s.softmax(-1) @ Vv).transpose(1, 2).reshape(n, l, e)
        return self.out_proj(z), None


class Problem:
    """A classifier with non-trivial parameters, data, and cached references."""

    def __init__(self, norm_first, readout, activation, padding, seed=0):
        torch.manual_seed(seed)
        self.model = Classifier(norm_first, readout, activation)
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        self.X = torch.randint(1, V, (N, L))
        self.X[:, 0] = 0  # the CLS token
        self.y = torch.randint(0, C, (N,))
        self.kpm = None
        if padding:
            self.kpm = torch.zeros(N, L, dtype=torch.bool)
            self.kpm[0, -1] = True
            self.kpm[2, -2:] = True
        self.params = {n: p.detach() for n, p in self.model.named_parameters()}
        self.names = list(self.params)
        self._cache = {}

    def run(self, *exts):
        """Run ``exts`` on an extended copy; parameters by their names in the original model."""
        model = copy.deepcopy(self.model)
        name_of = {id(p): n for n, p in model.named_parameters()}
        model = extend(model, use_converter=True)
        assert {id(p) for p in model.parameters()} == set(name_of)  # the same Parameter objects
        loss_func = extend(nn.CrossEntropyLoss())
        with backpack(*exts):
            loss_func(model(self.X, self.kpm), self.y).backward()
        return {name_of[id(p)]: p for p in model.parameters()}

    # ---- references (the original model, torch's own attention) ---------------------------------
    def logits(self, params):
        with ba.torch_math_attention():
            return functional_call(self.model, params, (self.X, self.kpm))

    def grad_batch(self):
        if "gb" not in self._cache:
            def per_sample_losses(params):
                return F.cross_entropy(self.logits(params), self.y, reduction="none") / N

            self._cache["gb"] = jacrev(per_sample_losses)(self.params)
        return self._cache["gb"]

    def ggn(self):
        """Per-sample GGNs ``[N, P, P]`` (parameters flattened in ``names`` order)."""
        if "ggn" not in self._cache:
            J = jacrev(self.logits)(self.params)
            Jn = torch.cat([J[n].reshape(N, C, -1) for n in self.names], dim=-1)
            z = self.logits(self.params).detach()
            Hz = hessian(lambda o: F.cross_entropy(o, self.y))(z)  # [N, C, N, C]
            Hn = torch.stack([Hz[n, :, n] for n in range(N)])
            self._cache["ggn"] = torch.einsum("nap,nab,nbq->npq", Jn, Hn, Jn)
        return self._cache["ggn"]

    def split(self, flat):
        out, i = {}, 0
        for n in self.names:
            k = self.params[n].numel()
            out[n] = flat[..., i:i + k].reshape(*flat.shape[:-1], *self.params[n].shape)
            i += k
        return out

    def offsets(self):
        out, i = {}, 0
        for n in self.names:
            out[n] = (i, i + self.params[n].numel())
            i = out[n][1]
        return out

    def hessian_diag_batch(self):
        """Per-sample Hessian diagonals by double backward (sum: the batch Hessian's)."""
        if "h" not in self._cache:
            params = list(self.model.parameters())
            diags = []
            with ba.torch_math_attention():
                for n in range(N):
                    kpm = None if self.kpm is None else self.kpm[n:n + 1]
                    H = dense_hessian_double_backward(WithMask(self.model, kpm), nn.CrossEntropyLoss(), params,
                                                      [(self.X[n:n + 1], self.y[n:n + 1])], num_data=N, chunk=1024)
                    diags.append(H.diagonal())
            self._cache["h"] = self.split(torch.stack(diags))
        return self._cache["h"]

    def curvlinops_kfac(self):
        """``({twin parameter name: dense type-2 KFAC block}, name map twin -> original)``."""
        twin = copy.deepcopy(self.model)
        twin.embed = OneHotEmbedding(twin.embed)
        for layer in twin.encoder.layers:
            layer.self_attn = PackedLinearAttention(layer.self_attn)
        wrapped = WithMask(twin, self.kpm)
        named = [(n, p) for n, p in wrapped.named_parameters()
                 if isinstance(wrapped.get_submodule(n.rpartition(".")[0]), nn.Linear)]
        with ba.torch_math_attention():
            K = KFACLinearOperator(wrapped, nn.CrossEntropyLoss(), [p for _, p in named], [(self.X, self.y)],
                                   fisher_type="type-2", kfac_approx="expand", check_deterministic=False)
            dense = K @ torch.eye(sum(p.numel() for _, p in named), dtype=DT)
        blocks, i = {}, 0
        for n, p in named:
            blocks[n] = dense[i:i + p.numel(), i:i + p.numel()]
            i += p.numel()
        return blocks


CONFIGS = [(True, "mean", "gelu", False), (True, "cls", "gelu", True),
           (False, "mean", "relu", True), (False, "cls", "relu", False)]
IDS = ["preLN-mean", "preLN-cls-padding", "postLN-mean-padding", "postLN-cls"]
_PROBLEMS = {}


def problem(config) -> Problem:
    if config not in _PROBLEMS:
        _PROBLEMS[config] = Problem(*config)
    return _PROBLEMS[config]


configs = pytest.mark.parametrize("config", CONFIGS, ids=IDS)


# ---- conversion ----------------------------------------------------------------------------------
@configs
def test_converted_model_is_the_same_network(config):
    P = problem(config)
    original = P.model
    keys = set(original.state_dict())
    with ba.torch_math_attention():
        ref = original(P.X, P.kpm)
    for use_converter in (False, True):
        model = copy.deepcopy(original)
        order = [id(p) for p in model.parameters()]
        ext = extend(model, use_converter=use_converter)
        if use_converter:
            kinds = {type(m) for m in ext.modules()}
            assert (TokenMean if P.model.readout == "mean" else Slicing) in kinds
            assert not kinds & {nn.TransformerEncoderLayer, nn.TransformerEncoder, EncoderLayer, Encoder}
            assert sorted(id(p) for p in ext.parameters()) == sorted(order)
        else:
            assert isinstance(ext.encoder, Encoder) and all(isinstance(m, EncoderLayer) for m in ext.encoder.layers)
            assert [id(p) for p in ext.parameters()] == order  # same objects, same order (optimizers)
        assert set(ext.state_dict()) == keys
        assert rel_error(ext(P.X, P.kpm), ref) < 1e-12


def test_convert_encoders_keeps_children_and_checkpoints():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True, dtype=DT)
    state = copy.deepcopy(layer.state_dict())
    children = dict(layer.named_children())
    ba.convert_attention(layer)
    new = convert_encoders(layer)
    assert isinstance(new, EncoderLayer) and isinstance(new.activation, nn.ReLU)
    for name in ("self_attn", "linear1", "linear2", "norm1", "norm2", "dropout", "dropout1", "dropout2"):
        assert getattr(new, name) is (layer.self_attn if name == "self_attn" else children[name])
    new.load_state_dict(state)  # torch's keys
    assert convert_encoders(new) is new


# ---- extensions against the references -----------------------------------------------------------
@configs
def test_first_order(config):
    P = problem(config)
    params = P.run(E.BatchGrad(), E.BatchL2Grad(), E.SumGradSquared(), E.Variance())
    gb = P.grad_batch()
    for n in P.names:
        p, g = params[n], gb[n]
        assert rel_error(p.grad_batch, g) < RTOL, n
        assert rel_error(p.batch_l2, (g**2).flatten(1).sum(1)) < RTOL, n
        assert rel_error(p.sum_grad_squared, (g**2).sum(0)) < RTOL, n
        assert torch.allclose(p.variance, g.pow(2).mean(0) - g.mean(0).pow(2), rtol=1e-8, atol=1e-14), n
        assert rel_error(p.grad, g.sum(0)) < RTOL, n


@configs
def test_diag_ggn_exact_and_sqrt_ggn_exact(config):
    P = problem(config)
    params = P.run(E.DiagGGNExact(), E.BatchDiagGGNExact(), E.SqrtGGNExact())
    G = P.ggn()
    diag = P.split(G.sum(0).diagonal())
    diag_batch = P.split(torch.diagonal(G, dim1=1, dim2=2))
    for n in P.names:
        assert rel_error(params[n].diag_ggn_exact, diag[n]) < RTOL, n
        assert rel_error(params[n].diag_ggn_exact_batch, diag_batch[n]) < RTOL, n
    S = torch.cat([params[n].sqrt_ggn_exact.flatten(2) for n in P.names], dim=-1)  # [C, N, P]
    assert rel_error(torch.einsum("vnp,vnq->pq", S, S), G.sum(0)) < RTOL


@configs
def test_diag_hessian(config):
    P = problem(config)
    params = P.run(E.DiagHessian(), E.BatchDiagHessian())
    Hb = P.hessian_diag_batch()
    for n in P.names:
        assert rel_error(params[n].diag_h, Hb[n].sum(0)) < RTOL, n
        assert rel_error(params[n].diag_h_batch, Hb[n]) < RTOL, n
    G = P.split(P.ggn().sum(0).diagonal())
    assert max(rel_error(Hb[n].sum(0), G[n]) for n in P.names) > 1e-3  # the residual terms matter


def _original_name(twin_name: str) -> str:
    return (twin_name.removeprefix("model.").replace("embed.lin.weight", "embed.weight")
            .replace("self_attn.in_proj.weight", "self_attn.in_proj_weight")
            .replace("self_attn.in_proj.bias", "self_attn.in_proj_bias"))


@configs
def test_kflr_matches_curvlinops_and_kfac_shares_its_input_factors(config):
    P = problem(config)
    kflr = P.run(E.KFLR())
    ref = P.curvlinops_kfac()
    compared = set()
    for twin_name, block in ref.items():
        n = _original_name(twin_name)
        factors = kflr[n].kflr
        if n == "embed.weight":  # [A (V x V), G (D x D)] of the transposed weight
            ours = torch.kron(factors[0], factors[1]).reshape(V, D, V, D).permute(1, 0, 3, 2).reshape(V * D, V * D)
        else:
            ours = factors[0] if len(factors) == 1 else torch.kron(factors[0], factors[1])
        assert rel_error(ours, block) < RTOL, n
        compared.add(n)
    G, off = P.ggn().sum(0), P.offsets()
    for n in P.names:
        if "norm" in n:  # LayerNorm: its exact GGN block
            (block,) = kflr[n].kflr
            a, b = off[n]
            assert rel_error(block, G[a:b, a:b]) < RTOL, n
            compared.add(n)
    assert compared == set(P.names)
    torch.manual_seed(1)
    kfac = P.run(E.KFAC(mc_samples=2))
    for n in P.names:
        assert [f.shape for f in kfac[n].kfac] == [f.shape for f in kflr[n].kflr], n
        k = 0 if n == "embed.weight" else (1 if len(kflr[n].kflr) == 2 else None)
        if k is not None:  # the input factor is deterministic
            assert rel_error(kfac[n].kfac[k], kflr[n].kflr[k]) < 1e-12, n


def test_mc_extensions():
    """DiagGGNMC, BatchDiagGGNMC, SqrtGGNMC: shapes, and convergence to the exact GGN."""
    P = problem(CONFIGS[1])
    torch.manual_seed(2)
    M = 2000
    params = P.run(E.DiagGGNMC(mc_samples=M), E.BatchDiagGGNMC(mc_samples=M), E.SqrtGGNMC(mc_samples=M))
    for n in P.names:
        shape = P.params[n].shape
        assert params[n].diag_ggn_mc.shape == shape
        assert params[n].diag_ggn_mc_batch.shape == (N, *shape)
        assert params[n].sqrt_ggn_mc.shape == (M, N, *shape)
    G = P.ggn()
    flat = lambda f: torch.cat([f(n).reshape(-1) for n in P.names])  # noqa: E731
    assert rel_error(flat(lambda n: params[n].diag_ggn_mc), G.sum(0).diagonal()) < 0.1  # ~2-3% expected
    exact_b = torch.cat([d.flatten(1) for d in P.split(torch.diagonal(G, dim1=1, dim2=2)).values()], 1)
    mc_b = torch.cat([params[n].diag_ggn_mc_batch.flatten(1) for n in P.names], 1)
    assert rel_error(mc_b, exact_b) < 0.1
    S = torch.cat([params[n].sqrt_ggn_mc.flatten(2) for n in P.names], -1)
    assert rel_error(torch.einsum("vnp,vnq->pq", S, S), G.sum(0)) < 0.15


# ---- readouts written as modules or other spellings ----------------------------------------------
class MeanPool(nn.Module):
    def forward(self, x):
        return x.mean(dim=-2)


class FirstToken(nn.Module):
    def forward(self, x):
        return x[:, 0, :]


@pytest.mark.parametrize("pool", [MeanPool, FirstToken])
def test_sequential_classifier(pool):
    """nn.Sequential(Embedding, nn.TransformerEncoderLayer, <readout module>, Linear)."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Embedding(V, D, dtype=DT),
        nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True, norm_first=True,
                                   activation=nn.GELU(), dtype=DT),
        pool(),
        nn.Linear(D, C, dtype=DT),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    X, y = torch.randint(0, V, (N, L)), torch.randint(0, C, (N,))
    bp = copy.deepcopy(model)
    name_of = {id(p): n for n, p in bp.named_parameters()}
    bp = extend(bp, use_converter=True)
    assert (TokenMean if pool is MeanPool else Slicing) in {type(m) for m in bp.modules()}
    with backpack(E.DiagGGNExact(), E.BatchGrad()):
        extend(nn.CrossEntropyLoss())(bp(X), y).backward()
    ours = {name_of[id(p)]: p for p in bp.parameters()}
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    with ba.torch_math_attention():
        J = jacrev(lambda ps: functional_call(model, ps, (X,)))(params)
        z = model(X).detach()
        gb = jacrev(lambda ps: F.cross_entropy(functional_call(model, ps, (X,)), y, reduction="none") / N)(params)
    Jn = torch.cat([J[n].reshape(N, C, -1) for n in names], -1)
    Hz = hessian(lambda o: F.cross_entropy(o, y))(z)
    G = sum(Jn[n].T @ Hz[n, :, n] @ Jn[n] for n in range(N))
    assert sorted(ours) == sorted(names)
    assert rel_error(torch.cat([ours[n].diag_ggn_exact.reshape(-1) for n in names]), G.diagonal()) < RTOL
    for n in names:
        assert rel_error(ours[n].grad_batch, gb[n]) < RTOL, n


@pytest.mark.filterwarnings("ignore:Encountered node that may break:UserWarning")
def test_readouts_to_modules_rewrites_only_what_it_can():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, D, dtype=DT)

        def forward(self, x):
            h = self.lin(x)
            return torch.mean(h, dim=1) + h[:, 0, :] + h[:, -1] + h.mean(1, keepdim=True).squeeze(1)

    net = Net()
    bp = extend(copy.deepcopy(net), use_converter=True)
    kinds = [type(m) for m in bp.modules()]
    assert kinds.count(TokenMean) == 1 and kinds.count(Slicing) == 2  # the keepdim mean stays an op
    x = torch.randn(N, L, D, dtype=DT)
    assert rel_error(bp(x), net(x)) < 1e-14


# ---- refusals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("readout,module", [("mean", "TokenMean"), ("cls", "Slicing")])
def test_unsupported_extension_names_module_and_extension(readout, module):
    P = problem(CONFIGS[0] if readout == "mean" else CONFIGS[3])
    with pytest.raises(NotImplementedError, match=rf"KFRA.*{module}"):
        P.run(E.KFRA())


@pytest.mark.parametrize("kwargs,match", [
    ({"dropout": 0.1}, r"dropout"),
    ({"batch_first": False}, r"batch_first=False"),
    ({"activation": F.silu}, r"activation: 'silu'"),
])
def test_bad_layers_are_refused_before_any_change(kwargs, match):
    kw = dict(dropout=0.0, batch_first=True, dtype=DT)
    kw.update(kwargs)
    model = nn.Sequential(nn.TransformerEncoderLayer(D, HEADS, FF, **kw), nn.Linear(D, C, dtype=DT))
    attn = model[0].self_attn
    with pytest.raises(ValueError, match=match) as info:
        extend(model, use_converter=True)
    assert str(info.value).startswith("0")  # names the layer
    assert type(model[0]) is nn.TransformerEncoderLayer and model[0].self_attn is attn


# ---- documentation -------------------------------------------------------------------------------
def test_docs_snippet_runs():
    text = (Path(__file__).resolve().parents[1] / "docs" / "backpack.md").read_text()
    section = text.split("## PyTorch's encoder layers", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace = {}
    exec(compile(block, "docs/backpack.md", "exec"), namespace)
    assert all(hasattr(p, "diag_ggn_exact") for p in namespace["model"].parameters())


def test_stock_backpack_extend_before_ours():
    """A converted model that stock ``backpack.extend`` saw first (as laplace-torch's BackPACK backends
    re-extend models) gives the same BackPACK quantities as one extended by ``ba.extend`` only: the
    adapter is never hooked itself, only its inner attention."""
    import backpack as stock

    def make():
        torch.manual_seed(0)
        clf = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, dtype=DT),
                            nn.Flatten(), nn.Linear(4 * 8, 3, dtype=DT))
        return ba.convert_attention(clf)

    x = torch.randn(6, 4, 8, dtype=DT, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(2))
    results = []
    for stock_first in (False, True):
        clf = make()
        if stock_first:
            stock.extend(clf)
        model = ba.extend(clf, use_converter=True)
        loss_func = ba.extend(nn.CrossEntropyLoss())
        with backpack(ba.extensions.DiagGGNExact(), ba.extensions.BatchGrad()):
            loss_func(model(x), y).backward()
        results.append([t for p in model.parameters() for t in (p.diag_ggn_exact, p.grad_batch)])
    assert len(results[0]) == len(results[1]) > 0
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
