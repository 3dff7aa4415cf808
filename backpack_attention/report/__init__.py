"""The ``backpack-attention report`` application: a Markdown report with figures on a small transformer.

This package is application code on top of the library (it is not imported by
``backpack_attention`` itself):

* :mod:`~backpack_attention.report.framework`: options, shared context, section registry, runner;
* :mod:`~backpack_attention.report.sections`: the built-in sections, one module per section or group;
* :mod:`~backpack_attention.report.heterogeneity`: the paper's block-heterogeneity / growth-rate study;
* :mod:`~backpack_attention.report.cli`: the ``backpack-attention`` command line
  (also ``python -m backpack_attention.report``).

The framework names are re-exported here; see :mod:`backpack_attention.report.framework` for how
to add a section.
"""

from backpack_attention.report.framework import (
    DEFAULT_OUT,
    SECTION_MODULES,
    SECTIONS,
    Figure,
    ReportContext,
    ReportOptions,
    Section,
    SectionOutcome,
    SectionResult,
    available_sections,
    fmt,
    layout_of,
    md_table,
    register_section,
    registered_sections,
    run_report,
)
from backpack_attention.report import sections as _sections  # noqa: E402,F401 (registers the built-in sections)

__all__ = [
    "DEFAULT_OUT",
    "SECTION_MODULES",
    "SECTIONS",
    "Figure",
    "ReportContext",
    "ReportOptions",
    "Section",
    "SectionOutcome",
    "SectionResult",
    "available_sections",
    "fmt",
    "layout_of",
    "md_table",
    "register_section",
    "registered_sections",
    "run_report",
]
