"""convert_attention keeps what users rely on: parameter objects, state_dict keys, the eval fast
path of nn.TransformerEncoder, and a clear error when there is nothing to convert."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import backpack_attention as ba
from backpack_attention import MultiheadSelfAttention, SelfAttentionAdapter

DT = torch.float64


def _encoder(norm_first=False):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True,
                                       norm_first=norm_first, dtype=DT)
    return nn.TransformerEncoder(layer, num_layers=2)


def test_state_dict_keys_and_checkpoints_survive_conversion():
    model = _encoder()
    before = model.state_dict()
    converted = ba.convert_attention(copy.deepcopy(model))
    after = converted.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    # an old checkpoint loads into the converted model, and the converted model's into the original
    other = _encoder()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    converted.load_state_dict(other.state_dict())
    x = torch.randn(2, 5, 8, dtype=DT)
    with sdpa_kernel(SDPBackend.MATH):
        torch.testing.assert_close(converted(x), other(x), rtol=1e-12, atol=1e-12)
    fresh = _encoder()
    fresh.load_state_dict(converted.state_dict())
    with sdpa_kernel(SDPBackend.MATH):
        torch.testing.assert_close(fresh(x), other(x), rtol=1e-12, atol=1e-12)


def test_conversion_keeps_parameter_objects():
    model = _encoder()
    ids = {n: id(p) for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ba.convert_attention(model)
    assert {id(p) for p in model.parameters()} == set(ids.values())
    attn = model.layers[0].self_attn
    assert isinstance(attn, SelfAttentionAdapter)
    assert attn.attention.in_proj_weight is attn.in_proj_weight
    # the optimizer built before the conversion still trains the converted model
    x = torch.randn(2, 5, 8, dtype=DT)
    w0 = attn.attention.in_proj_weight.detach().clone()
    model(x).square().sum().backward()
    opt.step()
    assert not torch.equal(attn.attention.in_proj_weight, w0)


@pytest.mark.parametrize("norm_first", [False, True])
def test_eval_no_grad_with_padding_mask(norm_first):
    """torch's nested-tensor fast path used to crash on the adapter ('no attribute out_proj')."""
    model = _encoder(norm_first).eval()
    converted = ba.convert_attention(copy.deepcopy(model))
    x = torch.randn(3, 5, 8, dtype=DT)
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    kpm[0, 3:] = True
    kpm[2, 4:] = True
    with torch.no_grad():
        out = converted(x, src_key_padding_mask=kpm)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with sdpa_kernel(SDPBackend.MATH):
                ref = model(x, src_key_padding_mask=kpm)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    keep = ~kpm  # padded positions are not defined by torch's reference (the fast path zeroes them)
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-10, atol=1e-10)


def test_nothing_to_convert_is_an_error():
    class Attention(nn.Module):  # stands in for an attention class of another library
        def forward(self, x):
            return x

    model = nn.Sequential(nn.Linear(4, 4), Attention())
    with pytest.raises(ValueError, match=r"no nn.MultiheadAttention to convert.*'1 \(Attention\)'"):
        ba.convert_attention(model)
    assert ba.convert_attention(model, strict=False) is model
    # a model built on MultiheadSelfAttention is fine as it is
    own = nn.Sequential(MultiheadSelfAttention(4, 2))
    assert ba.convert_attention(own) is own
