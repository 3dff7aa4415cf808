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
from reference import dense_hessian_double_backward, rel_error  # noqa: E402

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


def test_diag_and_refused_kron():
    model, loader = _problem(2)
    ours = ba.convert_attention(model)
    full = Laplace(ours, "classification", subset_of_weights="all", hessian_structure="full", backend=AttentionGGN)
    full.fit(loader)
    diag = Laplace(ours, "classification", subset_of_weights="all", hessian_structure="diag", backend=AttentionGGN)
    diag.fit(loader)
    assert rel_error(diag.H, full.H.diagonal()) < 1e-6  # full.H went through float32 (see above)
    kron = Laplace(ours, "classification", subset_of_weights="all", hessian_structure="kron", backend=AttentionGGN)
    with pytest.raises(NotImplementedError, match="kron"):
        kron.fit(loader)
