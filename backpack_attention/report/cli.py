"""Command line: ``backpack-attention report [options]`` (or ``python -m backpack_attention.report report``).

``main(argv=None)`` parses ``argv`` (default ``sys.argv[1:]``) and returns the exit status:
0 on success, 1 if a report section failed. Invalid options exit with status 2 and an
argparse error naming the option and the accepted values.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import List, Optional

from backpack_attention import __version__


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


REPORT_DESCRIPTION = """\
Build a Markdown report (report.md plus PNG figures) on the built-in problem: a small causal
transformer (TinyTransformer, built on backpack_attention.MultiheadSelfAttention) on the
5-digit addition task XXXXX+YYYYY=ZZZZZZ, with cross-entropy on the 6 answer digits. The data
are generated in code (nothing is downloaded).

Sections (names for --sections in brackets):
  [model]            model summary (architecture, parameter counts)
  [attention_params] parameters per attention block (Q/K/V/O per head, as param_index indexes them)
  [gradient_norms]   gradient norms per Q/K/V/O block, layer and head (bar plot)
  [hessian_blocks]   exact closed-form Hessian blocks per layer and head: outer (GGN),
                     functional and full parts (table, heat map)
  [growth]           the paper's block heterogeneity and sigma^2 / sigma^5 / sigma^6 growth
                     exponents, measured from exact blocks (plot)
  [phases]           a short training run of a copy of the model: the Q/K-vs-V GGN ratio and
                     the Q/K functional-to-GGN ratio over the steps (plot)
  [kfac]             KFAC and EKFAC errors against the exact GGN per block and head, and the
                     preconditioned-gradient angles (plot)
  [spectra]          top eigenvalues of each attention block's GGN / Hessian (Lanczos, plot)
A section that fails is reported in report.md with its traceback, the other sections still
run, and the command exits with status 1.
"""

REPORT_EPILOG = """\
examples:
  backpack-attention report
  backpack-attention report --out my-report --layers 2 --d-model 32 --heads 4
  backpack-attention report --attention linear --norm pre --dtype float32 --no-plots
  backpack-attention report --sections model,hessian_blocks

exit status: 0 success, 1 a section failed (see report.md), 2 invalid options.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backpack-attention",
        description="Exact curvature of multi-head self-attention for BackPACK and curvlinops.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", title="commands")
    rep = sub.add_parser(
        "report",
        help="write a Markdown report with figures on the built-in transformer",
        description=REPORT_DESCRIPTION,
        epilog=REPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rep.add_argument("--out", metavar="DIR", default="backpack-attention-report",
                     help="output folder, created if missing (default: %(default)s)")
    rep.add_argument("--layers", metavar="N", type=_positive_int, default=1,
                     help="number of transformer blocks (default: %(default)s)")
    rep.add_argument("--d-model", metavar="E", type=_positive_int, default=16, dest="d_model",
                     help="model width E; must be divisible by --heads (default: %(default)s)")
    rep.add_argument("--heads", metavar="H", type=_positive_int, default=2,
                     help="attention heads per layer; head width is E/H (default: %(default)s)")
    rep.add_argument("--sequences", metavar="N", type=_positive_int, default=32,
                     help="number of addition problems in the batch (default: %(default)s)")
    rep.add_argument("--seed", metavar="S", type=_int, default=0,
                     help="seed for the model initialisation and the data (default: %(default)s)")
    rep.add_argument("--attention", choices=("softmax", "linear"), default="softmax",
                     help="softmax attention, or the paper's softmax-free linear attention "
                          "(masked raw scores / sqrt(d_K)) (default: %(default)s)")
    rep.add_argument("--norm", choices=("none", "pre"), default="none",
                     help="no LayerNorm, or pre-LN blocks with a final LayerNorm (default: %(default)s)")
    rep.add_argument("--dtype", choices=("float32", "float64"), default="float64",
                     help="floating point type of model and computations (default: %(default)s)")
    rep.add_argument("--sections", metavar="NAMES", default=None,
                     help="comma-separated section names to run (default: all; see the list above)")
    rep.add_argument("--no-plots", action="store_true",
                     help="write report.md only, without PNG figures")
    rep.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``backpack-attention`` console script. Returns the exit status."""
    # torch.func internals call the deprecated torch.jit.script on first use: noise for report users
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("missing command; available commands: report (see 'backpack-attention report --help')")
    if args.command == "report":
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            _report_parser(parser).error(f"argument --out: {args.out!r} exists and is not a folder")
        if args.d_model % args.heads != 0:
            divisors = [h for h in range(1, args.d_model + 1) if args.d_model % h == 0]
            _report_parser(parser).error(
                f"argument --heads: {args.heads} does not divide --d-model {args.d_model}; "
                f"accepted --heads for --d-model {args.d_model}: {divisors}"
            )
        from backpack_attention.report import ReportOptions, available_sections, run_report

        sections = None
        if args.sections is not None:
            sections = tuple(n.strip() for n in args.sections.split(",") if n.strip())
            known = available_sections()
            unknown = [n for n in sections if n not in known]
            if unknown or not sections:
                _report_parser(parser).error(
                    f"argument --sections: unknown section(s) {unknown or [args.sections]}; accepted: {', '.join(known)}"
                )

        options = ReportOptions(
            out=args.out, layers=args.layers, d_model=args.d_model, heads=args.heads,
            sequences=args.sequences, seed=args.seed, attention=args.attention, norm=args.norm,
            dtype=args.dtype, plots=not args.no_plots, progress=not args.no_progress, sections=sections,
        )
        return run_report(options)
    parser.error(f"unknown command {args.command!r}")  # unreachable: argparse checks choices
    return 2


def _report_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``report`` sub-parser (so its errors show the ``report`` usage line)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices["report"]
    return parser


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
