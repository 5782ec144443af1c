"""What the commands share beyond the specs' helpers (:mod:`analysis.specs.common`, re-exported here):
number formatting, standard output for ``-``, and the run arguments of the commands that are not specs."""

from __future__ import annotations

import argparse

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


def add_run_args(s) -> None:
    """--json OUT, --quiet, and the hidden --progress-file a page's background job polls."""
    s.add_argument("--json", metavar="OUT", required=True)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--progress-file", metavar="P", help=argparse.SUPPRESS)


def add_data_args(s) -> None:
    s.add_argument("--data", default="demo", help="demo (the arithmetic task), a .txt/.jsonl file, or a dataset name")
    s.add_argument("--samples", type=int, default=32, help="calibration sequences (default 32)")
    s.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence at most (default 64, or the model's positions when fewer)")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--scope", default="blocks", choices=("blocks", "all"),
                   help="blocks: the attention and MLP matrices of the transformer blocks; all: every parameter")
