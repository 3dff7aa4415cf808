"""Built-in model and data: a small transformer on the paper's 5-digit addition task (SPEC §6.2).

Everything is generated in code (no downloads), deterministic given a seed.

* :func:`addition_data`: sequences ``XXXXX+YYYYY=ZZZZZZ`` (vocabulary 12: digits, ``+``=10,
  ``=``=11; the 6 digits of the sum, most significant first).
* :class:`TinyTransformer`: embedding + learned positions, ``num_layers`` blocks of
  [optional LayerNorm -> :class:`MultiheadSelfAttention` (causal) -> residual -> optional
  LayerNorm -> MLP -> residual], optional final LayerNorm, unembedding. With
  ``answer_only=True`` it returns the logits that predict the 6 answer digits as ``[N, C, 6]``,
  ready for ``nn.CrossEntropyLoss()`` with targets ``[N, 6]`` (the notebook's loss).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from backpack_attention.module import MultiheadSelfAttention

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


class AnswerReadout(nn.Module):
    """Take the logits at the last ``n`` positions and put classes second: ``[N, L, C] -> [N, C, n]``."""

    def __init__(self, n: int = N_ANSWER):
        super().__init__()
        self.n = n

    def forward(self, logits: Tensor) -> Tensor:
        return logits[:, -self.n :].transpose(1, 2)


class Block(nn.Module):
    """``x + attn(ln1(x))`` then ``x + mlp(ln2(x))`` (LayerNorms only for ``norm="pre"``)."""

    def __init__(self, d_model, num_heads, d_mlp, *, causal=True, attention="softmax", norm="none",
                 activation="relu", bias=True, dtype=None):
        super().__init__()
        kw = {"dtype": dtype}
        self.ln1 = nn.LayerNorm(d_model, **kw) if norm == "pre" else nn.Identity()
        self.attn = MultiheadSelfAttention(d_model, num_heads, bias=bias, causal=causal, attention=attention, **kw)
        self.ln2 = nn.LayerNorm(d_model, **kw) if norm == "pre" else nn.Identity()
        act = {"relu": nn.ReLU, "gelu": nn.GELU}[activation]
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp, bias=bias, **kw), act(), nn.Linear(d_mlp, d_model, bias=bias, **kw))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """Small decoder-only transformer built on :class:`MultiheadSelfAttention`.

    Args:
        vocab: vocabulary size ``C``.
        d_model: width ``E``. num_heads: heads ``H``. num_layers: blocks. d_mlp: MLP width
        (default ``4 E``). max_len: positions. causal / attention / norm ("none" or "pre") /
        activation ("relu" or "gelu") / bias: as in :class:`Block`.
        init_std: if given, every weight and embedding is drawn from ``N(0, init_std^2)`` and
            biases are zero (TransformerLens-style, ``0.8 / sqrt(d_model)`` in the paper).
        answer_only: return ``[N, C, 6]`` answer logits (see module doc) instead of ``[N, L, C]``.
    """

    def __init__(self, vocab=VOCAB, d_model=16, num_heads=1, num_layers=1, d_mlp=None, max_len=SEQ_LEN,
                 *, causal=True, attention="softmax", norm="none", activation="relu", bias=True,
                 init_std=None, answer_only=True, dtype=None):
        super().__init__()
        if norm not in ("none", "pre"):
            raise ValueError(f"norm must be 'none' or 'pre', got {norm!r}")
        d_mlp = 4 * d_model if d_mlp is None else d_mlp
        kw = {"dtype": dtype}
        self.embed = nn.Embedding(vocab, d_model, **kw)
        self.pos = nn.Embedding(max_len, d_model, **kw)
        self.blocks = nn.ModuleList(
            Block(d_model, num_heads, d_mlp, causal=causal, attention=attention, norm=norm,
                  activation=activation, bias=bias, dtype=dtype)
            for _ in range(num_layers)
        )
        self.ln_final = nn.LayerNorm(d_model, **kw) if norm == "pre" else nn.Identity()
        self.unembed = nn.Linear(d_model, vocab, bias=bias, **kw)
        self.readout = AnswerReadout() if answer_only else nn.Identity()
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
        """Token plus position embeddings ``[N, L, E]``."""
        return self.embed(X) + self.pos(torch.arange(X.shape[1], device=X.device))

    def forward(self, X: Tensor) -> Tensor:
        h = self.embedding(X)
        for block in self.blocks:
            h = block(h)
        return self.readout(self.unembed(self.ln_final(h)))

    def attention_layers(self):
        """The :class:`MultiheadSelfAttention` modules, first to last."""
        return [b.attn for b in self.blocks]


def default_problem(seed: int = 0, num_sequences: int = 64, dtype=torch.float64, **model_kwargs):
    """The built-in problem: ``(model, loss_func, (X, y))`` (1 layer, d=16, 2 heads, CE on the answers)."""
    torch.manual_seed(seed)
    kw = dict(d_model=16, num_heads=2, num_layers=1, dtype=dtype)
    kw.update(model_kwargs)
    kw.setdefault("init_std", 0.8 / kw["d_model"] ** 0.5)
    model = TinyTransformer(**kw)
    X, y = addition_data(num_sequences, seed=1234 + seed)
    return model, nn.CrossEntropyLoss(), (X, y)
