"""What fails with nn.MultiheadAttention on a fused attention kernel, and what works with ours.

Run:  python examples/fused_kernels.py

A tiny model (attention + linear head, cross-entropy over tokens) is differentiated in the ways
curvature methods need: torch.func.hessian, torch.func.jvp, a double-backward Hessian-vector
product, and curvlinops' GGN/Hessian operators. Each is tried on

1. nn.MultiheadAttention with torch's default kernel choice (a fused SDPA kernel on CPU),
2. the same module in eval() mode, where torch may take its fused MHA fast path,
3. backpack_attention.MultiheadSelfAttention with the same weights and the default kernel,

and checked against a reference computed with the math kernel (sdpa_kernel(SDPBackend.MATH)),
the slow workaround. Failures are caught and their messages printed. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.func import functional_call, hessian, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from backpack_attention import MultiheadSelfAttention

warnings.filterwarnings("ignore", category=FutureWarning)
torch.manual_seed(0)
DTYPE = torch.float64
E, H, N, L, C = 4, 2, 4, 5, 3


class Net(nn.Module):
    """Self-attention (torch's or ours) followed by a linear classifier per token."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.attn = attention
        self.head = nn.Linear(E, C, dtype=DTYPE)

    def forward(self, x):
        if isinstance(self.attn, nn.MultiheadAttention):
            h = self.attn(x, x, x, need_weights=False)[0]
        else:
            h = self.attn(x)
        return self.head(h).flatten(0, 1)  # [N*L, C]


mha = nn.MultiheadAttention(E, H, batch_first=True, dtype=DTYPE)
torch_net = Net(mha)
our_net = Net(MultiheadSelfAttention.from_torch(mha))
our_net.head.load_state_dict(torch_net.head.state_dict())
X = torch.randn(N, L, E, dtype=DTYPE)
Y = torch.randint(0, C, (N * L,))
loss_func = nn.CrossEntropyLoss()


def attn_params(net):
    return [p for n, p in net.named_parameters() if n.startswith("attn.")]


def run(what, fn):
    """Print OK and a summary of ``fn()``, or FAIL and the exception (first line)."""
    try:
        result = fn()
        print(f"  OK    {what}{result}")
        return True
    except Exception as e:  # noqa: BLE001 -- the point is to show the failure
        msg = str(e).strip().splitlines()[0]
        print(f"  FAIL  {what}: {type(e).__name__}: {msg}")
        return False


def loss_of(net):
    names = [n for n, _ in net.named_parameters() if n.startswith("attn.")]
    rest = {n: p.detach() for n, p in net.named_parameters() if not n.startswith("attn.")}

    def f(*params):
        out = functional_call(net, {**rest, **dict(zip(names, params))}, (X,))
        return loss_func(out, Y)

    return f, [p.detach() for p in attn_params(net)]


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def func_hessian(net):
    f, params = loss_of(net)
    Hs = hessian(f, argnums=tuple(range(len(params))))(*params)
    n = [p.numel() for p in params]
    return torch.cat([torch.cat([Hs[i][j].reshape(n[i], n[j]) for j in range(len(n))], 1) for i in range(len(n))])


def func_jvp(net, v):
    f, params = loss_of(net)
    shaped = torch.split(v, [p.numel() for p in params])
    return jvp(f, tuple(params), tuple(s.reshape(p.shape) for s, p in zip(shaped, params)))[1]


def double_backward_hvp(net, v):
    params = attn_params(net)
    g = torch.autograd.grad(loss_func(net(X), Y), params, create_graph=True)
    return flat(torch.autograd.grad(flat(g) @ v, params))


def curvlinops_matvec(net, v, kind):
    from curvlinops import GGNLinearOperator, HessianLinearOperator

    cls = {"GGN": GGNLinearOperator, "Hessian": HessianLinearOperator}[kind]
    op = cls(net, loss_func, attn_params(net), [(X, Y)], check_deterministic=False)
    return op @ v


def reference():
    """Everything on the torch model under the math kernel (train mode, no fast path)."""
    torch_net.train()
    with sdpa_kernel(SDPBackend.MATH):
        ref = {"hessian": func_hessian(torch_net)}
        ref["jvp"] = func_jvp(torch_net, V)
        ref["hvp"] = double_backward_hvp(torch_net, V)
        ref["GGN"] = curvlinops_matvec(torch_net, V, "GGN")
        ref["Hessian"] = curvlinops_matvec(torch_net, V, "Hessian")
    return ref


def compared(ref):
    return lambda value: f": max |result - math reference| = {float((value - ref).abs().max()):.1e}"


def attempts(net, ref):
    return [
        ("torch.func.hessian", lambda: func_hessian(net), ref["hessian"]),
        ("torch.func.jvp", lambda: func_jvp(net, V), ref["jvp"]),
        ("double-backward Hessian-vector product", lambda: double_backward_hvp(net, V), ref["hvp"]),
        ("curvlinops GGNLinearOperator @ v", lambda: curvlinops_matvec(net, V, "GGN"), ref["GGN"]),
        ("curvlinops HessianLinearOperator @ v", lambda: curvlinops_matvec(net, V, "Hessian"), ref["Hessian"]),
    ]


def check(net, ref, label):
    print(label)
    for what, fn, r in attempts(net, ref):
        run(what, lambda fn=fn, r=r: compared(r)(fn()))


class SelfAttention(nn.Module):
    """Calls an nn.MultiheadAttention as self-attention."""

    def __init__(self, mha):
        super().__init__()
        self.mha = mha

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


def backpack_on_mha():
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    model = extend(nn.Sequential(nn.Linear(E, E, dtype=DTYPE), SelfAttention(copy.deepcopy(mha)), nn.Linear(E, C, dtype=DTYPE),
                                 nn.Flatten(0, 1)))
    lossf = extend(nn.CrossEntropyLoss())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with backpack(DiagGGNExact()):
            lossf(model(X), Y).backward()
    return ""


if __name__ == "__main__":
    print(f"torch {torch.__version__}; float64; E={E}, heads={H}, N={N}, L={L}\n")
    V = torch.randn(sum(p.numel() for p in attn_params(torch_net)), dtype=DTYPE)
    REF = reference()
    print(f"Reference: nn.MultiheadAttention under sdpa_kernel(SDPBackend.MATH): "
          f"{REF['hessian'].shape[0]}x{REF['hessian'].shape[1]} attention Hessian computed.\n")

    check(torch_net.train(), REF, "1. nn.MultiheadAttention, train(), default kernel:")
    torch_net.eval()
    print("\n2. nn.MultiheadAttention, eval():")
    for what, fn, r in attempts(torch_net, REF)[:2]:
        run(what, lambda fn=fn, r=r: compared(r)(fn()))
    with sdpa_kernel(SDPBackend.MATH):
        run("torch.func.jvp, math kernel", lambda: compared(REF["jvp"])(func_jvp(torch_net, V)))
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            run("torch.func.jvp, math kernel and torch.backends.mha.set_fastpath_enabled(False)",
                lambda: compared(REF["jvp"])(func_jvp(torch_net, V)))
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    torch_net.train()

    print()
    check(our_net.train(), REF, "3. backpack_attention.MultiheadSelfAttention, train(), default kernel:")
    check(our_net.eval(), REF, "   the same in eval() (no torch fast path is involved):")
    our_net.train()

    print("\n4. BackPACK with nn.MultiheadAttention (second-order extension DiagGGNExact):")
    run("backpack(DiagGGNExact())", backpack_on_mha)
