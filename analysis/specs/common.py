"""What the specs share: argument types and checks, the inputs no output may touch, output checks,
the sizes their costs are estimated from, and shared help texts."""

from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path

from analysis.errors import SubnetscopeError

RAY_HELP = ("run as Ray tasks, one per shard file: alone, RAY_ADDRESS or a local Ray started for the command; with "
            "an address (host:port, ray://host:port), that cluster (the checkpoints must be readable at the same "
            "paths on every node)")
DEVICE_HELP = "auto (cuda when available), cpu or cuda"


def parameters_of(ref: str) -> int:
    """A checkpoint's parameter count from its headers (no weights read), remembered per file
    fingerprint."""
    from analysis.checkpoints import fingerprint

    return _count(str(ref), fingerprint(ref))


@functools.lru_cache(maxsize=256)
def _count(ref: str, fp: tuple) -> int:
    from analysis.checkpoints import open_checkpoint

    return open_checkpoint(ref, local_only=True).total_params


def ratio(x) -> str:
    """A ratio with 3 decimals, or "undefined" (None: e.g. o1 of a run that changed nothing)."""
    return "undefined" if x is None else f"{x:.3f}"


def inputs_of(refs=(), data=None):
    """The inputs no output may touch: local checkpoint paths (a hub id: its cache folder, read
    from the cache only — one not downloaded yet is on no disk), mask and data files."""
    from analysis.checkpoints import cached_hub_id, is_hub_id, open_checkpoint
    from analysis.io import Inputs

    inputs = Inputs()
    for ref in refs:
        if ref is None:
            continue
        if Path(str(ref)).expanduser().exists():
            inputs.add(ref)
        elif is_hub_id(ref):
            inputs.add(cached_hub_id(str(ref)))  # the outputs are checked before any download
        else:
            open_checkpoint(ref)  # a bad reference says so here
    if data is not None:
        inputs.add(data)
    return inputs


OUTPUTS = ("json", "mask_out", "scores_out")  # the options that name an output file


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
        if str(real) == os.devnull:
            continue  # discarded: any number of outputs may go there
        if real in seen:
            raise OutputError(f"{path}: given as both --{seen[real]} and --{name.replace('_', '-')}")
        seen[real] = name.replace("_", "-")


def quiet_transformers(quiet: bool) -> None:
    if quiet:
        from transformers.utils import logging

        logging.disable_progress_bar()


def options(pairs: list[str]) -> dict[str, str]:
    """``--option KEY=VALUE`` pairs as text, in the order given; the selector converts each value to
    the type it declares (:func:`analysis.importance.selectors.parse_options`).

    Raises:
        SubnetscopeError: a pair without ``=``, with nothing before or after it, or a key given twice.
    """
    from analysis.errors import quoted

    out: dict[str, str] = {}
    for p in pairs or []:
        key, eq, value = p.partition("=")
        key = key.strip()
        if not eq:
            raise SubnetscopeError(f"--option {quoted(p)}: expected KEY=VALUE")
        if not key:
            raise SubnetscopeError(f"--option {quoted(p)}: no option name before '='")
        if not value:
            raise SubnetscopeError(f"--option {quoted(p)}: no value after '='")
        if key in out:
            raise SubnetscopeError(f"--option {quoted(key)} given twice ({quoted(key + '=' + out[key])} and "
                                   f"{quoted(p)}); give each option once")
        out[key] = value
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


def fmt_int(n) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)
