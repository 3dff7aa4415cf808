"""laplace-torch on a converted transformer classifier with this package's backends."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import backpack_attention as ba

laplace = pytest.importorskip("laplace")
from laplace import Laplace  # noqa: E402
from laplace.curvature import CurvlinopsGGN  # noqa: E402

from backpack_attention.laplace import AttentionGGN, AttentionHessian  # noqa: E402
from backpack_attention.models import LinearProjectionAttention  # noqa: E402
from reference import dense_ggn, dense_hessian_double_backward, rel_error  # noqa: E402

DT = torch.float64


class Classifier(nn.Module):
    """nn.TransformerEncoderLayer (pre-LN) -> mean pooling -> Linear."""

    def __init__(self, E=4, H=2, C=3):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=6, dropout=0.0, batch_first=True,
                                                norm_first=True, dtype=DT)
        self.head = nn.Linear(E, C, dtype=DT)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


def _problem(seed=0):
    torch.manual_seed(seed)
    model = Classifier()
    X = torch.randn(6, 3, 4, dtype=DT)
    y = torch.randint(0, 3, (6,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=4)
    return model, loader


def test_full_ggn_equals_curvlinops_backend_on_the_math_kernel():
    model, loader = _problem()
    ref_model = copy.deepcopy(model)
    ours = ba.convert_attention(model)
    la = Laplace(ours, "classification", subset_of_weights="all", hessian_structure="full", backend=AttentionGGN)
    la.fit(loader)
    ref = Laplace(ref_model, "classification", subset_of_weights="all", hessian_structure="full",
                  backend=CurvlinopsGGN)
    torch.backends.mha.set_fastpath_enabled(False)  # laplace fits in eval mode
    try:
        with sdpa_kernel(SDPBackend.MATH):
            ref.fit(loader)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert rel_error(la.H, ref.H) < 1e-10
    assert abs(la.log_marginal_likelihood().item() - ref.log_marginal_likelihood().item()) < 1e-8


def test_full_hessian_equals_double_backward():
    model, loader = _problem(1)
    ref_model = copy.deepcopy(model)
    ours = ba.convert_attention(model)
    la = Laplace(ours, "classification", subset_of_weights="all", hessian_structure="full",
                 backend=AttentionHessian)
    la.fit(loader)
    sum_loss = nn.CrossEntropyLoss(reduction="sum")
    batches = [(X, y) for X, y in loader]
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        H = dense_hessian_double_backward(ref_model.eval(), sum_loss, list(ref_model.parameters()), batches)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    # laplace-torch multiplies the operator onto a float32 identity, so the result went through float32
    assert rel_error(la.H, H) < 1e-6


def test_diag_equals_the_full_ggn_diagonal():
    model, loader = _problem(2)
    ours = ba.convert_attention(model)
    full = Laplace(ours, "classification", subset_of_weights="all", hessian_structure="full", backend=AttentionGGN)
    full.fit(loader)
    diag = Laplace(ours, "classification", subset_of_weights="all", hessian_structure="diag", backend=AttentionGGN)
    diag.fit(loader)
    assert rel_error(diag.H, full.H.diagonal()) < 1e-6  # full.H went through float32 (see above)


# ---- hessian_structure="kron" ------------------------------------------------------------------
class AttnNet(nn.Module):
    """Linear -> residual self-attention -> mean pooling -> Linear (attention given as a module)."""

    def __init__(self, attn, F=3, E=4, C=3):
        super().__init__()
        self.inp = nn.Linear(F, E, dtype=DT)
        self.attn = attn
        self.head = nn.Linear(E, C, dtype=DT)

    def forward(self, x):
        h = self.inp(x)
        return self.head((h + self.attn(h)).mean(1))


class TorchCallSignature(nn.Module):
    """``LinearProjectionAttention`` behind ``nn.MultiheadAttention``'s call signature (self-attention)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.batch_first = inner, True

    def forward(self, q, k, v, attn_mask=None, key_padding_mask=None, need_weights=False, is_causal=False):
        return self.inner(q, key_padding_mask), None


def _named_kfacs(model, la):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == len(la.H_facs.kfacs)
    return dict(zip(names, la.H_facs.kfacs))


def _compare_with_twin(ours: dict, ref: dict, attn: str, twin_attn: str) -> set:
    """Factor-wise comparison: our packed attention entries against the twin's q/k/v/o Linears, every
    other entry by name. Returns the names of ours that were compared."""
    done = set()
    for name, F in ours.items():
        if not name.startswith(attn):
            if name in ref:
                assert len(F) == len(ref[name]) and all(rel_error(a, b) < 1e-10 for a, b in zip(F, ref[name])), name
                done.add(name)
            continue
        kind = name[len(attn):]
        t = {g: ref[f"{twin_attn}{g}.{'weight' if 'weight' in kind else 'bias'}"] for g in "qkvo"}
        if kind == "in_proj_weight":
            G, A = F
            assert rel_error(G, torch.block_diag(t["q"][0], t["k"][0], t["v"][0])) < 1e-10
            assert all(rel_error(A, t[g][1]) < 1e-10 for g in "qkv")
        elif kind == "in_proj_bias":
            (G,) = F
            assert rel_error(G, torch.block_diag(t["q"][0], t["k"][0], t["v"][0])) < 1e-10
        else:  # out_proj_weight / out_proj_bias
            assert len(F) == len(t["o"]) and all(rel_error(a, b) < 1e-10 for a, b in zip(F, t["o"])), name
        done.add(name)
    return done


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_kron_equals_laplace_curvlinops_kfac_on_the_linear_projection_twin(kfac_approx):
    """AttentionGGN's kron on a model with MultiheadSelfAttention = laplace-torch's own KFAC (curvlinops
    backend) on the same network with nn.Linear q/k/v/o projections: factor by factor (the packed
    in_proj's output factor is blockdiag(G_Q, G_K, G_V)), marginal likelihood and GLM predictive."""
    torch.manual_seed(4)
    attn = ba.MultiheadSelfAttention(4, 2, dtype=DT)
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ours = AttnNet(attn)
    twin = copy.deepcopy(ours)
    twin.attn = LinearProjectionAttention(attn)
    X, y = torch.randn(6, 3, 3, dtype=DT), torch.randint(0, 3, (6,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=4)  # 2 batches
    kw = dict(subset_of_weights="all", hessian_structure="kron", asdl_fisher_kwargs={"kfac_approx": kfac_approx})
    la = Laplace(ours, "classification", backend=AttentionGGN, **kw)
    la.fit(loader)
    ref = Laplace(twin, "classification", backend=CurvlinopsGGN, **kw)
    ref.fit(loader)
    done = _compare_with_twin(_named_kfacs(ours, la), _named_kfacs(twin, ref), "attn.", "attn.")
    assert done == {n for n, _ in ours.named_parameters()}
    assert abs(la.log_marginal_likelihood().item() - ref.log_marginal_likelihood().item()) < 1e-8
    Xt = torch.randn(5, 3, 3, dtype=DT)
    assert rel_error(la(Xt, pred_type="glm", link_approx="probit"), ref(Xt, pred_type="glm", link_approx="probit")) < 1e-8


def test_kron_on_an_encoder_layer():
    """nn.TransformerEncoderLayer classifier: attention and Linear entries = laplace-torch's curvlinops KFAC of
    the Linear-projection twin (its LayerNorms frozen, which that backend cannot handle); LayerNorm
    entries = exact GGN blocks (double-checked by reverse-mode autodiff on the original model)."""
    model, loader = _problem(3)
    original = copy.deepcopy(model)
    ours = ba.convert_attention(model)
    la = Laplace(ours, "classification", subset_of_weights="all", hessian_structure="kron", backend=AttentionGGN)
    la.fit(loader)
    twin = copy.deepcopy(original)
    twin.layer.self_attn = TorchCallSignature(LinearProjectionAttention(ours.layer.self_attn.attention))
    for n, p in twin.named_parameters():
        p.requires_grad_("norm" not in n)
    ref = Laplace(twin, "classification", subset_of_weights="all", hessian_structure="kron", backend=CurvlinopsGGN)
    with ba.torch_math_attention():  # the encoder layer's fast-path checks read nn.MultiheadAttention internals
        ref.fit(loader)
    named = _named_kfacs(ours, la)
    done = _compare_with_twin(named, _named_kfacs(twin, ref), "layer.self_attn.attention.", "layer.self_attn.inner.")
    norms = [n for n in named if "norm" in n]
    assert done | set(norms) == set(named) and len(norms) == 4
    params = [p for n, p in original.named_parameters() if "norm" in n]
    with ba.torch_math_attention():
        G = dense_ggn(original.eval(), nn.CrossEntropyLoss(reduction="sum"), params, [b for b in loader])
    i = 0
    for n in norms:
        (block,) = named[n]
        k = block.shape[0]
        assert rel_error(block, G[i:i + k, i:i + k]) < 1e-10, n
        i += k


def test_kron_refusals():
    model, loader = _problem(4)
    X, y = next(iter(loader))
    ours = ba.convert_attention(copy.deepcopy(model))
    with pytest.raises(ValueError, match="Kron cannot hold"):
        AttentionGGN(ours, "classification").kron(X, y, N=6, kfac_approx="attention")
    with pytest.raises(ValueError, match=r"convert_attention\(model\) first"):
        AttentionGGN(model, "classification").kron(X, y, N=6)
    emb = nn.Sequential(nn.Embedding(5, 4, dtype=DT), nn.Flatten(), nn.Linear(12, 3, dtype=DT))
    with pytest.raises(ValueError, match=r"0\.weight \[5, 4\]"):
        AttentionGGN(emb, "classification").kron(torch.randint(0, 5, (6, 3)), torch.randint(0, 3, (6,)), N=6)
    kron = Laplace(ours, "classification", subset_of_weights="all", hessian_structure="kron", backend=AttentionHessian)
    with pytest.raises(NotImplementedError, match="backend=AttentionGGN"):
        kron.fit(loader)


def test_docs_snippet_runs():
    """docs/laplace.md's snippet runs as printed and fits a finite marginal likelihood."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "laplace.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, re.S)
    namespace = {}
    exec(compile(block, "docs/laplace.md", "exec"), namespace)
    assert torch.isfinite(namespace["la"].log_marginal_likelihood())
