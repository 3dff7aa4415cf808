"""HuggingFace models converted by convert_attention (docs/adapters.md): GPT-2 LM, BERT sequence
classifier with padding, ViT classifier; outputs, parameters, whole-model curvature, refusals."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

import backpack_attention as ba
from backpack_attention.adapters import converted_modules
from test_adapters import DT, assert_untouched, check_conversion, check_dropout_refused, check_operators, perturb_norms

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

IDS = torch.tensor([[1, 3, 0, 2, 4], [2, 2, 1, 0, 3]])
PAD = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # left padding: rows that attend to nothing


def _gpt2(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_embd=4, n_head=2, vocab_size=5, n_positions=5, n_inner=8,
               attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg.update(kw)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).to(DT)
    perturb_norms(model, seed)
    return model


def _bert(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(num_hidden_layers=2, hidden_size=4, num_attention_heads=2, intermediate_size=8, vocab_size=5,
               max_position_embeddings=5, type_vocab_size=1, num_labels=3, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0, pad_token_id=0)
    cfg.update(kw)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**cfg)).to(DT)
    perturb_norms(model, seed)
    return model


class Logits(nn.Module):
    """``X`` (a dict of model inputs) -> ``logits`` (token logits as ``[N, V, L]`` for cross-entropy)."""

    def __init__(self, model, tokens=False):
        super().__init__()
        self.model, self.tokens = model, tokens

    def forward(self, X):
        out = self.model(**X).logits
        return out.transpose(1, 2) if self.tokens else out


def _batch_size(X):
    return next(iter(X.values())).shape[0]


def test_gpt2_lm_with_padding():
    ref = _gpt2()
    X = {"input_ids": IDS, "attention_mask": PAD}
    ours = check_conversion(ref, lambda m: m(**X).logits, ["transformers.GPT2Attention"])
    assert [n for n, _ in converted_modules(ours)] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert ours.config._attn_implementation == "sdpa"
    assert ours.lm_head.weight is ours.transformer.wte.weight  # tying kept
    torch.testing.assert_close(ours(IDS).logits, ref(IDS).logits, rtol=1e-12, atol=1e-12)  # causal, no mask
    y = torch.tensor([[1, 2, 3, 4, 0], [-100, -100, 1, 2, 3]])  # padded positions ignored
    check_operators(Logits(ref, tokens=True), Logits(ours, tokens=True), nn.CrossEntropyLoss(), [(X, y)],
                    batch_size_fn=_batch_size)


def test_bert_classifier_with_padding():
    ref = _bert()
    X = {"input_ids": IDS, "attention_mask": PAD.flip(1)}
    ours = check_conversion(ref, lambda m: m(**X).logits, ["transformers.BertSelfAttention"])
    data = [(X, torch.tensor([0, 2])), ({"input_ids": IDS.flip(0), "attention_mask": PAD}, torch.tensor([1, 1]))]
    check_operators(Logits(ref), Logits(ours), nn.CrossEntropyLoss(), data, batch_size_fn=_batch_size)


def test_vit_classifier():
    torch.manual_seed(1)
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=4, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=8, num_labels=3, hidden_dropout_prob=0.0)
    ref = transformers.ViTForImageClassification(cfg).to(DT)
    perturb_norms(ref, 1)
    pixels = torch.randn(2, 1, 8, 8, dtype=DT, generator=torch.Generator().manual_seed(1))
    ours = check_conversion(ref, lambda m: m(pixel_values=pixels).logits, ["transformers.ViTAttention"])
    check_operators(Logits(ref), Logits(ours), nn.CrossEntropyLoss(), [({"pixel_values": pixels}, torch.tensor([0, 2]))],
                    batch_size_fn=_batch_size)


def test_eager_model_is_switched_to_sdpa():
    ref = _gpt2(seed=2, n_layer=1)
    ref.set_attn_implementation("eager")
    ours = ba.convert_attention(copy.deepcopy(ref).eval())
    assert ours.config._attn_implementation == "sdpa"
    X = {"input_ids": IDS, "attention_mask": torch.ones_like(PAD)}
    torch.testing.assert_close(ours(**X).logits, ref.eval()(**X).logits, rtol=1e-12, atol=1e-12)


def test_generation_step_with_past_keys_is_refused():
    model = ba.convert_attention(_gpt2(seed=3, n_layer=1).eval())
    out = model(IDS[:, :3], use_cache=True)  # an empty cache is filled: fine
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn \(GPT2Attention\): 1 queries but 4 keys"):
        model(IDS[:, 3:4], **{name: out.past_key_values})
    assert torch.overrides._get_current_function_mode_stack() == []


def test_head_mask_call_is_refused():
    model = ba.convert_attention(_bert(seed=4, num_hidden_layers=1).eval())
    attn = model.bert.encoder.layer[0].attention.self
    h = torch.randn(2, 5, 4, dtype=DT)
    with pytest.raises(ValueError, match=r"attention\.self \(BertSelfAttention\): called with a head mask"):
        attn(h, head_mask=torch.ones(2, dtype=DT))


def test_attention_dropout_in_training_is_refused():
    check_dropout_refused(_gpt2(seed=5, n_layer=1, attn_pdrop=0.1).train(), lambda m: m(IDS),
                          r"transformer\.h\.0\.attn \(GPT2Attention\)", 0.1)


@pytest.mark.parametrize("which", ["gpt2-cross", "bert-decoder-cross"])
def test_cross_attention_is_refused(which):
    if which == "gpt2-cross":
        model, name = _gpt2(seed=6, n_layer=1, add_cross_attention=True), r"transformer\.h\.0\.crossattention \(GPT2Attention\)"
    else:
        model = transformers.BertLMHeadModel(transformers.BertConfig(
            num_hidden_layers=1, hidden_size=4, num_attention_heads=2, intermediate_size=8, vocab_size=5,
            max_position_embeddings=5, is_decoder=True, add_cross_attention=True, attention_probs_dropout_prob=0.0))
        name = r"crossattention\.self \(BertCrossAttention\)"
    model.eval()
    snapshot = copy.deepcopy(model)
    with pytest.raises(ValueError, match=name + ": cross-attention is not supported"):
        ba.convert_attention(model)
    assert_untouched(model, snapshot)


def test_rotary_grouped_query_model_is_refused():
    cfg = transformers.LlamaConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=5, max_position_embeddings=8)
    model = transformers.LlamaForCausalLM(cfg).eval()
    impl = model.config._attn_implementation
    snapshot = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn \(LlamaAttention\): rotary position "
                                         r"embeddings are not supported yet; grouped-query attention"):
        ba.convert_attention(model)
    assert_untouched(model, snapshot)
    assert model.config._attn_implementation == impl
