"""The ``backpack-attention report`` command: a Markdown report with figures on a small transformer.

The report is a list of small, independent **sections** kept in a registry. Each section is a
function ``compute(ctx) -> SectionResult`` that reads what it needs from the shared
:class:`ReportContext` (model, loss, data, options, a cache for expensive shared results) and
returns Markdown plus figures. The runner calls the sections in order, catches every failure
(the error and its traceback go into the report, the other sections still run, and the command
exits non-zero at the end), writes ``report.md`` and the PNG figures, and shows a progress bar.

Adding a section (for example Hessian blocks or spectra) touches no other section::

    from backpack_attention.report import SectionResult, Figure, register_section

    @register_section("hessian_blocks", "Hessian blocks", order=40)
    def hessian_blocks(ctx):
        ...                                   # ctx.model, ctx.loss_func, ctx.data, ctx.attention_layers
        return SectionResult(markdown, [Figure("hessian_blocks.png", "caption", draw)])

``draw`` is a function returning a :class:`matplotlib.figure.Figure`; it is only called when
plots are enabled, so ``--no-plots`` also skips the plotting work. The module that defines the
section must be imported before :func:`run_report` (list it in :data:`SECTION_MODULES`).
"""

from __future__ import annotations

import importlib
import math
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from backpack_attention.module import BLOCK_NAMES, MultiheadSelfAttention, param_index

DEFAULT_OUT = "backpack-attention-report"

#: Modules imported (for their ``@register_section`` side effects) before a report runs. A name
#: whose module does not exist (yet) is skipped; any other import error fails the report.
SECTION_MODULES: tuple = ("backpack_attention.sections",)


# ---- options, context, results --------------------------------------------------------------
@dataclass
class ReportOptions:
    """What the command line (or a caller) chose. Defaults are the built-in problem."""

    out: str = DEFAULT_OUT
    layers: int = 1
    d_model: int = 16
    heads: int = 2
    sequences: int = 32
    seed: int = 0
    attention: str = "softmax"
    norm: str = "none"
    dtype: str = "float64"
    plots: bool = True
    progress: bool = True
    sections: Optional[Sequence[str]] = None  # names to run; None = all registered sections

    def validate(self) -> None:
        """Raise ``ValueError`` naming the option for values the model cannot take."""
        for name in ("layers", "d_model", "heads", "sequences"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.d_model % self.heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by heads ({self.heads}); "
                f"valid heads for d_model={self.d_model}: "
                f"{[h for h in range(1, self.d_model + 1) if self.d_model % h == 0]}"
            )
        if self.attention not in ("softmax", "linear"):
            raise ValueError(f"attention must be 'softmax' or 'linear', got {self.attention!r}")
        if self.norm not in ("none", "pre"):
            raise ValueError(f"norm must be 'none' or 'pre', got {self.norm!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")


@dataclass
class Figure:
    """A figure of a section: written to ``filename`` (PNG) and embedded with ``caption``.

    ``draw()`` returns a :class:`matplotlib.figure.Figure`; it is not called with ``--no-plots``.
    """

    filename: str
    caption: str
    draw: Callable[[], Any]


@dataclass
class SectionResult:
    """Markdown body of a section (without its heading) and its figures."""

    markdown: str
    figures: List[Figure] = field(default_factory=list)


@dataclass
class Section:
    """A registered report section."""

    name: str
    title: str
    compute: Callable[["ReportContext"], SectionResult]
    order: float = 0.0


#: The registry: section name -> :class:`Section`. Sections run in ``order``, then name.
SECTIONS: Dict[str, Section] = {}


def register_section(name: str, title: str, order: float = 100.0):
    """Decorator registering ``compute(ctx) -> SectionResult`` as a report section.

    Raises ``ValueError`` if ``name`` is already registered by a different function.
    """

    def decorate(fn):
        old = SECTIONS.get(name)
        key = (getattr(fn, "__module__", None), getattr(fn, "__qualname__", None))
        if old is not None and (old.compute.__module__, old.compute.__qualname__) != key:
            raise ValueError(f"report section {name!r} is already registered by {old.compute!r}")
        SECTIONS[name] = Section(name, title, fn, order)
        return fn

    return decorate


def available_sections() -> List[str]:
    """Names of all sections (section modules loaded), in report order."""
    _load_section_modules()
    return [s.name for s in registered_sections()]


def registered_sections() -> List[Section]:
    """The registered sections in the order the report shows them."""
    return sorted(SECTIONS.values(), key=lambda s: (s.order, s.name))


class ReportContext:
    """What sections share: the options, the built-in problem, and a cache.

    Attributes:
        options: the :class:`ReportOptions`.
        model: the :class:`~backpack_attention.models.TinyTransformer` (answer logits ``[N, C, 6]``).
        loss_func: ``nn.CrossEntropyLoss()`` (mean over sequences and the 6 answer digits).
        X, y: tokens ``[N, 17]`` and answer digits ``[N, 6]``.
        data: ``[(X, y)]``, the form curvlinops operators take.
        cache: a dict sections may use to share expensive results (see :meth:`cached`).
    """

    def __init__(self, options: ReportOptions):
        from backpack_attention.models import default_problem

        self.options = options
        self.dtype = getattr(torch, options.dtype)
        model, loss_func, (X, y) = default_problem(
            seed=options.seed,
            num_sequences=options.sequences,
            dtype=self.dtype,
            d_model=options.d_model,
            num_heads=options.heads,
            num_layers=options.layers,
            attention=options.attention,
            norm=options.norm,
            # default_problem fixes init_std for d_model=16; keep the paper's 0.8/sqrt(d_model).
            init_std=0.8 / math.sqrt(options.d_model),
        )
        self.model, self.loss_func, self.X, self.y = model, loss_func, X, y
        self.data = [(X, y)]
        self.cache: Dict[str, Any] = {}

    @property
    def attention_layers(self) -> List[MultiheadSelfAttention]:
        """The attention modules, first layer to last."""
        return [m for m in self.model.modules() if isinstance(m, MultiheadSelfAttention)]

    def cached(self, key: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, computed once per report and shared between sections."""
        if key not in self.cache:
            self.cache[key] = fn()
        return self.cache[key]

    def loss_and_gradients(self):
        """``(loss, {param name: gradient})`` of the mean loss on all sequences (computed once)."""

        def compute():
            params = [p for p in self.model.parameters() if p.requires_grad]
            loss = self.loss_func(self.model(self.X), self.y)
            grads = torch.autograd.grad(loss, params)
            names = [n for n, p in self.model.named_parameters() if p.requires_grad]
            return loss.detach(), dict(zip(names, grads))

        return self.cached("loss_and_gradients", compute)

    def flat_attention_gradient(self, module: MultiheadSelfAttention) -> torch.Tensor:
        """Gradient of ``module``'s parameters, concatenated in :func:`param_index` order."""
        _, grads = self.loss_and_gradients()
        prefix = next(n for n, m in self.model.named_modules() if m is module)
        return torch.cat([grads[f"{prefix}.{n}"].reshape(-1) for n, _ in module.named_parameters()])


# ---- helpers for sections --------------------------------------------------------------------
def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def fmt(x: float) -> str:
    """A float in 4 significant digits."""
    return f"{float(x):.4g}"


def block_names(module: MultiheadSelfAttention) -> List[str]:
    """The blocks ``module`` has (no bias blocks when ``bias=False``)."""
    return [n for n in BLOCK_NAMES if module.bias or not n.startswith("b_")]


def block_shape(module: MultiheadSelfAttention, name: str) -> List[int]:
    """Shape of one head's block in torch layout (``W_O``, ``b_O``: see :func:`param_index`)."""
    E, d = module.embed_dim, module.head_dim
    return {"W_Q": [d, E], "W_K": [d, E], "W_V": [d, E], "b_Q": [d], "b_K": [d], "b_V": [d],
            "W_O": [E, d], "b_O": [E]}[name]


def torch_location(module: MultiheadSelfAttention, name: str) -> str:
    """Where head ``h``'s block lives in the torch parameters."""
    offset = {"Q": "", "K": "E + ", "V": "2E + "}
    if name in ("W_Q", "W_K", "W_V"):
        s = offset[name[-1]]
        return f"`in_proj_weight[{s}h·d_K : {s}(h+1)·d_K, :]`"
    if name in ("b_Q", "b_K", "b_V"):
        s = offset[name[-1]]
        return f"`in_proj_bias[{s}h·d_K : {s}(h+1)·d_K]`"
    if name == "W_O":
        return "`out_proj_weight[:, h·d_K : (h+1)·d_K]`"
    return "`out_proj_bias` (shared by all heads)"


# ---- sections --------------------------------------------------------------------------------
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
                ["head width (d_K = E/H)", att.head_dim],
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
    H = att.num_heads
    lines = [
        "Every attention layer has the same layout. Blocks follow SPEC §5.3 "
        "(`backpack_attention.param_index(module, name, head)` gives their positions in "
        "`torch.cat([p.reshape(-1) for p in module.parameters()])`). Shapes are per head, in torch "
        "layout (`W_Q^h` is stored transposed, as `nn.MultiheadAttention` stores it).",
        "",
    ]
    rows = []
    for name in block_names(att):
        shape = block_shape(att, name)
        per_head = math.prod(shape)
        heads = "shared" if name == "b_O" else H
        total = per_head if name == "b_O" else per_head * H
        rows.append([f"`{name}`", "×".join(map(str, shape)), heads, per_head, total, torch_location(att, name)])
    lines.append(md_table(["block", "shape per head", "heads", "per head", "all heads", "torch location"], rows))

    # Consistency check: the blocks of all heads partition the layer's parameters.
    n_params = sum(p.numel() for p in att.parameters())
    idx = torch.cat([param_index(att, name, None if name == "b_O" else h)
                     for name in block_names(att) for h in ([None] if name == "b_O" else range(H))])
    covered = idx.numel() == n_params and torch.equal(idx.sort().values, torch.arange(n_params))
    lines += ["", f"Parameters per attention layer: {n_params}; the per-head blocks above "
              + ("cover each of them exactly once." if covered else "do **not** partition them (index map error).")]
    if not covered:
        raise RuntimeError("param_index blocks do not partition the attention parameters")
    return SectionResult("\n".join(lines))


def _gradient_norms(ctx: ReportContext):
    """``{layer: {block: [norm per head]}}`` (``b_O``: one entry)."""
    out = []
    for att in ctx.attention_layers:
        g = ctx.flat_attention_gradient(att)
        norms = {}
        for name in block_names(att):
            heads = [None] if name == "b_O" else range(att.num_heads)
            norms[name] = [float(g[param_index(att, name, h)].norm()) for h in heads]
        out.append(norms)
    return out


@register_section("gradient_norms", "Gradient norms per attention block", order=30)
def gradient_norms(ctx: ReportContext) -> SectionResult:
    norms = ctx.cached("gradient_norms", lambda: _gradient_norms(ctx))
    att = ctx.attention_layers[0]
    H = att.num_heads
    loss, grads = ctx.loss_and_gradients()
    total = math.sqrt(sum(float(g.square().sum()) for g in grads.values()))
    lines = [f"Euclidean norm of the gradient of the loss ({fmt(loss)}) restricted to each block, per "
             f"layer and head (whole-model gradient norm {fmt(total)}).", ""]
    header = ["layer", "block"] + [f"head {h}" for h in range(H)] + ["all heads"]
    rows = []
    for i, layer in enumerate(norms):
        for name, vals in layer.items():
            all_heads = math.sqrt(sum(v * v for v in vals))
            cells = [fmt(vals[0])] + [""] * (H - 1) if name == "b_O" else [fmt(v) for v in vals]
            rows.append([i, f"`{name}`", *cells, fmt(all_heads)])
    lines.append(md_table(header, rows))
    if ctx.options.attention == "softmax" and att.bias:
        worst = max(max(layer["b_K"]) for layer in norms)
        lines += ["", f"`b_K` gets no gradient in softmax attention (a row shift of the scores does "
                  f"not change the softmax; SPEC §5.2): largest `b_K` gradient norm here {fmt(worst)}."]
    figures = []
    if ctx.options.plots:
        figures.append(Figure("gradient_norms.png", "Gradient norm per Q/K/V/O weight block, layer and head",
                              lambda: _plot_gradient_norms(norms, H)))
    return SectionResult("\n".join(lines), figures)


def _plot_gradient_norms(norms, H):
    from matplotlib.figure import Figure as MplFigure

    blocks = ["W_Q", "W_K", "W_V", "W_O"]
    n_layers = len(norms)
    fig = MplFigure(figsize=(1.5 + 2.8 * n_layers, 3.2), layout="constrained")
    axes = fig.subplots(1, n_layers, squeeze=False, sharey=True)[0]
    width = 0.8 / H
    for i, (ax, layer) in enumerate(zip(axes, norms)):
        for h in range(H):
            xs = [b + (h - (H - 1) / 2) * width for b in range(len(blocks))]
            ax.bar(xs, [layer[name][h] for name in blocks], width=width, label=f"head {h}")
        ax.set_xticks(range(len(blocks)), blocks)
        ax.set_title(f"layer {i}")
        ax.set_yscale("log")
    axes[0].set_ylabel("gradient norm")
    if H > 1:
        axes[-1].legend(fontsize="small")
    return fig


# ---- runner ----------------------------------------------------------------------------------
@dataclass
class SectionOutcome:
    section: Section
    seconds: float
    error: Optional[str] = None  # "Type: message" when the section failed
    figures: List[str] = field(default_factory=list)


def _load_section_modules() -> None:
    for name in SECTION_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise


def _environment() -> str:
    versions = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    for dist in ("backpack-for-pytorch", "curvlinops-for-pytorch", "backpack-attention"):
        try:
            from importlib.metadata import version

            versions.append(f"{dist} {version(dist)}")
        except Exception:  # not installed as a distribution
            pass
    return ", ".join(versions)


def run_report(options: ReportOptions, sections: Optional[Sequence[Section]] = None) -> int:
    """Write ``report.md`` (and figures) into ``options.out``. Returns 0, or 1 if a section failed.

    Raises ``ValueError`` for invalid options (before any work). A section that raises is
    recorded in the report (error and traceback) and the other sections still run.
    """
    from tqdm.auto import tqdm

    options.validate()
    _load_section_modules()
    if sections is None:
        sections = registered_sections()
        if options.sections is not None:
            unknown = sorted(set(options.sections) - {s.name for s in sections})
            if unknown:
                raise ValueError(f"sections: unknown {unknown}; accepted: {[s.name for s in sections]}")
            sections = [s for s in sections if s.name in options.sections]
    sections = list(sections)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    try:
        ctx = ReportContext(options)
        setup_error = None
    except Exception as e:  # the problem itself could not be built: every section fails
        ctx, setup_error = None, e

    parts: List[str] = []
    outcomes: List[SectionOutcome] = []
    bar = tqdm(sections, desc="backpack-attention report", unit="section", file=sys.stderr,
               disable=not options.progress)
    for sec in bar:
        bar.set_postfix_str(sec.name)
        t0 = time.perf_counter()
        outcome = SectionOutcome(sec, 0.0)
        body = ""
        try:
            if setup_error is not None:
                raise RuntimeError(f"building the model failed: {type(setup_error).__name__}: {setup_error}") from setup_error
            result = sec.compute(ctx)
            body = result.markdown
            for f in result.figures if options.plots else []:
                fig = f.draw()
                fig.savefig(out / f.filename, dpi=110)
                outcome.figures.append(f.filename)
                body += f"\n\n![{f.caption}]({f.filename})"
        except Exception as e:
            outcome.error = f"{type(e).__name__}: {e}"
            tb = traceback.format_exc()
            body = (f"**This section failed:** `{outcome.error}`\n\n<details><summary>Traceback</summary>\n\n"
                    f"```\n{tb.rstrip()}\n```\n\n</details>")
        outcome.seconds = time.perf_counter() - t0
        outcomes.append(outcome)
        parts.append(f"## {sec.title}\n\n{body}\n")
    bar.close()
    elapsed = time.perf_counter() - start

    failed = [o for o in outcomes if o.error]
    cmd = " ".join(["backpack-attention report", f"--layers {options.layers}", f"--d-model {options.d_model}",
                    f"--heads {options.heads}", f"--sequences {options.sequences}", f"--seed {options.seed}",
                    f"--attention {options.attention}", f"--norm {options.norm}", f"--dtype {options.dtype}"]
                   + ([] if options.sections is None else [f"--sections {','.join(options.sections)}"])
                   + ([] if options.plots else ["--no-plots"]))
    head = [
        "# backpack-attention report",
        "",
        f"Command: `{cmd}`  ",
        f"Environment: {_environment()}  ",
        f"Sections: {len(outcomes) - len(failed)} of {len(outcomes)} succeeded in {elapsed:.1f} s.",
        "",
    ]
    if failed:
        head += ["**Failed sections:** " + ", ".join(f"{o.section.title} (`{o.error}`)" for o in failed), ""]
    log = md_table(["section", "status", "seconds", "figures"],
                   [[o.section.title, "failed" if o.error else "ok", f"{o.seconds:.2f}",
                     ", ".join(o.figures) or "-"] for o in outcomes])
    text = "\n".join(head) + "\n" + "\n".join(parts) + "\n## Run log\n\n" + log + "\n"
    (out / "report.md").write_text(text, encoding="utf-8")

    print(f"Wrote {out / 'report.md'} ({len(outcomes) - len(failed)}/{len(outcomes)} sections ok, "
          f"{sum(len(o.figures) for o in outcomes)} figures) in {elapsed:.1f} s")
    for o in failed:
        print(f"error: section '{o.section.name}' failed: {o.error}", file=sys.stderr)
    return 1 if failed else 0
