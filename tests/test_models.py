"""The one transformer class (``models.TinyTransformer``), its presets and ``torch_twin``.

The first tests pin backward compatibility: copies of the classes this one replaced
(``TinyTransformer`` before readouts/positions/padding were configurable, and the BackPACK
example ``backpack_ext.models.PreLNTransformer``) are built here with the same seed and must give
bit-identical parameters and outputs, so that the report, the studies and every seeded test keep
their numbers.
"""

from __future__ import annotations

import pytest
import torch
from backpack import backpack
from torch import nn

import backpack_attention.extensions as E
from backpack_attention import MultiheadSelfAttention, SelfAttentionAdapter, convert_attention
from backpack_attention.backpack_ext import extend
from backpack_attention.models import (
    SEQ_LEN,
    VOCAB,
    TinyTransformer,
    TorchSelfAttention,
    addition_data,
    default_problem,
    language_model,
    torch_twin,
)
from cases import DT, lm_problem

pytestmark = pytest.mark.filterwarnings("ignore:Encountered node that may break:UserWarning")


# ---- copies of the replaced classes (as they were), for the bit-identity tests -----------------
class OldAnswerReadout(nn.Module):
    def __init__(self, n=6):
        super().__init__()
        self.n = n

    def forward(self, logits):
        return logits[:, -self.n :].transpose(1, 2)


class OldBlock(nn.Module):
    def __init__(self, d_model, num_heads, d_mlp, *, causal=True, attention="softmax", norm="none",
                 activation="relu", bias=True, dtype=None):
        super().__init__()
        kw = {"dtype": dtype}
        self.ln1 = nn.LayerNorm(d_model, **kw) if norm == "pre" else nn.Identity()
        self.attn = MultiheadSelfAttention(d_model, num_heads, bias=bias, causal=causal, attention=attention, **kw)
        self.ln2 = nn.LayerNorm(d_model, **kw) if norm == "pre" else nn.Identity()
        act = {"relu": nn.ReLU, "gelu": nn.GELU}[activation]
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp, bias=bias, **kw), act(), nn.Linear(d_mlp, d_model, bias=bias, **kw))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class OldTinyTransformer(nn.Module):
    def __init__(self, vocab=VOCAB, d_model=16, num_heads=1, num_layers=1, d_mlp=None, max_len=SEQ_LEN,
                 *, causal=True, attention="softmax", norm="none", activation="relu", bias=True,
                 init_std=None, answer_only=True, dtype=None):
        super().__init__()
        d_mlp = 4 * d_model if d_mlp is None else d_mlp
        kw = {"dtype": dtype}
        self.embed = nn.Embedding(vocab, d_model, **kw)
        self.pos = nn.Embedding(max_len, d_model, **kw)
        self.blocks = nn.ModuleList(
            OldBlock(d_model, num_heads, d_mlp, causal=causal, attention=attention, norm=norm,
                     activation=activation, bias=bias, dtype=dtype)
            for _ in range(num_layers)
        )
        self.ln_final = nn.LayerNorm(d_model, **kw) if norm == "pre" else nn.Identity()
        self.unembed = nn.Linear(d_model, vocab, bias=bias, **kw)
        self.readout = OldAnswerReadout() if answer_only else nn.Identity()
        if init_std is not None:
            with torch.no_grad():
                for name, p in self.named_parameters():
                    if "ln" in name:
                        continue
                    if p.dim() >= 2:
                        p.normal_(0.0, init_std)
                    else:
                        p.zero_()

    def forward(self, X):
        h = self.embed(X) + self.pos(torch.arange(X.shape[1], device=X.device))
        for block in self.blocks:
            h = block(h)
        return self.readout(self.unembed(self.ln_final(h)))


def old_default_problem(seed=0, num_sequences=64, dtype=torch.float64, **model_kwargs):
    torch.manual_seed(seed)
    kw = dict(d_model=16, num_heads=2, num_layers=1, dtype=dtype)
    kw.update(model_kwargs)
    kw.setdefault("init_std", 0.8 / kw["d_model"] ** 0.5)
    model = OldTinyTransformer(**kw)
    X, y = addition_data(num_sequences, seed=1234 + seed)
    return model, nn.CrossEntropyLoss(), (X, y)


class OldPreLNBlock(nn.Module):
    def __init__(self, d_model, num_heads, d_mlp, *, causal=True, dtype=None):
        super().__init__()
        kw = {"dtype": dtype}
        self.ln1 = nn.LayerNorm(d_model, **kw)
        self.attn = MultiheadSelfAttention(d_model, num_heads, causal=causal, **kw)
        self.ln2 = nn.LayerNorm(d_model, **kw)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp, **kw), nn.GELU(), nn.Linear(d_mlp, d_model, **kw))

    def forward(self, x, key_padding_mask=None):
        x = x + self.attn(self.ln1(x), key_padding_mask)
        return x + self.mlp(self.ln2(x))


class OldPreLNTransformer(nn.Module):
    """``PreLNTransformer(attention="ours")`` as it was."""

    def __init__(self, vocab=8, d_model=16, num_heads=2, num_layers=2, d_mlp=None, *, causal=True,
                 seq_len=None, readout="token", dtype=None):
        super().__init__()
        self.readout = readout
        d_mlp = 4 * d_model if d_mlp is None else d_mlp
        self.embed = nn.Embedding(vocab, d_model, dtype=dtype)
        self.blocks = nn.ModuleList(OldPreLNBlock(d_model, num_heads, d_mlp, causal=causal, dtype=dtype)
                                    for _ in range(num_layers))
        width = d_model if readout == "token" else seq_len * d_model
        self.head = nn.Linear(width, vocab, dtype=dtype)

    def forward(self, X, key_padding_mask=None):
        h = self.embed(X)
        for block in self.blocks:
            h = block(h, key_padding_mask)
        if self.readout == "sequence":
            return self.head(h.flatten(1))
        return self.head(h).permute(0, 2, 1)


def assert_same_parameters(new: nn.Module, old: nn.Module, rename=lambda n: n):
    new_p = dict(new.named_parameters())
    old_p = {rename(n): p for n, p in old.named_parameters()}
    assert list(new_p) == list(old_p)  # same names, same creation order
    for n, p in new_p.items():
        assert p.dtype == old_p[n].dtype and torch.equal(p, old_p[n]), n


# ---- bit-identity with the replaced classes ------------------------------------------------------
CONFIGS = [
    {},
    dict(d_model=8, num_heads=2, num_layers=2, d_mlp=16, dtype=DT),
    dict(d_model=8, num_heads=2, num_layers=2, d_mlp=16, norm="pre", dtype=DT),
    dict(d_model=12, num_heads=3, num_layers=2, norm="pre", attention="linear", activation="gelu",
         bias=False, causal=False, dtype=DT),
    dict(d_model=16, num_heads=2, init_std=0.2, norm="pre", dtype=DT),
    dict(vocab=5, d_model=4, num_heads=2, num_layers=2, d_mlp=6, max_len=6, norm="pre", activation="gelu",
         answer_only=False, dtype=DT),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
def test_tiny_transformer_bit_identical_to_previous_class(cfg):
    new_cfg = dict(cfg)
    if "answer_only" in new_cfg:
        new_cfg["readout"] = "answer" if new_cfg.pop("answer_only") else "logits"
    torch.manual_seed(11)
    old = OldTinyTransformer(**cfg)
    after_old = torch.rand(3)  # the RNG is left where it was, too
    torch.manual_seed(11)
    new = TinyTransformer(**new_cfg)
    assert torch.equal(torch.rand(3), after_old)
    assert_same_parameters(new, old)
    vocab, L = cfg.get("vocab", VOCAB), min(cfg.get("max_len", SEQ_LEN), 17)
    X = torch.randint(0, vocab, (5, L), generator=torch.Generator().manual_seed(0))
    assert torch.equal(new(X), old(X))


def test_answer_only_alias_is_deprecated_but_works():
    for flag, readout in ((True, "answer"), (False, "logits")):
        torch.manual_seed(0)
        with pytest.warns(DeprecationWarning, match="answer_only"):
            a = TinyTransformer(answer_only=flag)
        torch.manual_seed(0)
        b = TinyTransformer(readout=readout)
        assert a.readout_kind == readout
        assert_same_parameters(a, b)
    with pytest.raises(ValueError, match="contradicts"), pytest.warns(DeprecationWarning):
        TinyTransformer(answer_only=True, readout="token")


@pytest.mark.parametrize("kwargs", [dict(), dict(seed=3, num_sequences=6, d_model=12, num_heads=3, num_layers=2,
                                                  norm="pre", attention="linear"),
                                    dict(seed=1, num_sequences=5, dtype=torch.float32, activation="gelu", init_std=0.5)])
def test_default_problem_bit_identical_to_previous(kwargs):
    m_new, loss_new, (X_new, y_new) = default_problem(**kwargs)
    m_old, loss_old, (X_old, y_old) = old_default_problem(**kwargs)
    assert_same_parameters(m_new, m_old)
    assert torch.equal(X_new, X_old) and torch.equal(y_new, y_old)
    out = m_new(X_new)
    assert out.shape == (X_new.shape[0], VOCAB, 6)
    assert torch.equal(out, m_old(X_old))
    assert torch.equal(loss_new(out, y_new), loss_old(m_old(X_old), y_old))


@pytest.mark.parametrize("readout", ["token", "sequence"])
@pytest.mark.parametrize("causal", [True, False])
def test_language_model_bit_identical_to_previous_prelntransformer(readout, causal):
    torch.manual_seed(5)
    old = OldPreLNTransformer(7, 8, 2, 2, 12, causal=causal, seq_len=4, readout=readout, dtype=DT)
    torch.manual_seed(5)
    new = language_model(7, 8, 2, 2, 12, causal=causal, readout=readout, max_len=4, dtype=DT)
    assert_same_parameters(new, old, lambda n: n.replace("head.", "unembed."))
    X = torch.randint(0, 7, (3, 4))
    kpm = torch.zeros(3, 4, dtype=torch.bool)
    kpm[1, -2:] = True
    for mask in (None, kpm):
        out = new(X, mask)
        assert out.shape == ((3, 7, 4) if readout == "token" else (3, 7))
        assert torch.equal(out, old(X, mask))


# ---- the configurable class ------------------------------------------------------------------------
def test_readouts_share_one_network():
    """"token", "logits", "answer" are views of the same logits; "sequence" reads the flattened states."""
    X, _ = addition_data(4, seed=0)
    outs = {}
    for readout in ("token", "logits", "answer"):
        torch.manual_seed(0)
        outs[readout] = TinyTransformer(d_model=8, num_heads=2, norm="pre", readout=readout, dtype=DT)(X)
    L = X.shape[1]
    assert outs["logits"].shape == (4, L, VOCAB)
    assert torch.equal(outs["token"], outs["logits"].permute(0, 2, 1))
    assert torch.equal(outs["answer"], outs["token"][:, :, -6:])
    torch.manual_seed(0)
    seq = TinyTransformer(d_model=8, num_heads=2, max_len=L, readout="sequence", dtype=DT)
    assert seq.unembed.in_features == L * 8 and seq(X).shape == (4, VOCAB)


def test_key_padding_mask_reaches_every_layer_and_options():
    torch.manual_seed(0)
    model = TinyTransformer(d_model=8, num_heads=2, num_layers=2, causal=False, positions=False, final_norm=True,
                            readout="token", dtype=DT)
    assert model.pos is None and isinstance(model.ln_final, nn.LayerNorm)
    X = torch.randint(0, VOCAB, (2, 5))
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[0, -2:] = True
    out = model(X, kpm)
    # padded keys are ignored: changing the padded tokens leaves the other positions unchanged
    X2 = X.clone()
    X2[0, -2:] = (X[0, -2:] + 1) % VOCAB
    assert torch.allclose(model(X2, kpm)[0, :, :3], out[0, :, :3], rtol=0, atol=1e-13)
    assert not torch.allclose(model(X2)[0, :, :3], model(X)[0, :, :3])


def test_invalid_arguments():
    with pytest.raises(ValueError, match="readout"):
        TinyTransformer(readout="mean")
    with pytest.raises(ValueError, match="norm"):
        TinyTransformer(norm="post")
    with pytest.raises(ValueError, match="activation"):
        TinyTransformer(activation="tanh")
    with pytest.raises(ValueError, match="max_len"):
        language_model(readout="sequence")
    with pytest.raises(ValueError, match="max_len"):
        TinyTransformer(readout="sequence", max_len=None, positions=False)


# ---- BackPACK conversion ---------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["none", "pre"])
@pytest.mark.parametrize("readout", ["token", "sequence"])
def test_backpack_converts_the_model(norm, readout):
    torch.manual_seed(0)
    model = TinyTransformer(6, 8, 2, 2, 12, max_len=4, norm=norm, activation="gelu", positions=False,
                            readout=readout, dtype=DT)
    X = torch.randint(0, 6, (3, 4))
    y = torch.randint(0, 6, (3, 4) if readout == "token" else (3,))
    ext = extend(model, use_converter=True)
    assert torch.allclose(ext(X), model(X), rtol=0, atol=1e-14)
    with backpack(E.BatchGrad(), E.DiagGGNExact()):
        extend(nn.CrossEntropyLoss())(ext(X), y).backward()
    for n, p in ext.named_parameters():
        assert p.grad_batch.shape == (3, *p.shape) and p.diag_ggn_exact.shape == p.shape, n


# ---- torch_twin ------------------------------------------------------------------------------------
def _shares_storage(a: nn.Module, b: nn.Module) -> bool:
    return bool({p.data_ptr() for p in a.parameters()} & {p.data_ptr() for p in b.parameters()})


def test_torch_twin_of_default_problem():
    model, loss_func, (X, y) = default_problem(num_sequences=8)
    twin = torch_twin(model)
    assert not any(isinstance(m, MultiheadSelfAttention) for m in twin.modules())
    assert all(isinstance(a, TorchSelfAttention) and isinstance(a.mha, nn.MultiheadAttention)
               for a in twin.attention_layers())
    assert isinstance(model.blocks[0].attn, MultiheadSelfAttention)  # the original is untouched
    assert not _shares_storage(model, twin)
    assert sum(p.numel() for p in twin.parameters()) == sum(p.numel() for p in model.parameters())
    assert torch.allclose(twin(X), model(X), rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq_len", [None, 4])
def test_torch_twin_masks(causal, seq_len):
    model, X, _ = lm_problem(causal)
    twin = torch_twin(model, seq_len=seq_len)
    assert (twin.blocks[0].attn.causal_mask is not None) == (causal and seq_len is not None)
    kpm = torch.zeros_like(X, dtype=torch.bool)
    kpm[0, -1] = True
    kpm[2, -2:] = True
    for mask in (None, kpm):
        assert torch.allclose(twin(X, mask), model(X, mask), rtol=0, atol=1e-12)
    # the "user has nn.MultiheadAttention" path: convert the twin back
    converted = convert_attention(torch_twin(model, seq_len=seq_len))
    assert isinstance(converted.blocks[1].attn.mha, SelfAttentionAdapter)
    assert torch.allclose(converted(X, kpm), model(X, kpm), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mask_dtype", [torch.bool, DT])
def test_torch_twin_attention_with_attn_mask(mask_dtype):
    torch.manual_seed(0)
    attn = MultiheadSelfAttention(8, 2, causal=True, dtype=DT)
    blocked = torch.zeros(5, 5, dtype=torch.bool)
    blocked[3, 1] = blocked[4, 0] = True
    mask = blocked if mask_dtype == torch.bool else torch.zeros(5, 5, dtype=DT).masked_fill(blocked, float("-inf"))
    x = torch.randn(3, 5, 8, dtype=DT)
    twin = torch_twin(attn)  # a top-level attention becomes a TorchSelfAttention
    assert isinstance(twin, TorchSelfAttention)
    assert torch.allclose(twin(x, attn_mask=mask), attn(x, attn_mask=mask), rtol=0, atol=1e-12)
    assert torch.allclose(twin(x), attn(x), rtol=0, atol=1e-12)


def test_torch_twin_keeps_sharing_and_handles_adapters():
    torch.manual_seed(0)
    attn = MultiheadSelfAttention(8, 2, dtype=DT)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = attn, attn
            self.adapter = SelfAttentionAdapter.from_torch(nn.MultiheadAttention(8, 2, batch_first=True, dtype=DT))

        def forward(self, x):
            h = x + self.b(x + self.a(x))
            return self.adapter(h, h, h, need_weights=False)[0]

    model = Shared()
    twin = torch_twin(model)
    assert twin.a is twin.b and isinstance(twin.a, TorchSelfAttention)
    assert type(twin.adapter) is nn.MultiheadAttention
    x = torch.randn(2, 5, 8, dtype=DT)
    assert torch.allclose(twin(x), model(x), rtol=0, atol=1e-12)


def test_torch_twin_rejects_linear_attention():
    torch.manual_seed(0)
    model = TinyTransformer(d_model=8, num_heads=2, attention="linear")
    with pytest.raises(ValueError, match="blocks.0.attn.*linear"):
        torch_twin(model)
    with pytest.raises(TypeError):
        torch_twin("model")
