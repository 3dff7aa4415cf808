"""Built-in model and data: a small transformer on the paper's 5-digit addition task (docs/math.md §6.2).

Everything is generated in code (no downloads), deterministic given a seed.

* :func:`addition_data`: sequences ``XXXXX+YYYYY=ZZZZZZ`` (vocabulary 12: digits, ``+``=10,
  ``=``=11; the 6 digits of the sum, most significant first).
* :class:`TinyTransformer`: the one transformer of the package. Embedding [+ learned positions],
  ``num_layers`` blocks of [optional LayerNorm -> :class:`MultiheadSelfAttention` (softmax or
  linear, causal or not, optional ``key_padding_mask``) -> residual -> optional LayerNorm -> MLP
  (ReLU or GELU) -> residual], optional final LayerNorm, unembedding, and a readout:

  ========== ============ ==========================================================
  readout    output       use
  ========== ============ ==========================================================
  "answer"   ``[N, C, 6]`` logits of the 6 answer digits (addition task, the default)
  "token"    ``[N, C, L]`` every position, classes second (token-level CE)
  "sequence" ``[N, C]``    one prediction from the flattened last hidden states
  "logits"   ``[N, L, C]`` the unembedding's output as is
  ========== ============ ==========================================================

  All outputs are ready for ``nn.CrossEntropyLoss()`` except ``"logits"``.
* :func:`language_model`: the BackPACK-ready preset of :class:`TinyTransformer` (pre-LN, GELU,
  no positions, no final LayerNorm, token or sequence readout).
* :class:`LinearProjectionAttention`: a softmax attention layer as four ``nn.Linear`` projections
  (what generic KFAC sees; the yardstick for ``kfac_approx="expand"/"reduce"``).
* :func:`torch_twin`: a copy of any model with each :class:`MultiheadSelfAttention` computed by
  ``nn.MultiheadAttention`` (same weights, same masks, same outputs): the model a user without
  this package has.

BackPACK: with ``readout="token"``/``"sequence"``/``"logits"`` and ``positions=False`` the model
is a chain of modules BackPACK knows, joined by plain tensor ops (residual ``+``, ``permute``,
``flatten``): extend it with ``backpack_attention.backpack_ext.extend(model, use_converter=True)``.
(Learned positions are added without a batch axis, which BackPACK's converter cannot handle; the
``"answer"`` readout slices positions, which BackPACK has no module for.)
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from backpack_attention.module import MultiheadSelfAttention, SelfAttentionAdapter

VOCAB = 12
PLUS, EQUALS = 10, 11
N_DIGITS = 5
SEQ_LEN = 2 * N_DIGITS + 2 + N_DIGITS + 1  # 18 tokens
N_ANSWER = N_DIGITS + 1


def addition_data(num_sequences: int = 64, seed: int = 1234, *, device=None):
    """Tokens for 5-digit addition and the answer targets.

    Returns:
        ``(X, y)``: ``X`` ``[N, 17]`` long (the sequence without its last token, the model
        input) and ``y`` ``[N, 6]`` long (the 6 answer digits, predicted from positions 11..16).
    """
    if not isinstance(num_sequences, int) or num_sequences <= 0:
        raise ValueError(f"num_sequences must be a positive int, got {num_sequences!r}")
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 10, (num_sequences, N_DIGITS), generator=g)
    b = torch.randint(0, 10, (num_sequences, N_DIGITS), generator=g)
    # In 20% of the sequences, make 20% of the digit pairs sum to 9 (carry cascades).
    special = torch.rand(num_sequences, 1, generator=g) < 0.2
    pair = torch.rand(num_sequences, N_DIGITS, generator=g) < 0.2
    b = torch.where(special & pair, 9 - a, b)
    place = 10 ** torch.arange(N_DIGITS - 1, -1, -1)
    total = (a * place).sum(1) + (b * place).sum(1)
    digits = torch.stack([(total // 10**k) % 10 for k in range(N_ANSWER - 1, -1, -1)], dim=1)
    tokens = torch.cat(
        [a, torch.full((num_sequences, 1), PLUS), b, torch.full((num_sequences, 1), EQUALS), digits], dim=1
    )
    X, y = tokens[:, :-1], tokens[:, -N_ANSWER:]
    return X.to(device), y.to(device)


READOUTS = ("answer", "token", "sequence", "logits")


class AnswerReadout(nn.Module):
    """Take the logits at the last ``n`` positions and put classes second: ``[N, L, C] -> [N, C, n]``."""

    def __init__(self, n: int = N_ANSWER):
        super().__init__()
        self.n = n

    def forward(self, logits: Tensor) -> Tensor:
        return logits[:, -self.n :].transpose(1, 2)


class Block(nn.Module):
    """``x + attn(ln1(x))`` then ``x + mlp(ln2(x))`` (LayerNorms only for ``norm="pre"``).

    ``forward(x, key_padding_mask=None)``: ``x [N, L, E]``; the mask (bool ``[N, L]``, ``True`` =
    ignore that key) goes to the attention layer.
    """

    def __init__(self, d_model, num_heads, d_mlp, *, causal=True, attention="softmax", norm="none",
                 activation="relu", bias=True, dtype=None):
        super().__init__()
        if norm not in ("none", "pre"):
            raise ValueError(f"norm must be 'none' or 'pre', got {norm!r}")
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")
        kw = {"dtype": dtype}
        self.prenorm = norm == "pre"
        # the creation order (ln1, attn, ln2, mlp) fixes the random initialisation: keep it
        self.ln1 = nn.LayerNorm(d_model, **kw) if self.prenorm else nn.Identity()
        self.attn = MultiheadSelfAttention(d_model, num_heads, bias=bias, causal=causal, attention=attention, **kw)
        self.ln2 = nn.LayerNorm(d_model, **kw) if self.prenorm else nn.Identity()
        act = {"relu": nn.ReLU, "gelu": nn.GELU}[activation]
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp, bias=bias, **kw), act(), nn.Linear(d_mlp, d_model, bias=bias, **kw))

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        # Python-level branches (constant under torch.fx): without norms, no Identity module is
        # called, so BackPACK's converted graph holds only the modules that compute something.
        h = self.ln1(x) if self.prenorm else x
        x = x + self.attn(h, key_padding_mask)
        h = self.ln2(x) if self.prenorm else x
        return x + self.mlp(h)


class TinyTransformer(nn.Module):
    """Small decoder-only transformer built on :class:`MultiheadSelfAttention`.

    Args:
        vocab: vocabulary size ``C`` (input tokens and output classes).
        d_model: width ``E``. num_heads: heads ``H``. num_layers: blocks. d_mlp: MLP width
            (default ``4 E``).
        max_len: number of learned positions, and for ``readout="sequence"`` the sequence length
            (inputs must then have exactly ``max_len`` tokens).
        causal: causal attention. attention: ``"softmax"`` or ``"linear"``. norm: ``"none"`` or
            ``"pre"`` (LayerNorm before attention and MLP). activation: ``"relu"`` or ``"gelu"``.
            bias: biases in attention, MLP and unembedding.
        init_std: if given, every weight and embedding is drawn from ``N(0, init_std^2)`` and
            biases are zero (TransformerLens-style, ``0.8 / sqrt(d_model)`` in the paper).
        readout: ``"answer"`` (default), ``"token"``, ``"sequence"`` or ``"logits"`` (module doc).
        positions: learned position embeddings (``max_len`` of them) added to the tokens'.
        final_norm: LayerNorm before the unembedding (default: ``norm == "pre"``).
        answer_only: deprecated alias: ``True`` is ``readout="answer"``, ``False`` ``readout="logits"``.
        dtype: parameter dtype.

    ``forward(X, key_padding_mask=None)``: tokens ``X [N, L]`` (long); ``key_padding_mask`` bool
    ``[N, L]`` (``True`` = padding, ignored as a key) is passed to every attention layer.

    Parameters are created in the order embed, pos, blocks, ln_final, unembed (each only if
    present), so a seed gives the same weights as earlier versions of this class.
    """

    def __init__(self, vocab=VOCAB, d_model=16, num_heads=1, num_layers=1, d_mlp=None, max_len=SEQ_LEN,
                 *, causal=True, attention="softmax", norm="none", activation="relu", bias=True,
                 init_std=None, readout=None, positions=True, final_norm=None, answer_only=None, dtype=None):
        super().__init__()
        if norm not in ("none", "pre"):
            raise ValueError(f"norm must be 'none' or 'pre', got {norm!r}")
        if answer_only is not None:
            warnings.warn("TinyTransformer(answer_only=...) is deprecated: use readout='answer' (True) "
                          "or readout='logits' (False)", DeprecationWarning, stacklevel=2)
            alias = "answer" if answer_only else "logits"
            if readout is not None and readout != alias:
                raise ValueError(f"answer_only={answer_only} contradicts readout={readout!r}")
            readout = alias
        readout = "answer" if readout is None else readout
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        if (readout == "sequence" or positions) and (not isinstance(max_len, int) or max_len <= 0):
            raise ValueError(f"max_len must be a positive int (positions / readout='sequence'), got {max_len!r}")
        d_mlp = 4 * d_model if d_mlp is None else d_mlp
        kw = {"dtype": dtype}
        self.readout_kind = readout
        self.max_len = max_len
        self.final_norm = norm == "pre" if final_norm is None else bool(final_norm)
        self.embed = nn.Embedding(vocab, d_model, **kw)
        self.pos = nn.Embedding(max_len, d_model, **kw) if positions else None
        self.blocks = nn.ModuleList(
            Block(d_model, num_heads, d_mlp, causal=causal, attention=attention, norm=norm,
                  activation=activation, bias=bias, dtype=dtype)
            for _ in range(num_layers)
        )
        self.ln_final = nn.LayerNorm(d_model, **kw) if self.final_norm else nn.Identity()
        width = max_len * d_model if readout == "sequence" else d_model
        self.unembed = nn.Linear(width, vocab, bias=bias, **kw)
        # a module only for the answer readout; "token" and "sequence" are plain tensor ops in
        # forward (BackPACK's converter turns them into Permute / Flatten)
        self.readout = AnswerReadout() if readout == "answer" else None
        if init_std is not None:
            with torch.no_grad():
                for name, p in self.named_parameters():
                    if "ln" in name:
                        continue
                    if p.dim() >= 2:
                        p.normal_(0.0, init_std)
                    else:
                        p.zero_()

    def embedding(self, X: Tensor) -> Tensor:
        """Token (plus position) embeddings ``[N, L, E]``."""
        h = self.embed(X)
        if self.pos is None:
            return h
        return h + self.pos(torch.arange(X.shape[1], device=X.device))

    def forward(self, X: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        h = self.embedding(X)
        for block in self.blocks:
            h = block(h, key_padding_mask)
        if self.final_norm:
            h = self.ln_final(h)
        if self.readout_kind == "sequence":
            h = h.flatten(1)
        out = self.unembed(h)
        if self.readout_kind == "token":
            out = out.permute(0, 2, 1)
        if self.readout is not None:
            out = self.readout(out)
        return out

    def attention_layers(self):
        """The attention modules, first to last (:class:`MultiheadSelfAttention`, or in a
        :func:`torch_twin` the :class:`TorchSelfAttention` in their place)."""
        return [b.attn for b in self.blocks]


def language_model(vocab: int = 8, d_model: int = 16, num_heads: int = 2, num_layers: int = 2,
                   d_mlp: Optional[int] = None, *, causal: bool = True, readout: str = "token",
                   max_len: Optional[int] = None, dtype=None) -> TinyTransformer:
    """The BackPACK-ready preset: ``Embedding -> [LayerNorm -> attention -> residual -> LayerNorm ->
    MLP(GELU) -> residual] x num_layers -> Linear``, no positions, no final LayerNorm.

    ``readout="token"`` returns logits ``[N, C, L]`` (next-token prediction with
    ``nn.CrossEntropyLoss``), ``readout="sequence"`` ``[N, C]`` (needs ``max_len``, the sequence
    length). Extend it with ``backpack_attention.backpack_ext.extend(model, use_converter=True)``.
    """
    if readout not in ("token", "sequence"):
        raise ValueError(f"readout must be 'token' or 'sequence', got {readout!r}")
    if readout == "sequence" and max_len is None:
        raise ValueError("readout='sequence' needs max_len (the sequence length)")
    return TinyTransformer(vocab, d_model, num_heads, num_layers, d_mlp, max_len, causal=causal, norm="pre",
                           activation="gelu", readout=readout, positions=False, final_norm=False, dtype=dtype)


class TorchSelfAttention(nn.Module):
    """``nn.MultiheadAttention(batch_first=True)`` behind :class:`MultiheadSelfAttention`'s call
    signature ``(x, key_padding_mask=None, attn_mask=None)``, causal mask included.

    The child :attr:`mha` holds the parameters (``in_proj_weight``, ``in_proj_bias``,
    ``out_proj.weight``, ``out_proj.bias``, the order of ours); ``ba.convert_attention`` /
    ``ba.extend`` turn it into a :class:`~backpack_attention.SelfAttentionAdapter` like any
    ``nn.MultiheadAttention``.

    ``seq_len``: for a causal layer, store the ``[seq_len, seq_len]`` causal mask as a buffer
    (inputs must then have exactly ``seq_len`` tokens) instead of building it for each call. BackPACK's
    torch.fx converter (``extend(..., use_converter=True)``) needs this: it cannot handle the ops
    that build the mask when they repeat in several layers.
    """

    def __init__(self, attn: MultiheadSelfAttention, seq_len: Optional[int] = None):
        super().__init__()
        self.mha = attn.to_torch(batch_first=True)
        self.causal = attn.causal
        mask = None
        if attn.causal and seq_len is not None:
            mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=attn.in_proj_weight.device).triu(1)
        self.register_buffer("causal_mask", mask, persistent=False)

    def extra_repr(self) -> str:
        return f"causal={self.causal}"

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None):
        mask = attn_mask
        if self.causal:
            if self.causal_mask is not None:
                future = self.causal_mask
            else:
                L = x.shape[1]
                future = x.new_ones(L, L, dtype=torch.bool).triu(1)
            if attn_mask is None:
                mask = future
            elif attn_mask.dtype == torch.bool:
                mask = attn_mask | future
            else:
                mask = attn_mask.masked_fill(future, float("-inf"))
        # is_causal is only a hint that mask is the causal mask (torch may then use a fused kernel)
        return self.mha(x, x, x, key_padding_mask=key_padding_mask, need_weights=False, attn_mask=mask,
                        is_causal=self.causal and attn_mask is None)[0]


class LinearProjectionAttention(nn.Module):
    """A softmax :class:`MultiheadSelfAttention` computed from four ``nn.Linear`` projections ``q``,
    ``k``, ``v``, ``o`` (copies of ``W_Q``, ``W_K``, ``W_V``, ``W_O`` and the biases; same outputs,
    causal and ``key_padding_mask`` included): the layer as generic KFAC (curvlinops' and BackPACK's)
    sees it, a chain of ``nn.Linear`` on ``[N, L, E]`` inputs.

    :meth:`linear_params` lists the projections' parameters in the order of ``attn.parameters()``
    (``W_Q, W_K, W_V``, then ``b_Q, b_K, b_V``, then ``o``'s weight and bias).
    """

    def __init__(self, attn: MultiheadSelfAttention):
        super().__init__()
        if attn.attention != "softmax":
            raise ValueError(f"LinearProjectionAttention: only softmax attention, got attention={attn.attention!r}")
        self.layout, self.causal = attn.layout, attn.causal
        E, bias = attn.embed_dim, attn.bias
        kw = dict(bias=bias, dtype=attn.in_proj_weight.dtype, device=attn.in_proj_weight.device)
        self.q, self.k, self.v, self.o = (nn.Linear(E, E, **kw) for _ in range(4))
        flat = torch.cat([p.detach().reshape(-1) for p in attn.parameters()])
        with torch.no_grad():
            for lin, w, b in ((self.q, "W_Q", "b_Q"), (self.k, "W_K", "b_K"), (self.v, "W_V", "b_V")):
                lin.weight.copy_(flat[self.layout.param_index(w)].view(E, E))
                if bias:
                    lin.bias.copy_(flat[self.layout.param_index(b)])
            self.o.weight.copy_(attn.out_proj_weight)
            if bias:
                self.o.bias.copy_(attn.out_proj_bias)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        Q, K, V = (self.layout.split_heads(f(x)) for f in (self.q, self.k, self.v))
        S = Q @ K.transpose(-1, -2) / math.sqrt(self.layout.head_dim)
        if self.causal:
            L = x.shape[1]
            S = S.masked_fill(torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        if key_padding_mask is not None:
            S = S.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        return self.o(self.layout.merge_heads(S.softmax(-1) @ V))

    def linear_params(self):
        ps = [self.q.weight, self.k.weight, self.v.weight]
        if self.q.bias is not None:
            ps += [self.q.bias, self.k.bias, self.v.bias]
        return ps + list(self.o.parameters())


def torch_twin(model: nn.Module, seq_len: Optional[int] = None) -> nn.Module:
    """A deep copy of ``model`` in which every :class:`MultiheadSelfAttention` computes with
    ``nn.MultiheadAttention(batch_first=True)`` (same weights, see
    :meth:`MultiheadSelfAttention.to_torch`), called with the same causal / padding / attention
    masks: same outputs, nothing shared with ``model``.

    Each attention becomes a :class:`TorchSelfAttention` (its ``nn.MultiheadAttention`` is the
    child ``mha``); a :class:`SelfAttentionAdapter` (a converted ``nn.MultiheadAttention``)
    becomes the plain ``nn.MultiheadAttention`` again. A module used in several places stays
    shared. Linear attention has no ``nn.MultiheadAttention`` counterpart and raises
    ``ValueError`` naming the module.

    ``seq_len``: a fixed sequence length; causal masks are then buffers, which BackPACK's torch.fx
    converter (``ba.extend(twin, use_converter=True)``) needs (see :class:`TorchSelfAttention`).
    Without it the masks are built for each call's length (fine for eager use, torch.func, curvlinops).

    Note: in eval mode without gradients, ``nn.MultiheadAttention`` may take its fused fast path
    (nested tensors with a ``key_padding_mask``), whose outputs at padded positions can differ;
    disable it (``torch.backends.mha.set_fastpath_enabled(False)``) for exact comparisons.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    twin = copy.deepcopy(model)
    done = {}

    def replacement(m: nn.Module, name: str) -> Optional[nn.Module]:
        if id(m) in done:
            return done[id(m)]
        if isinstance(m, MultiheadSelfAttention):
            if m.attention != "softmax":
                raise ValueError(f"torch_twin: {name}: {m.attention!r} attention has no nn.MultiheadAttention counterpart")
            new = TorchSelfAttention(m, seq_len)
        elif isinstance(m, SelfAttentionAdapter):
            if m.attention.causal:
                raise ValueError(f"torch_twin: {name}: adapter around a causal attention has no "
                                 "nn.MultiheadAttention counterpart")
            new = m.to_torch()
        else:
            return None
        done[id(m)] = new
        return new

    top = replacement(twin, "model")
    if top is not None:
        return top

    def swap(parent: nn.Module, prefix: str) -> None:
        # _modules, not named_children(): the latter skips a module registered twice in one parent
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            name = f"{prefix}{child_name}"
            new = replacement(child, name)
            if new is not None:
                setattr(parent, child_name, new)
            elif id(child) not in done:
                done[id(child)] = None
                swap(child, name + ".")

    swap(twin, "")
    return twin


def default_problem(seed: int = 0, num_sequences: int = 64, dtype=torch.float64, **model_kwargs):
    """The built-in problem: ``(model, loss_func, (X, y))`` (1 layer, d=16, 2 heads, CE on the answers)."""
    torch.manual_seed(seed)
    kw = dict(d_model=16, num_heads=2, num_layers=1, dtype=dtype)
    kw.update(model_kwargs)
    kw.setdefault("init_std", 0.8 / kw["d_model"] ** 0.5)
    model = TinyTransformer(**kw)
    X, y = addition_data(num_sequences, seed=1234 + seed)
    return model, nn.CrossEntropyLoss(), (X, y)
