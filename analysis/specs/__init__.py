"""The analyses, each declared once (:class:`~analysis.specs.base.Spec`): the CLI subcommand, the
background job and the page's inline-or-job rule all come from these declarations. Adding one is a
module here and a line below."""

from __future__ import annotations

import importlib

from analysis.specs.base import Spec

MODULES = {  # command -> module (imported on first use: `--help` imports no torch)
    "inspect": "analysis.specs.inspect",
    "align": "analysis.specs.align",
    "diff": "analysis.specs.diff",
    "overlap": "analysis.specs.overlap",
    "trajectory": "analysis.specs.trajectory",
    "geometry": "analysis.specs.geometry",
    "importance": "analysis.specs.importance",
    "evaluate-selectors": "analysis.specs.evaluate_selectors",
    "attribute": "analysis.specs.attribute",
    "behaviour": "analysis.specs.behaviour",
    "patch": "analysis.specs.patch",
}


def get_spec(name: str) -> Spec:
    """The spec of an analysis by its command name.

    Raises:
        KeyError: not an analysis.
    """
    return importlib.import_module(MODULES[name]).SPEC


__all__ = ["MODULES", "Spec", "get_spec"]
