"""timm's VisionTransformer converted by convert_attention (docs/adapters.md): outputs (with and
without an attention mask), parameters, whole-model curvature, the fused_attn switch, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import backpack_attention as ba
from backpack_attention.adapters import converted_modules
from test_adapters import DT, assert_untouched, check_conversion, check_dropout_refused, check_operators, perturb_norms

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

PIXELS = torch.randn(2, 1, 8, 8, dtype=DT, generator=torch.Generator().manual_seed(0))


def _vit(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(img_size=8, patch_size=4, in_chans=1, embed_dim=4, depth=2, num_heads=2, num_classes=3, mlp_ratio=2.0)
    cfg.update(kw)
    model = VisionTransformer(**cfg).to(DT)
    perturb_norms(model, seed)
    return model


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
def test_vit_outputs_and_curvature(qk_norm):
    ref = _vit(qk_norm=qk_norm, depth=1 if qk_norm else 2)
    ours = check_conversion(ref, lambda m: m(PIXELS), ["timm.Attention"])
    assert all(b.attn.fused_attn for b in ours.blocks)
    assert [n for n, _ in converted_modules(ours)] == [f"blocks.{i}.attn" for i in range(len(ours.blocks))]
    check_operators(ref, ours, nn.CrossEntropyLoss(), [(PIXELS, torch.tensor([0, 2]))])


def test_vit_with_attention_mask():
    ref = _vit(seed=1, depth=1).eval()
    ours = ba.convert_attention(copy.deepcopy(ref))
    allowed = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    allowed[1, ..., 3:] = False  # key padding of the second image's last two tokens
    torch.testing.assert_close(ours(PIXELS, attn_mask=allowed), ref(PIXELS, attn_mask=allowed), rtol=1e-12, atol=1e-12)


def test_unfused_attention_is_switched():
    ref = _vit(seed=2, depth=1).eval()
    for b in ref.blocks:
        b.attn.fused_attn = False
    ours = ba.convert_attention(copy.deepcopy(ref))
    assert ours.blocks[0].attn.fused_attn is True
    torch.testing.assert_close(ours(PIXELS), ref(PIXELS), rtol=1e-12, atol=1e-12)


def test_attention_dropout_in_training_is_refused():
    check_dropout_refused(_vit(seed=3, depth=1, attn_drop_rate=0.1).train(), lambda m: m(PIXELS),
                          r"blocks\.0\.attn \(Attention\)", 0.1)


def test_rotary_attention_is_refused():
    from timm.layers import AttentionRope

    model = nn.Sequential(AttentionRope(4, num_heads=2)).eval()
    snapshot = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"0 \(AttentionRope\): rotary position embeddings are not supported yet"):
        ba.convert_attention(model)
    assert_untouched(model, snapshot)
