"""What the commands share beyond the specs' helpers (:mod:`analysis.specs.common`, re-exported here):
number formatting, standard output for ``-``, and the run arguments of the commands that are not specs."""

from __future__ import annotations


from analysis.io import STDOUT
from analysis.specs.common import (OUTPUTS, check_outputs, density, fmt_int, human_bytes,  # noqa: F401
                                   inputs_of, options, plain, quiet_transformers, ratio, tolerance)

EXIT_USAGE = 2


def run_command(args) -> int:
    """Runs the parsed command. An output given as ``-`` takes standard output, and what the
    command prints meanwhile goes to stderr (``--json - | jq`` reads the JSON alone)."""
    if STDOUT not in (getattr(args, n, None) for n in OUTPUTS):
        return args.func(args)
    from analysis.io import stdout_reserved

    with stdout_reserved():
        return args.func(args)
