"""Small models and data the tests share (float64, seeded; built on ``backpack_attention.models``).

* :func:`lm_problem`: the 2-block pre-LN language model of the BackPACK tests
  (:func:`~backpack_attention.models.language_model`) with non-trivial parameters, and tokens.
* :func:`addition_model`: the 2-block :class:`~backpack_attention.models.TinyTransformer` on the
  addition task (answer logits ``[N, C, 6]``) of the operator tests.

The nn.MultiheadAttention version of any of them is ``backpack_attention.models.torch_twin(model)``.
"""

from __future__ import annotations

import torch

from backpack_attention.models import TinyTransformer, language_model

DT = torch.float64
# language model: batch, length, vocabulary, width, heads, MLP width
N, L, C, D, HEADS, MLP = 3, 4, 5, 8, 2, 12


def perturb(model, scale: float = 0.3, which=None):
    """Add ``scale * randn`` to the parameters (those whose name ``which(name)`` accepts), in place;
    makes LayerNorm affine parameters and biases non-trivial. Draws from torch's global RNG."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if which is None or which(name):
                p.add_(scale * torch.randn_like(p))
    return model


def lm_problem(causal: bool = True, seed: int = 0, readout: str = "token", d: int = D, mlp: int = MLP):
    """``(model, X, y)``: :func:`language_model` (vocabulary ``C``, width ``d``, ``HEADS`` heads, 2
    blocks, MLP width ``mlp``; every parameter perturbed by ``0.3 randn``), tokens ``X [N, L]`` and
    targets ``y`` (``[N, L]`` for ``readout="token"``, ``[N]`` for ``"sequence"``)."""
    torch.manual_seed(seed)
    model = language_model(C, d, HEADS, 2, mlp, causal=causal, readout=readout, max_len=L, dtype=DT)
    perturb(model)
    X = torch.randint(0, C, (N, L))
    y = torch.randint(0, C, (N, L) if readout == "token" else (N,))
    return model, X, y


def addition_model(seed: int = 0, *, norm: str = "none", perturb_scale: float = 0.0, **kwargs) -> TinyTransformer:
    """2-block :class:`TinyTransformer` (d=8, 2 heads, MLP 16, float64) for the addition task; with
    ``perturb_scale`` its LayerNorm parameters and biases get ``perturb_scale * randn`` added."""
    torch.manual_seed(seed)
    model = TinyTransformer(d_model=8, num_heads=2, num_layers=2, d_mlp=16, norm=norm, dtype=DT, **kwargs)
    if perturb_scale:
        perturb(model, perturb_scale, lambda n: "ln" in n or "bias" in n)
    return model
