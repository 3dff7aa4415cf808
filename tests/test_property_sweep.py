"""Property-based sweep: random combinations against independent float64 autodiff references.

The other test files check each feature on a few hand-picked models; this one draws the
combinations at random (hypothesis): batch size N, length L (1 included), width E, heads (any
divisor of E), biases, causal masks, key padding masks (down to one key left per sequence, drawn
per batch), softmax or linear attention, depth, LayerNorm, the readout (none, per token, per
sequence), MSE or cross-entropy (``ignore_index``, label smoothing, class weights where the
product supports them), ``reduction``, one or two batches, the parameter subset and its order,
``column_chunk`` and ``max_cached_batches``. Each example checks, at 1e-10:

* ``AttentionGGNLinearOperator`` and ``AttentionHessianLinearOperator`` (every part) against the
  dense GGN (``jacrev``) and Hessian (double backward) of a twin whose attention is written in
  plain torch ops (docs/math.md, section 1.1);
* ``hessian_blocks`` (every part) and ``attention_factors`` (attention matrices, layer inputs);
* ``AttentionKFACLinearOperator(kfac_approx="expand"/"reduce")`` against curvlinops'
  ``KFACLinearOperator`` on the ``nn.Linear`` twin (softmax, MSE / plain cross-entropy);
* the BackPACK extensions ``BatchGrad``, ``DiagGGNExact``, ``BatchDiagGGNExact``,
  ``DiagHessian`` and ``BatchDiagHessian`` against per-sample references.

Key padding masks travel inside ``X`` (a last input channel, 1 = padded key), so each batch has its
own. The default suite runs a few derandomized (deterministic) examples per property;
``pytest -m slow tests/test_property_sweep.py`` runs many more.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch
from backpack import backpack
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, hessian, jacrev

import backpack_attention as ba
import backpack_attention.extensions as bext
from backpack_attention import (
    AttentionGGNLinearOperator,
    AttentionHessianLinearOperator,
    AttentionKFACLinearOperator,
    MultiheadSelfAttention,
)
from backpack_attention.models import LinearProjectionAttention
from reference import PlainAttention, dense_ggn, dense_hessian_double_backward, rel_error

with warnings.catch_warnings():
    warnings.filterwarnings("ignore")
    from curvlinops import KFACLinearOperator

# BackPACK's converter warns about non-module nodes; they carry no gradient
pytestmark = pytest.mark.filterwarnings("ignore:Encountered node that may break:UserWarning")

DT = torch.float64
TOL = 1e-10

# no explain phase: it writes patch files into the work tree
_COMMON = dict(deadline=None, database=None, print_blob=True, phases=[p for p in Phase if p != Phase.explain],
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
#: default suite: deterministic and bounded
FAST = settings(derandomize=True, **_COMMON)
#: ``-m slow``: random exploration, many examples
LONG = settings(derandomize=False, **_COMMON)


# ---------------------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    E: int
    H: int
    L: int
    bias: bool
    causal: bool
    attention: str  # "softmax" | "linear"
    depth: int  # attention layers
    pre: bool  # Linear + Tanh before the first attention
    norm: bool  # LayerNorm after the last attention
    head: str  # "none" (MSE on the attention output) | "token" | "sequence"
    C: int
    loss: str  # "mse" | "ce"
    reduction: str
    ignore_index: Optional[int]
    label_smoothing: float
    class_weights: bool
    sizes: Tuple[int, ...]  # batch sizes
    masks: Optional[Tuple]  # per batch, per sequence: padded-key flags; None: no padding mask
    seed: int


def _mask_row(draw, L, causal):
    pad = list(draw(st.lists(st.booleans(), min_size=L, max_size=L)))
    keep = 0 if causal else draw(st.integers(0, L - 1))  # causal: query 0 sees only key 0
    pad[keep] = False
    return tuple(pad)


@st.composite
def configs(draw, *, kinds=("softmax", "linear"), depths=(1, 2), norm=True, heads=("token", "none", "sequence"),
            ce_extras=True, class_weights=False, max_batches=2):
    E = draw(st.integers(1, 6))
    H = draw(st.sampled_from([h for h in range(1, E + 1) if E % h == 0]))
    L = draw(st.integers(1, 5))
    causal = draw(st.booleans())
    sizes = tuple(draw(st.integers(1, 3)) for _ in range(draw(st.integers(1, max_batches))))
    masks = None
    if draw(st.booleans()):
        masks = tuple(tuple(_mask_row(draw, L, causal) for _ in range(n)) for n in sizes)
    head = draw(st.sampled_from(heads))
    loss = "mse" if head == "none" else draw(st.sampled_from(["ce", "mse"]))
    ignore_index, smoothing, weights = None, 0.0, False
    if loss == "ce" and ce_extras:
        ignore_index = draw(st.sampled_from([None, -100, 1]))
        smoothing = draw(st.sampled_from([0.0, 0.1]))
        weights = class_weights and draw(st.booleans())
    return Config(E=E, H=H, L=L, bias=draw(st.booleans()), causal=causal, attention=draw(st.sampled_from(kinds)),
                  depth=draw(st.sampled_from(depths)), pre=draw(st.booleans()),
                  norm=norm and E > 1 and draw(st.booleans()),  # LayerNorm over one feature is constant
                  head=head, C=draw(st.integers(2, 3)), loss=loss,
                  reduction=draw(st.sampled_from(["mean", "sum"])), ignore_index=ignore_index,
                  label_smoothing=smoothing, class_weights=weights, sizes=sizes, masks=masks,
                  seed=draw(st.integers(0, 2**16)))


# ---------------------------------------------------------------------------------------------
# the model, its plain-torch twin, data and loss
# ---------------------------------------------------------------------------------------------
class SweepNet(nn.Module):
    """``[Linear, Tanh] -> attention [-> Tanh -> attention] [-> LayerNorm] -> readout``.

    ``masked_input``: ``X [N, L, E + 1]`` carries the key padding mask as its last channel;
    otherwise ``forward(x, kpm)`` takes it as an argument (BackPACK's converter traces that).
    """

    def __init__(self, cfg: Config, masked_input: bool):
        super().__init__()
        E, kw = cfg.E, dict(dtype=DT)
        self.masked_input = masked_input
        self.inp = nn.Linear(E, E, **kw) if cfg.pre else None
        # one module per use: BackPACK keeps one input per module
        self.act_in, self.act_mid, self.act_out = nn.Tanh(), nn.Tanh(), nn.Tanh()
        attn = lambda: MultiheadSelfAttention(E, cfg.H, bias=cfg.bias, causal=cfg.causal,  # noqa: E731
                                              attention=cfg.attention, **kw)
        self.attn1 = attn()
        self.attn2 = attn() if cfg.depth == 2 else None
        self.norm = nn.LayerNorm(E, **kw) if cfg.norm else None
        self.head, self.ce = cfg.head, cfg.loss == "ce"
        self.flat = nn.Flatten() if cfg.head == "sequence" else None
        width = cfg.L * E if cfg.head == "sequence" else E
        self.out = nn.Linear(width, cfg.C, **kw) if cfg.head != "none" else None

    def attention_layers(self):
        return [m for m in (self.attn1, self.attn2) if m is not None]

    def forward(self, x, kpm=None):
        if self.masked_input:
            kpm, x = x[..., -1] > 0.5, x[..., :-1]
        if self.inp is not None:
            x = self.act_in(self.inp(x))
        h = self.attn1(x, kpm)
        if self.attn2 is not None:
            h = self.attn2(self.act_mid(h), kpm)
        if self.norm is not None:
            h = self.norm(h)
        if self.head == "none":
            return h
        if self.head == "sequence":
            return self.out(self.flat(self.act_out(h)))
        out = self.out(self.act_out(h))
        return out.permute(0, 2, 1) if self.ce else out  # token logits [N, C, L] for cross-entropy


def reference_twin(model: SweepNet) -> SweepNet:
    twin = copy.deepcopy(model)
    twin.attn1 = PlainAttention(model.attn1)
    if model.attn2 is not None:
        twin.attn2 = PlainAttention(model.attn2)
    return twin


def make_loss(cfg: Config):
    if cfg.loss == "mse":
        return nn.MSELoss(reduction=cfg.reduction)
    weight = None
    if cfg.class_weights:
        weight = 0.2 + torch.rand(cfg.C, generator=torch.Generator().manual_seed(cfg.seed), dtype=DT)
    return nn.CrossEntropyLoss(weight=weight, reduction=cfg.reduction, label_smoothing=cfg.label_smoothing,
                               ignore_index=-100 if cfg.ignore_index is None else cfg.ignore_index)


def _targets(cfg: Config, n: int, g, first: bool):
    if cfg.loss == "mse":
        shape = {"none": (n, cfg.L, cfg.E), "token": (n, cfg.L, cfg.C), "sequence": (n, cfg.C)}[cfg.head]
        return torch.randn(*shape, dtype=DT, generator=g)
    shape = (n, cfg.L) if cfg.head == "token" else (n,)
    y = torch.randint(0, cfg.C, shape, generator=g)
    if cfg.ignore_index is not None:
        y[torch.rand(shape, generator=g) < 0.35] = cfg.ignore_index
        if first:  # at least one counted target in the data
            y.view(-1)[0] = 0
    return y


def build(cfg: Config, masked_input: bool = True):
    """``(model, batches)``; with ``masked_input`` the masks ride in X (else: X, y, kpm per batch)."""
    torch.manual_seed(cfg.seed)
    model = SweepNet(cfg, masked_input=masked_input and cfg.masks is not None)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.6)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    batches = []
    for b, n in enumerate(cfg.sizes):
        X = torch.randn(n, cfg.L, cfg.E, dtype=DT, generator=g)
        kpm = None if cfg.masks is None else torch.tensor(cfg.masks[b], dtype=torch.bool)
        y = _targets(cfg, n, g, first=b == 0)
        if not masked_input:
            batches.append((X, y, kpm))
        elif model.masked_input:
            batches.append((torch.cat([X, kpm[..., None].to(DT)], -1), y))
        else:
            batches.append((X, y))
    return model, batches


def counted(loss_func, batches):
    """The batches whose loss counts a target: a mean-reduced cross-entropy of a batch whose targets
    are all ``ignore_index`` is 0/0 (the curvature functions leave such batches out)."""
    if not isinstance(loss_func, nn.CrossEntropyLoss) or loss_func.reduction == "sum":
        return batches
    return [b for b in batches if bool((b[1] != loss_func.ignore_index).any())]


def _named(model, names):
    params = dict(model.named_parameters())
    return [params[n] for n in names]


# ---------------------------------------------------------------------------------------------
# 1. GGN and Hessian operators (every part)
# ---------------------------------------------------------------------------------------------
@st.composite
def operator_cases(draw):
    cfg = draw(configs(class_weights=True))
    picks = draw(st.lists(st.integers(0, 63), min_size=1, max_size=4))
    options = dict(column_chunk=draw(st.sampled_from([1, 2, 16])), max_cached_batches=draw(st.sampled_from([0, 1, 8])))
    return cfg, picks, draw(st.integers(1, 3)), options


def check_operators(case):
    cfg, picks, columns, options = case
    model, batches = build(cfg)
    twin = reference_twin(model)
    names = [n for n, _ in model.named_parameters()]
    chosen = list(dict.fromkeys(names[i % len(names)] for i in picks))  # a subset, in drawn order
    loss_func = make_loss(cfg)
    G = dense_ggn(twin, loss_func, _named(twin, chosen), counted(loss_func, batches))
    H = dense_hessian_double_backward(twin, loss_func, _named(twin, chosen), counted(loss_func, batches))
    V = torch.randn(G.shape[0], columns, dtype=DT, generator=torch.Generator().manual_seed(cfg.seed))
    GV, HV = G @ V, H @ V
    scale = GV.norm() + HV.norm()
    assert scale > 0
    params = _named(model, chosen)
    ggn = AttentionGGNLinearOperator(model, loss_func, params, batches, **options)
    assert rel_error(ggn @ V, GV, scale=scale) < TOL, "GGN"
    for part, ref in (("full", HV), ("outer", GV), ("functional", HV - GV)):
        op = AttentionHessianLinearOperator(model, loss_func, params, batches, part=part, **options)
        assert rel_error(op @ V, ref, scale=scale) < TOL, part


test_operators_sweep = settings(FAST, max_examples=20)(given(operator_cases())(check_operators))
test_operators_sweep_long = pytest.mark.slow(settings(LONG, max_examples=300)(given(operator_cases())(check_operators)))


# ---------------------------------------------------------------------------------------------
# 2. hessian_blocks and attention_factors
# ---------------------------------------------------------------------------------------------
@st.composite
def block_cases(draw):
    # hessian_blocks: one call of the layer per forward, no class weights (refused by name)
    cfg = draw(configs(class_weights=False))
    return cfg, draw(st.integers(0, cfg.depth - 1))


def check_blocks(case):
    cfg, layer = case
    model, batches = build(cfg)
    twin = reference_twin(model)
    attn, ref_attn = model.attention_layers()[layer], twin.attention_layers()[layer]
    prefix = f"attn{layer + 1}."
    chosen = [n for n, _ in model.named_parameters() if n.startswith(prefix)]
    loss_func = make_loss(cfg)
    G = dense_ggn(twin, loss_func, _named(twin, chosen), counted(loss_func, batches))
    H = dense_hessian_double_backward(twin, loss_func, _named(twin, chosen), counted(loss_func, batches))
    scale = H.abs().max() + G.abs().max()
    assert scale > 0
    blocks = ba.hessian_blocks(model, loss_func, attn, batches)
    for part, ref in (("outer", G), ("full", H), ("functional", H - G)):
        assert rel_error(blocks.matrix(part), ref, scale=scale, norm="max") < TOL, part
    # the factors: attention matrices and layer inputs of the batches that count
    factors = ba.attention_factors(model, loss_func, attn, batches)
    ref_attn.record = True
    with torch.no_grad():
        for X, _ in counted(loss_func, batches):
            twin(X)
    X_ref = torch.cat([x for x, _ in ref_attn.seen])
    A_ref = torch.cat([a for _, a in ref_attn.seen])
    assert rel_error(factors.moments.A, A_ref, norm="max") < 1e-12
    assert rel_error(factors.data.X[..., :cfg.E], X_ref, norm="max") < 1e-12


test_blocks_sweep = settings(FAST, max_examples=16)(given(block_cases())(check_blocks))
test_blocks_sweep_long = pytest.mark.slow(settings(LONG, max_examples=300)(given(block_cases())(check_blocks)))


# ---------------------------------------------------------------------------------------------
# 3. KFAC "expand" / "reduce" = curvlinops' KFAC on the nn.Linear twin
# ---------------------------------------------------------------------------------------------
@st.composite
def kfac_cases(draw):
    cfg = draw(configs(kinds=("softmax",), depths=(1,), norm=False, ce_extras=False))
    fisher, mc = draw(st.sampled_from([("type-2", 1), ("mc", 2), ("empirical", 1)]))
    return cfg, draw(st.sampled_from(["expand", "reduce"])), fisher, mc, draw(st.booleans())


def check_kfac(case):
    cfg, kfac_approx, fisher_type, mc, separate = case
    model, batches = build(cfg)
    twin = copy.deepcopy(model)
    twin.attn1 = LinearProjectionAttention(model.attn1)
    params = list(model.parameters())  # order: inp, attn1, out (module registration order)
    twin_params = (list(twin.inp.parameters()) if twin.inp is not None else []) + twin.attn1.linear_params()
    twin_params += list(twin.out.parameters()) if twin.out is not None else []
    kw = dict(kfac_approx=kfac_approx, fisher_type=fisher_type, mc_samples=mc, separate_weight_and_bias=separate)
    loss_func = make_loss(cfg)
    P = sum(p.numel() for p in params)
    eye = torch.eye(P, dtype=DT)
    ours = AttentionKFACLinearOperator(model, loss_func, params, batches, **kw) @ eye
    ref = KFACLinearOperator(twin, loss_func, twin_params, batches, check_deterministic=False, **kw) @ eye
    assert ref.norm() > 0
    assert rel_error(ours, ref) < TOL


test_kfac_sweep = settings(FAST, max_examples=24)(given(kfac_cases())(check_kfac))
test_kfac_sweep_long = pytest.mark.slow(settings(LONG, max_examples=200)(given(kfac_cases())(check_kfac)))


# ---------------------------------------------------------------------------------------------
# 4. BackPACK extensions, per sample
# ---------------------------------------------------------------------------------------------
@st.composite
def backpack_cases(draw):
    # one batch (one backward pass), one attention layer, no LayerNorm and no class weights
    return draw(configs(depths=(1,), norm=False, class_weights=False, max_batches=1))


def _per_sample_references(twin, loss_func, X, y, kpm, names):
    """``(grad_batch, ggn_diag_batch, hessian_diag_batch)``, each ``[N, P]``, by autodiff: per-sample
    terms of the batch loss (mean reduction: the batch's normaliser, read off the loss itself)."""
    base = {n: p.detach() for n, p in twin.named_parameters()}
    sizes = [base[n].numel() for n in names]
    flat0 = torch.cat([base[n].reshape(-1) for n in names])
    summed = copy.deepcopy(loss_func)
    summed.reduction = "sum"
    with torch.no_grad():
        out = twin(X, kpm)
        scale = (loss_func(out, y) / summed(out, y)).item() if loss_func.reduction == "mean" else 1.0

    def unflatten(flat):
        ps, i = dict(base), 0
        for n, s in zip(names, sizes):
            ps[n] = flat[i:i + s].view_as(base[n])
            i += s
        return ps

    grads, ggns, hdiags = [], [], []
    for n in range(X.shape[0]):
        Xn, yn, kn = X[n:n + 1], y[n:n + 1], None if kpm is None else kpm[n:n + 1]
        out_fn = lambda flat: functional_call(twin, unflatten(flat), (Xn, kn))  # noqa: E731
        loss_n = lambda flat: scale * summed(out_fn(flat), yn)  # noqa: E731
        grads.append(jacrev(loss_n)(flat0))
        o0 = out_fn(flat0).detach()
        J = jacrev(out_fn)(flat0).reshape(o0.numel(), -1)
        HL = hessian(lambda o: scale * summed(o, yn))(o0).reshape(o0.numel(), o0.numel())
        ggns.append(torch.einsum("ap,ab,bp->p", J, HL, J))
        # Hessian diagonal by double backward (reverse over reverse)
        flat = flat0.clone().requires_grad_(True)
        g = torch.autograd.grad(loss_n(flat), flat, create_graph=True, allow_unused=True)[0]
        if g is None or not g.requires_grad:  # a sequence whose targets are all ignored
            hdiags.append(torch.zeros_like(flat0))
            continue
        rows = torch.autograd.grad(g, flat, torch.eye(flat.numel(), dtype=DT), is_grads_batched=True)[0]
        hdiags.append(rows.diagonal())
    return torch.stack(grads), torch.stack(ggns), torch.stack(hdiags)


def check_backpack(cfg):
    model, [(X, y, kpm)] = build(cfg, masked_input=False)
    twin = reference_twin(model)
    names = [n for n, _ in model.named_parameters()]
    loss_func = make_loss(cfg)
    gb, gd, hd = _per_sample_references(twin, loss_func, X, y, kpm, names)

    def run(*extensions):
        net = ba.extend(copy.deepcopy(model), use_converter=True)
        lossf = ba.extend(copy.deepcopy(loss_func))
        with backpack(*extensions):
            lossf(net(X, kpm), y).backward()
        got = dict(net.named_parameters())
        assert set(got) == set(names)
        return [got[n] for n in names]

    def flat(params, field, batched):
        return torch.cat([getattr(p, field).reshape(X.shape[0], -1) if batched else getattr(p, field).reshape(-1)
                          for p in params], -1)

    ps = run(bext.BatchGrad(), bext.DiagGGNExact(), bext.BatchDiagGGNExact())
    assert rel_error(flat(ps, "grad_batch", True), gb, scale=gb.norm() + 1e-300) < TOL
    assert rel_error(flat(ps, "diag_ggn_exact", False), gd.sum(0)) < TOL
    assert rel_error(flat(ps, "diag_ggn_exact_batch", True), gd) < TOL
    ps = run(bext.DiagHessian(), bext.BatchDiagHessian())
    scale = hd.norm()
    assert rel_error(flat(ps, "diag_h", False), hd.sum(0), scale=scale) < TOL
    assert rel_error(flat(ps, "diag_h_batch", True), hd, scale=scale) < TOL


test_backpack_sweep = settings(FAST, max_examples=16)(given(backpack_cases())(check_backpack))
test_backpack_sweep_long = pytest.mark.slow(settings(LONG, max_examples=200)(given(backpack_cases())(check_backpack)))
