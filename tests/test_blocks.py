"""Closed-form Hessian blocks vs torch.func (float64, math SDPA kernel), and their structure."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from torch import nn

from backpack_attention import MultiheadSelfAttention, attention_factors, hessian_blocks, param_index
from backpack_attention.models import TinyTransformer
from reference import dense_hessian_and_ggn, rel_error

DT = torch.float64
TOL = 1e-10


class AttnModel(nn.Module):
    """attention (with optional key padding mask) [-> Linear readout as [N, C, L] for CE]."""

    def __init__(self, E, H, C=None, *, kpm=None, **kw):
        super().__init__()
        self.attn = MultiheadSelfAttention(E, H, dtype=DT, **kw)
        self.head = nn.Linear(E, C, dtype=DT) if C else None
        self.kpm = kpm

    def forward(self, x):
        out = self.attn(x, self.kpm)
        return out if self.head is None else self.head(torch.tanh(out)).transpose(1, 2)


def randomize(model, scale=0.7):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, scale)


rel_err = functools.partial(rel_error, norm="max")


def check_all_parts(model, loss_func, module, batches):
    blocks = hessian_blocks(model, loss_func, module, batches)
    params = list(module.parameters())
    H, G = dense_hessian_and_ggn(model, loss_func, params, batches)
    for part, ref in (("outer", G), ("full", H), ("functional", H - G)):
        assert rel_err(blocks.matrix(part), ref) < TOL, part
    return blocks, H, G


CASES = list(itertools.product([1, 2, 3], [True, False], ["none", "causal", "padding"], ["softmax", "linear"]))


@pytest.mark.parametrize("H,bias,mask,attention", CASES)
def test_last_layer_mse_all_blocks(H, bias, mask, attention):
    g = torch.Generator().manual_seed(hash((H, bias, mask, attention)) % 2**31)
    N, L, E = 3, int(torch.randint(3, 6, (1,), generator=g)), 2 * H
    kpm = None
    if mask == "padding":
        kpm = torch.zeros(N, L, dtype=torch.bool)
        kpm[0, -2:] = True
        kpm[2, 0] = True
    model = AttnModel(E, H, kpm=kpm, bias=bias, causal=mask == "causal", attention=attention)
    randomize(model, 0.5 if attention == "linear" else 0.8)
    X, Y = torch.randn(N, L, E, dtype=DT, generator=g), torch.randn(N, L, E, dtype=DT, generator=g)
    blocks, H_ref, G_ref = check_all_parts(model, nn.MSELoss(), model.attn, [(X, Y)])
    assert blocks.factors.loss.separable


@pytest.mark.parametrize("H,mask,reduction", [(1, "causal", "mean"), (2, "padding", "sum"), (4, "none", "mean")])
def test_last_layer_cross_entropy_with_readout(H, mask, reduction):
    torch.manual_seed(H)
    N, L, E, C = 2, 4, 4 if H < 4 else 8, 3
    kpm = None
    if mask == "padding":
        kpm = torch.zeros(N, L, dtype=torch.bool)
        kpm[1, -1] = True
    model = AttnModel(E, H, C, kpm=kpm, causal=mask == "causal")
    randomize(model)
    y = torch.randint(0, C, (N, L))
    y[0, 1] = -100  # ignore_index
    N2 = N if kpm is not None else N + 1  # the padding mask is fixed to N sequences
    batches = [(torch.randn(N, L, E, dtype=DT), y), (torch.randn(N2, L, E, dtype=DT), torch.randint(0, C, (N2, L)))]
    check_all_parts(model, nn.CrossEntropyLoss(reduction=reduction), model.attn, batches)


@pytest.mark.parametrize("layer,attention,norm", [(0, "softmax", "none"), (1, "softmax", "pre"), (0, "linear", "none")])
def test_two_layer_transformer_middle_and_last_layer(layer, attention, norm):
    torch.manual_seed(layer + 7)
    model = TinyTransformer(vocab=5, d_model=4, num_heads=2, num_layers=2, d_mlp=6, max_len=6,
                            attention=attention, norm=norm, activation="gelu", readout="logits", dtype=DT)
    randomize(model, 0.6)
    model.readout = nn.Identity()

    class CEModel(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, X):
            return self.inner(X).transpose(1, 2)

    m = CEModel(model)
    X = torch.randint(0, 5, (3, 5))
    y = torch.randint(0, 5, (3, 5))
    blocks, H, G = check_all_parts(m, nn.CrossEntropyLoss(), model.blocks[layer].attn, [(X, y)])
    assert not blocks.factors.loss.separable


def test_structure_last_layer():
    """functional(V,V)=0, cross-head functional=0, outer PSD, b_K rows and columns zero."""
    torch.manual_seed(3)
    model = AttnModel(6, 3, causal=True)
    randomize(model)
    X, Y = torch.randn(2, 5, 6, dtype=DT), torch.randn(2, 5, 6, dtype=DT)
    blocks = hessian_blocks(model, nn.MSELoss(), model.attn, (X, Y))
    full = blocks.matrix("full")
    scale = full.abs().max()
    for h in range(3):
        assert blocks[("W_V", h), ("W_V", h)].functional.abs().max() == 0
        assert blocks[("W_V", h), ("W_V", h)].outer.abs().max() > 1e-3 * scale
        for h2 in range(3):
            if h2 != h:
                for a, b in itertools.product(["W_Q", "W_K", "W_V"], repeat=2):
                    assert blocks[(a, h), (b, h2)].functional.abs().max() == 0
        assert blocks[("W_Q", h), ("W_Q", h)].functional.abs().max() > 1e-6 * scale
    outer = blocks.matrix("outer")
    eig = torch.linalg.eigvalsh(outer)
    assert eig.min() >= -1e-12 * eig.max()
    functional_eig = torch.linalg.eigvalsh(blocks.matrix("functional"))
    assert functional_eig.min() < 0 < functional_eig.max()  # indefinite
    bK = param_index(model.attn, "b_K")
    assert full[bK].abs().max() < 1e-13 * scale and full[:, bK].abs().max() < 1e-13 * scale


def test_block_keys_and_orientation():
    torch.manual_seed(0)
    model = AttnModel(4, 2)
    randomize(model)
    X, Y = torch.randn(2, 3, 4, dtype=DT), torch.randn(2, 3, 4, dtype=DT)
    blocks = hessian_blocks(model, nn.MSELoss(), model.attn, (X, Y))
    full = blocks.matrix("full")
    for (n1, h1), (n2, h2) in blocks.keys():
        b = blocks[(n1, h1), (n2, h2)]
        i, j = param_index(model.attn, n1, h1), param_index(model.attn, n2, h2)
        assert torch.equal(b.full, full[i][:, j])
    b = blocks[("W_O", None), ("W_Q", 1)]
    assert b.outer.shape == (16, 8)


def test_fused_kernels_train_and_eval_agree():
    """Factors are computed with the default (fused) kernels in place, in train and eval mode."""
    torch.manual_seed(1)
    model = AttnModel(4, 2, 3, causal=True)
    randomize(model)
    X, y = torch.randn(2, 4, 4, dtype=DT), torch.randint(0, 3, (2, 4))
    H, G = dense_hessian_and_ggn(model, nn.CrossEntropyLoss(), list(model.attn.parameters()), [(X, y)])
    for mode in (model.train, model.eval):
        mode()
        blocks = hessian_blocks(model, nn.CrossEntropyLoss(), model.attn, (X, y))
        assert rel_err(blocks.matrix("full"), H) < TOL
        assert rel_err(blocks.matrix("outer"), G) < TOL


def test_factors_terms():
    """Moments are what SPEC §2.2 says: mu_i = X^T a_i, Sigma_i = covariance under a_i."""
    torch.manual_seed(2)
    model = AttnModel(4, 2)
    randomize(model)
    X, Y = torch.randn(2, 3, 4, dtype=DT), torch.randn(2, 3, 4, dtype=DT)
    f = attention_factors(model, nn.MSELoss(), model.attn, (X, Y))
    Xt = torch.cat([X, torch.ones(2, 3, 1, dtype=DT)], -1)
    assert torch.allclose(f.data.X, Xt)
    A = model.attn.attention_weights(X)
    assert torch.allclose(f.moments.A, A, atol=1e-14)
    mu = torch.einsum("nhij,nja->nhia", A, Xt)
    assert torch.allclose(f.moments.M1, mu, atol=1e-14)
    n, h, i = 1, 1, 2
    a = A[n, h, i]
    Sigma = (Xt[n].T * a) @ Xt[n] - torch.outer(mu[n, h, i], mu[n, h, i])
    assert torch.allclose(f.moments.Sigma[n, h, i], Sigma, atol=1e-14)
    assert f.moments.Sigma[..., -1, :].abs().max() < 1e-14  # ones column has zero covariance
    W = model.attn.in_proj_weight.detach()
    assert torch.equal(f.weights.W_Q[0, :4], W[:2].T)
    assert torch.allclose(f.weights.U, f.weights.W_V @ f.weights.W_O)
    r = 2 * (model(X).detach() - Y) / Y.numel()
    assert torch.allclose(f.loss.r, r, atol=1e-15)


class Sq(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize(
    "make_call, match",
    [
        (lambda m, a: hessian_blocks(m, nn.MSELoss(), MultiheadSelfAttention(4, 2, dtype=DT), a), "not a submodule"),
        (lambda m, a: hessian_blocks(m, nn.L1Loss(), m.attn, a), "MSELoss or nn.CrossEntropyLoss"),
        (lambda m, a: hessian_blocks(m, nn.MSELoss(reduction="none"), m.attn, a), "reduction"),
        (lambda m, a: hessian_blocks(m, nn.MSELoss(), m.attn, (a[0] * float("nan"), a[1])), "non-finite"),
        (lambda m, a: hessian_blocks(m, nn.MSELoss(), m.attn, (a[0], a[1][:, :2])), "data"),
        (lambda m, a: hessian_blocks(m, nn.MSELoss(), m.attn, []), "empty"),
        (lambda m, a: hessian_blocks(m, nn.MSELoss(), Sq(), a), "MultiheadSelfAttention"),
    ],
)
def test_bad_input(make_call, match):
    torch.manual_seed(0)
    model = AttnModel(4, 2)
    X, Y = torch.randn(2, 3, 4, dtype=DT), torch.randn(2, 3, 4, dtype=DT)
    before = [p.detach().clone() for p in model.parameters()]
    X0 = X.clone()
    with pytest.raises((ValueError, TypeError, NotImplementedError), match=match):
        make_call(model, (X, Y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert torch.equal(X, X0)


def test_active_dropout_rejected():
    model = nn.Sequential(AttnModel(4, 2), nn.Dropout(0.1))
    X, Y = torch.randn(2, 3, 4, dtype=DT), torch.randn(2, 3, 4, dtype=DT)
    with pytest.raises(ValueError, match="dropout"):
        hessian_blocks(model, nn.MSELoss(), model[0].attn, (X, Y))
    model.eval()  # inactive dropout is fine
    hessian_blocks(model, nn.MSELoss(), model[0].attn, (X, Y))


def test_non_finite_loss_rejected():
    model = AttnModel(4, 2)
    with torch.no_grad():
        model.attn.out_proj_bias.fill_(float("inf"))
    X, Y = torch.randn(2, 3, 4, dtype=DT), torch.randn(2, 3, 4, dtype=DT)
    with pytest.raises(ValueError, match="not finite"):
        hessian_blocks(model, nn.MSELoss(), model.attn, (X, Y))


def test_converted_transformer_encoder_layer_against_original_mha():
    """Blocks of a converted nn.TransformerEncoderLayer equal torch.func on the original (math kernel)."""
    import copy

    from backpack_attention import convert_attention

    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True, dtype=DT)
    randomize(layer, 0.6)

    class Net(nn.Module):
        def __init__(self, enc):
            super().__init__()
            self.enc, self.mask = enc, nn.Transformer.generate_square_subsequent_mask(5, dtype=DT)

        def forward(self, x):
            return self.enc(x, src_mask=self.mask, is_causal=True)

    original = Net(layer)
    converted = convert_attention(copy.deepcopy(original))
    X, Y = torch.randn(2, 5, 4, dtype=DT), torch.randn(2, 5, 4, dtype=DT)
    mha = original.enc.self_attn
    params = [mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias]
    H, G = dense_hessian_and_ggn(original, nn.MSELoss(), params, [(X, Y)])
    blocks = hessian_blocks(converted, nn.MSELoss(), converted.enc.self_attn, (X, Y))
    assert rel_err(blocks.matrix("full"), H) < TOL
    assert rel_err(blocks.matrix("outer"), G) < TOL


def test_masks_passed_as_keywords():
    """A model that calls attn(x=..., key_padding_mask=...) gets the same (correct) blocks."""

    class KwModel(AttnModel):
        def forward(self, x):
            return self.attn(x=x, key_padding_mask=self.kpm)

    torch.manual_seed(4)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[0, 3:] = True
    model = KwModel(4, 2, kpm=kpm)
    randomize(model)
    X, Y = torch.randn(2, 5, 4, dtype=DT), torch.randn(2, 5, 4, dtype=DT)
    check_all_parts(model, nn.MSELoss(), model.attn, [(X, Y)])
