"""Whole-model operators: any parameters (attention, LayerNorm, MLP, embeddings, read-out) with exact
cross terms, against dense references that are right through LayerNorm (double backward for the
Hessian, reverse mode for the GGN), on an nn.TransformerEncoder model converted in place."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import backpack_attention as ba
from reference import dense_ggn, dense_hessian_and_ggn, dense_hessian_double_backward, rel_error

DT = torch.float64


class EncoderLM(nn.Module):
    """Embedding -> nn.TransformerEncoder (2 layers) -> Linear; token logits [N, C, L] for CE."""

    def __init__(self, norm_first: bool, vocab=5, E=4, H=2, ff=6, C=3, causal=True, L=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, E, dtype=DT)
        layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=ff, dropout=0.0, batch_first=True,
                                           norm_first=norm_first, dtype=DT)
        self.enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(E, C, dtype=DT)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(L, dtype=DT) if causal else None)

    def forward(self, X):
        return self.head(self.enc(self.emb(X), mask=self.mask)).transpose(1, 2)


def _problem(norm_first, seed=0):
    torch.manual_seed(seed)
    ref = EncoderLM(norm_first)
    with torch.no_grad():  # non-trivial LayerNorm weights and biases
        for n, p in ref.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    ours = ba.convert_attention(copy.deepcopy(ref))
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randint(0, 5, (3, 4), generator=g), torch.randint(0, 3, (3, 4), generator=g)) for _ in range(2)]
    return ref, ours, nn.CrossEntropyLoss(), data


def _dense(op):
    return op @ torch.eye(op.shape[1], dtype=DT)


@pytest.mark.parametrize("norm_first", [True, False])
def test_whole_model_hessian_and_ggn(norm_first):
    ref, ours, loss, data = _problem(norm_first)
    params = list(ours.parameters())
    H_ref = dense_hessian_double_backward(ref, loss, list(ref.parameters()), data)
    G_ref = dense_ggn(ref, loss, list(ref.parameters()), data)
    H = _dense(ba.AttentionHessianLinearOperator(ours, loss, params, data))
    G = _dense(ba.AttentionGGNLinearOperator(ours, loss, params, data))
    F = _dense(ba.AttentionHessianLinearOperator(ours, loss, params, data, part="functional"))
    assert rel_error(H, H_ref) < 1e-10
    assert rel_error(G, G_ref) < 1e-10
    assert rel_error(F, H_ref - G_ref) < 1e-10


def test_subset_in_any_order_with_cross_terms():
    ref, ours, loss, data = _problem(True, seed=1)
    names = ["head.weight", "enc.layers.0.norm1.weight", "enc.layers.1.self_attn.attention.in_proj_weight",
             "emb.weight", "enc.layers.0.linear1.bias"]
    ours_p = dict(ours.named_parameters())
    ref_names = [n.replace("self_attn.attention.", "self_attn.") for n in names]
    ref_p = dict(ref.named_parameters())
    H_ref = dense_hessian_double_backward(ref, loss, [ref_p[n] for n in ref_names], data)
    H = _dense(ba.AttentionHessianLinearOperator(ours, loss, [ours_p[n] for n in names], data))
    assert rel_error(H, H_ref) < 1e-10


def test_torch_func_hessian_is_wrong_on_layernorm_weights_where_ours_is_right():
    """Documents the torch bug that makes forward-over-reverse references unusable here: the rows
    of LayerNorm weights of torch.func.hessian (jacfwd(jacrev)) are off; double backward and ours agree."""
    ref, ours, loss, data = _problem(True, seed=2)
    H_db = dense_hessian_double_backward(ref, loss, list(ref.parameters()), data)
    H_func, _ = dense_hessian_and_ggn(ref, loss, list(ref.parameters()), data)
    H_ours = _dense(ba.AttentionHessianLinearOperator(ours, loss, list(ours.parameters()), data))
    rows, i = [], 0
    for n, p in ref.named_parameters():
        if "norm" in n and n.endswith("weight"):
            rows.append(torch.arange(i, i + p.numel()))
        i += p.numel()
    rows = torch.cat(rows)
    assert rel_error(H_ours[rows], H_db[rows]) < 1e-10
    err = rel_error(H_func[rows], H_db[rows])
    if err < 1e-8:  # pragma: no cover - a future torch may fix it; ours is still checked above
        pytest.skip(f"torch.func.hessian through layer_norm is right in torch {torch.__version__}")
    assert err > 1e-3
