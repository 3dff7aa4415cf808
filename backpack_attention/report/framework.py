"""The report framework: options, shared context, section registry and runner.

``backpack-attention report`` writes a Markdown report with figures on a small transformer. The
report is a list of small, independent **sections** kept in a registry. Each section is a
function ``compute(ctx) -> SectionResult`` that reads what it needs from the shared
:class:`ReportContext` (model, loss, data, options, a cache for expensive shared results) and
returns Markdown plus figures. The runner calls the sections in order, catches every failure
(the error and its traceback go into the report, the other sections still run, and the command
exits non-zero at the end), writes ``report.md`` and the PNG figures, and shows a progress bar.
The built-in sections live in :mod:`backpack_attention.report.sections`.

Adding a section touches no other section. For example (this runs as printed; it writes
``my-report/report.md`` and ``my-report/num_heads.png``)::

    from backpack_attention.report import Figure, ReportOptions, SectionResult, register_section, run_report

    @register_section("num_heads", "Heads per attention layer", order=90)
    def num_heads(ctx):
        heads = [m.num_heads for m in ctx.attention_layers]

        def draw():
            from matplotlib.figure import Figure as MplFigure

            fig = MplFigure(figsize=(3, 2))
            fig.subplots().bar(range(len(heads)), heads)
            return fig

        markdown = f"Heads per layer: {heads}; loss at initialisation {ctx.loss_and_gradients()[0]:.4g}."
        return SectionResult(markdown, [Figure("num_heads.png", "heads per layer", draw)])

    run_report(ReportOptions(out="my-report", sections=["model", "num_heads"]))

``draw`` is a function returning a :class:`matplotlib.figure.Figure`; it is only called when
plots are enabled, so ``--no-plots`` also skips the plotting work. A section name must be new
(:func:`register_section` raises ``ValueError`` for a name another function registered). A
section defined in another module is found by the command line if that module is imported before
:func:`run_report` runs (list it in :data:`SECTION_MODULES`).
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

from backpack_attention.layout import AttentionLayout
from backpack_attention.module import MultiheadSelfAttention

DEFAULT_OUT = "backpack-attention-report"

#: Modules imported (for their ``@register_section`` side effects) before a report runs. A name
#: whose module does not exist (yet) is skipped; any other import error fails the report.
SECTION_MODULES: tuple = ("backpack_attention.report.sections",)


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
        """Gradient of ``module``'s parameters, flat in the order of ``module.parameters()`` (the order
        :meth:`AttentionLayout.param_index <backpack_attention.layout.AttentionLayout.param_index>` indexes)."""
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


def layout_of(module: MultiheadSelfAttention) -> AttentionLayout:
    """The :class:`~backpack_attention.layout.AttentionLayout` of ``module`` (its block names,
    shapes, torch locations and flat positions)."""
    return AttentionLayout(module.embed_dim, module.num_heads, module.bias)


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
