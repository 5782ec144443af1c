"""What every command shares: argument types, the inputs no output may touch, output checks,
number formatting, and the run arguments (``--json``, ``--quiet``, the hidden ``--progress-file``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from analysis.errors import SubnetscopeError

EXIT_USAGE = 2


def fmt_int(n) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def ratio(x) -> str:
    """A ratio with 3 decimals, or "undefined" (None: e.g. o1 of a run that changed nothing)."""
    return "undefined" if x is None else f"{x:.3f}"


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def inputs_of(refs=(), data=None):
    """The inputs no output may touch: local checkpoint paths (a hub id: its cache folder), mask
    and data files."""
    from analysis.checkpoints import open_checkpoint
    from analysis.io import Inputs

    inputs = Inputs()
    for ref in refs:
        if ref is None:
            continue
        if Path(str(ref)).expanduser().exists():
            inputs.add(ref)
        else:
            inputs.add(open_checkpoint(ref).path)  # a hub id from the cache; a bad reference says so here
    if data is not None:
        inputs.add(data)
    return inputs


def check_outputs(args, inputs, *names: str) -> None:
    """Before any work: every output file the command will write may be written (see
    :func:`analysis.io.check_output_file`), and no two outputs are the same file."""
    from analysis.io import OutputError, check_output_file

    seen = {}
    for name in names:
        path = getattr(args, name, None)
        if not path:
            continue
        real = check_output_file(path, inputs)
        if real in seen:
            raise OutputError(f"{path}: given as both --{seen[real]} and --{name.replace('_', '-')}")
        seen[real] = name.replace("_", "-")


def quiet_transformers(quiet: bool) -> None:
    if quiet:
        from transformers.utils import logging

        logging.disable_progress_bar()


def options(pairs: list[str]) -> dict:
    """``--option key=value`` pairs; numbers and true/false are converted."""
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise SubnetscopeError(f"--option {p!r}: expected key=value")
        k, v = p.split("=", 1)
        low = v.lower()
        if low in ("true", "false"):
            out[k] = low == "true"
            continue
        for conv in (int, float):
            try:
                out[k] = conv(v)
                break
            except ValueError:
                continue
        else:
            out[k] = v
    return out


def plain(obj):
    """info dicts may hold tensors or tuples: keep what JSON can say."""
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return {k: (v if isinstance(v, (str, int, float, bool, type(None), list)) else str(v)) for k, v in obj.items()}


def density(s: str) -> float:
    """argparse type: a fraction in (0, 1]."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"density must be in (0, 1], got {s}")
    return v


def tolerance(s: str) -> float:
    """argparse type: a finite number ≥ 0."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not (v >= 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"tolerance must be finite and >= 0, got {s}")
    return v


def add_run_args(s) -> None:
    """--json OUT, --quiet, and the hidden --progress-file a page's background job polls."""
    s.add_argument("--json", metavar="OUT", required=True)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--progress-file", metavar="P", help=argparse.SUPPRESS)


def add_data_args(s) -> None:
    s.add_argument("--data", default="demo", help="demo (the arithmetic task), a .txt/.jsonl file, or a dataset name")
    s.add_argument("--samples", type=int, default=32, help="calibration sequences (default 32)")
    s.add_argument("--seq-len", type=int, default=64, help="tokens per sequence at most (default 64)")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--scope", default="blocks", choices=("blocks", "all"),
                   help="blocks: the attention and MLP matrices of the transformer blocks; all: every parameter")
