"""No silent wrong answers: inputs the math does not cover get a clear error before any work, and
cached operators notice changed parameters and inputs (each case failed silently before)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import backpack_attention as ba
from backpack_attention import AttentionGGNLinearOperator, AttentionHessianLinearOperator, MultiheadSelfAttention
from reference import rel_error

DT = torch.float64


class Net(nn.Module):
    def __init__(self, E=4, H=2, dtype=DT, dropout=0.0):
        super().__init__()
        self.attn = MultiheadSelfAttention(E, H, causal=True, dtype=dtype)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(E, 3, dtype=dtype)

    def forward(self, x):
        return self.out(torch.tanh(self.drop(self.attn(x))))


def _problem(seed=0, dtype=DT, **kw):
    torch.manual_seed(seed)
    net = Net(dtype=dtype, **kw)
    data = [(torch.randn(3, 5, 4, dtype=dtype), torch.randn(3, 5, 3, dtype=dtype)) for _ in range(2)]
    return net, nn.MSELoss(), data


def _fresh(op_cls, net, loss, data, v, **kw):
    return op_cls(net, loss, list(net.attn.parameters()), data, **kw) @ v


@pytest.mark.parametrize("op_cls", [AttentionGGNLinearOperator, AttentionHessianLinearOperator])
def test_one_shot_iterators_are_refused(op_cls):
    net, loss, data = _problem()
    params = list(net.attn.parameters())
    gen = ((X, y) for X, y in data)
    with pytest.raises(TypeError, match="one-shot iterator"):
        op_cls(net, loss, params, gen)
    with pytest.raises(TypeError, match="one-shot iterator"):
        op_cls(net, loss, params, iter(data))
    with pytest.raises(TypeError, match="iterable of"):
        op_cls(net, loss, params, 3)
    # the documented alternative works
    op = op_cls(net, loss, params, list((X, y) for X, y in data))
    v = torch.randn(op.shape[1], dtype=DT)
    assert rel_error(op @ v, _fresh(op_cls, net, loss, data, v)) < 1e-12


def test_attention_block_eigenvalues_refuses_generators():
    net, loss, data = _problem()
    with pytest.raises(TypeError, match="one-shot iterator"):
        ba.attention_block_eigenvalues(net, loss, ((X, y) for X, y in data))


@pytest.mark.parametrize("change", ["optimizer_step", "p.data", "other_layer", "data_inplace"])
@pytest.mark.parametrize("op_cls", [AttentionGGNLinearOperator, AttentionHessianLinearOperator])
def test_cached_operators_follow_changes(op_cls, change):
    net, loss, data = _problem()
    op = op_cls(net, loss, list(net.attn.parameters()), data)
    v = torch.randn(op.shape[1], dtype=DT)
    before = op @ v  # builds the cache
    if change == "optimizer_step":
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        net.zero_grad()
        loss(net(data[0][0]), data[0][1]).backward()
        opt.step()
    with torch.no_grad():
        if change == "optimizer_step":
            pass
        elif change == "p.data":  # EMA-style: bumps no version counter
            net.attn.in_proj_weight.data.mul_(0.5).add_(0.3)
        elif change == "other_layer":
            net.out.weight.add_(0.5)
        else:
            data[1][0].mul_(2.0)
    after = op @ v
    ref = _fresh(op_cls, net, loss, data, v)
    assert rel_error(after, ref) < 1e-12
    assert rel_error(before, ref) > 1e-3  # the change mattered


@pytest.mark.parametrize("op_cls", [AttentionGGNLinearOperator, AttentionHessianLinearOperator])
def test_targets_changed_in_place_reweight_the_batches(op_cls):
    """Cross-entropy's mean counts the targets that are not ignore_index over all data; when a
    target tensor is changed in place after construction (here: more ignored targets in the second
    batch), the batch weights are re-read (they were stale before: 8% off)."""
    torch.manual_seed(0)
    model = Net()  # [N, L, 3] -> classes last: CrossEntropyLoss wants [N, C, L]
    model.out.register_forward_hook(lambda mod, args, out: out.transpose(1, 2))
    data = [(torch.randn(3, 5, 4, dtype=DT), torch.randint(0, 3, (3, 5))) for _ in range(2)]
    params = list(model.attn.parameters())
    loss = nn.CrossEntropyLoss()
    op = op_cls(model, loss, params, data)
    v = torch.randn(op.shape[1], dtype=DT)
    before = op @ v
    data[1][1][:2] = loss.ignore_index
    after = op @ v
    ref = op_cls(model, loss, params, data) @ v
    assert rel_error(after, ref) < 1e-12
    assert rel_error(before, ref) > 1e-3  # the change mattered


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_refused(dtype):
    net, loss, data = _problem(dtype=torch.float32)
    net = net.to(dtype)
    data = [(X.to(dtype), y.to(dtype)) for X, y in data]
    with pytest.raises(TypeError, match="float16/bfloat16"):
        AttentionGGNLinearOperator(net, loss, list(net.attn.parameters()), data)
    with pytest.raises(TypeError, match="float16/bfloat16"):
        ba.hessian_blocks(net, loss, net.attn, data)
    with pytest.raises(TypeError, match="float16/bfloat16"):
        ba.attention_factors(net, loss, net.attn, data)


def test_non_finite_data_is_named():
    net, loss, data = _problem()
    data[1][0][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        AttentionHessianLinearOperator(net, loss, list(net.attn.parameters()), data)
    with pytest.raises(ValueError, match="non-finite"):
        ba.hessian_blocks(net, loss, net.attn, data)


def test_empty_batches_and_sequences():
    net, loss, data = _problem()
    with pytest.raises(ValueError, match="no samples"):
        AttentionGGNLinearOperator(net, loss, list(net.attn.parameters()),
                                   [(data[0][0][:0], data[0][1][:0])] + data)
    with pytest.raises(ValueError, match="L=0"):
        net.attn(torch.randn(2, 0, 4, dtype=DT))


def test_random_forward_is_refused():
    net, loss, data = _problem(dropout=0.5)
    net.train()
    with pytest.raises(ValueError, match="dropout"):
        AttentionGGNLinearOperator(net, loss, list(net.attn.parameters()), data, check_deterministic=False)
    net.eval()
    AttentionGGNLinearOperator(net, loss, list(net.attn.parameters()), data)


def test_integer_dtype_module_is_refused():
    with pytest.raises(TypeError, match="floating-point"):
        MultiheadSelfAttention(4, 2, dtype=torch.int64)


class TokenNet(nn.Module):
    """Token logits [N, C, L] for cross-entropy on sequences."""

    def __init__(self, E=4, H=2, C=3):
        super().__init__()
        self.attn = MultiheadSelfAttention(E, H, causal=True, dtype=DT)
        self.out = nn.Linear(E, C, dtype=DT)

    def forward(self, x):
        return self.out(torch.tanh(self.attn(x))).transpose(1, 2)


def _ce_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(5, 4, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (5, 4), generator=g)
    y[0, :3] = -100  # ignored targets, unevenly spread over the batches below
    y[1, 1] = -100
    y[3] = -100  # a sequence with no counted target
    return X, y


@pytest.mark.parametrize("weight", [None, torch.tensor([0.2, 1.0, 3.0], dtype=DT)])
@pytest.mark.parametrize("op_cls", [AttentionGGNLinearOperator, AttentionHessianLinearOperator])
def test_splitting_the_data_does_not_change_the_curvature(op_cls, weight):
    """ignore_index and class weights: batches are weighted by their counted targets (was N_b/N)."""
    torch.manual_seed(0)
    net, (X, y) = TokenNet(), _ce_data()
    loss = nn.CrossEntropyLoss(weight=weight)
    params = list(net.parameters())
    whole = op_cls(net, loss, params, [(X, y)])
    v = torch.randn(whole.shape[1], dtype=DT)
    ref = whole @ v
    for cuts in ([2], [1, 3], [3, 4]):  # [3:4] counts no target at all
        edges = [0] + cuts + [5]
        data = [(X[a:b], y[a:b]) for a, b in zip(edges[:-1], edges[1:])]
        assert rel_error(op_cls(net, loss, params, data) @ v, ref) < 1e-12, cuts


def test_splitting_the_data_does_not_change_the_blocks():
    torch.manual_seed(1)
    net, (X, y) = TokenNet(), _ce_data(1)
    loss = nn.CrossEntropyLoss()
    ref = ba.hessian_blocks(net, loss, net.attn, [(X, y)]).matrix("full")
    split = ba.hessian_blocks(net, loss, net.attn, [(X[:2], y[:2]), (X[2:], y[2:])]).matrix("full")
    assert rel_error(split, ref) < 1e-12


class DictNet(TokenNet):
    """Takes dict-like inputs, as HuggingFace models do."""

    def forward(self, batch):
        return super().forward(batch["x"])


def test_blocks_and_factors_accept_dict_inputs_like_the_operators():
    torch.manual_seed(2)
    net, (X, y) = DictNet(), _ce_data(2)
    loss = nn.CrossEntropyLoss()
    data = [({"x": X[:2]}, y[:2]), ({"x": X[2:]}, y[2:])]
    size = lambda b: b["x"].shape[0]  # noqa: E731
    with pytest.raises(ValueError, match="batch_size_fn"):
        ba.hessian_blocks(net, loss, net.attn, data)
    blocks = ba.hessian_blocks(net, loss, net.attn, data, batch_size_fn=size).matrix("full")
    op = AttentionHessianLinearOperator(net, loss, list(net.attn.parameters()), data, batch_size_fn=size)
    assert rel_error(blocks, op @ torch.eye(op.shape[1], dtype=DT)) < 1e-10


@pytest.mark.parametrize("readout", [False, True])
def test_blocks_beyond_memory_are_refused_before_work(monkeypatch, readout):
    """hessian_blocks/attention_factors refuse data whose unavoidable tensors (the attention matrices,
    and the dense [L E, L E] output curvature below a readout) exceed the machine's memory, before
    running the model; a machine with enough memory gets the blocks."""
    import backpack_attention.blocks as bblocks
    import backpack_attention.checks as checks

    torch.manual_seed(0)
    attn = MultiheadSelfAttention(4, 2, dtype=torch.float64)
    model = nn.Sequential(attn, nn.Linear(4, 4, dtype=torch.float64)) if readout else nn.Sequential(attn)
    X, y = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 5, 4, dtype=torch.float64)
    A_bytes = 8 * 3 * 2 * 5 * 5 * 3
    dense_bytes = 8 * 20 * 20 * (2 * 3 + 1)
    calls = []
    monkeypatch.setattr(bblocks, "output_terms", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(
        AssertionError("work started")))
    monkeypatch.setattr(checks, "memory_limit_bytes", lambda device: A_bytes - 1)
    with pytest.raises(MemoryError, match=r"data: the attention matrices A \[N, H, L, L\] = \[3, 2, 5, 5\]"):
        ba.hessian_blocks(model, nn.MSELoss(), attn, (X, y))
    monkeypatch.setattr(checks, "memory_limit_bytes", lambda device: max(A_bytes, dense_bytes - 1))
    if readout:
        with pytest.raises(MemoryError, match=r"dense \[L E, L E\] = \[20, 20\] matrix per sequence.*operators"):
            ba.attention_factors(model, nn.MSELoss(), attn, (X, y))
    assert not calls
    monkeypatch.undo()
    # enough memory: the dense matrix only where it is needed (below a readout)
    limit = dense_bytes if readout else dense_bytes - 1
    monkeypatch.setattr(checks, "memory_limit_bytes", lambda device: limit)
    blocks = ba.hessian_blocks(model, nn.MSELoss(), attn, (X, y))
    assert blocks[("W_V", 0), ("W_V", 0)].full.shape == (8, 8)
