"""Report sections ``model`` (model summary) and ``attention_params`` (parameters per attention block)."""

from __future__ import annotations

import math

import torch
from torch import nn

from backpack_attention.report.framework import ReportContext, SectionResult, fmt, layout_of, md_table, register_section


@register_section("model", "Model summary", order=10)
def model_summary(ctx: ReportContext) -> SectionResult:
    o, m = ctx.options, ctx.model
    layers = ctx.attention_layers
    att = layers[0]
    loss, _ = ctx.loss_and_gradients()
    N, L = ctx.X.shape
    lines = [
        "Built-in problem: 5-digit addition `XXXXX+YYYYY=ZZZZZZ` (generated in code, no downloads); "
        f"{N} sequences of {L} input tokens, vocabulary 12; cross-entropy on the 6 answer digits "
        "(mean over sequences and digits).",
        "",
        md_table(
            ["setting", "value"],
            [
                ["layers", o.layers],
                ["d_model (E)", o.d_model],
                ["heads (H)", o.heads],
                ["head width (d_K = E/H)", layout_of(att).head_dim],
                ["MLP width", m.blocks[0].mlp[0].out_features],
                ["attention", f"{o.attention}, causal"],
                ["normalisation", o.norm],
                ["dtype", o.dtype],
                ["seed", o.seed],
                ["loss at initialisation", fmt(loss)],
            ],
        ),
        "",
        "Parameter counts:",
        "",
    ]
    rows = []
    for name, child in m.named_children():
        if isinstance(child, nn.ModuleList):
            for i, block in enumerate(child):
                for sub, mod in block.named_children():
                    n = sum(p.numel() for p in mod.parameters())
                    if n:
                        rows.append([f"`{name}.{i}.{sub}`", type(mod).__name__, n])
        else:
            n = sum(p.numel() for p in child.parameters())
            if n:
                rows.append([f"`{name}`", type(child).__name__, n])
    total = sum(p.numel() for p in m.parameters())
    n_att = sum(p.numel() for a in layers for p in a.parameters())
    rows.append(["**total**", "", f"**{total}**"])
    lines += [md_table(["module", "type", "parameters"], rows), "",
              f"Attention parameters: {n_att} of {total} ({100 * n_att / total:.1f}%).", "",
              "<details><summary>Module tree</summary>", "", "```", str(m), "```", "", "</details>"]
    return SectionResult("\n".join(lines))


@register_section("attention_params", "Parameters per attention block", order=20)
def attention_parameters(ctx: ReportContext) -> SectionResult:
    att = ctx.attention_layers[0]
    layout = layout_of(att)
    H = layout.num_heads
    lines = [
        "Every attention layer has the same layout. Blocks follow docs/math.md §5.3 "
        "(`backpack_attention.param_index(module, name, head)` gives their positions in "
        "`torch.cat([p.reshape(-1) for p in module.parameters()])`). Shapes are per head, in torch "
        "layout (`W_Q^h` is stored transposed, as `nn.MultiheadAttention` stores it).",
        "",
    ]
    rows = []
    for name in layout.block_names():
        shape = layout.block_shape(name)
        per_head = math.prod(shape)
        heads = "shared" if name == "b_O" else H
        total = per_head if name == "b_O" else per_head * H
        location = f"`{layout.torch_location(name)}`" + (" (shared by all heads)" if name == "b_O" else "")
        rows.append([f"`{name}`", "×".join(map(str, shape)), heads, per_head, total, location])
    lines.append(md_table(["block", "shape per head", "heads", "per head", "all heads", "torch location"], rows))

    # Consistency check: the blocks of all heads partition the layer's parameters.
    n_params = sum(p.numel() for p in att.parameters())
    idx = torch.cat([layout.param_index(name, None if name == "b_O" else h)
                     for name in layout.block_names() for h in ([None] if name == "b_O" else range(H))])
    covered = idx.numel() == n_params and torch.equal(idx.sort().values, torch.arange(n_params))
    lines += ["", f"Parameters per attention layer: {n_params}; the per-head blocks above "
              + ("cover each of them exactly once." if covered else "do **not** partition them (index map error).")]
    if not covered:
        raise RuntimeError("param_index blocks do not partition the attention parameters")
    return SectionResult("\n".join(lines))
