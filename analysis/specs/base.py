"""One declaration per analysis: its parameters, how it runs, its JSON, its cost, its inputs.

A :class:`Spec` is what a command, a background job and a page share. From it come

- the CLI subcommand (:func:`add_parser`): one argument per field of the params dataclass (its help,
  type, choices, ``nargs`` and flag in the field's metadata), plus the shared ``--json``, ``--quiet``
  and hidden ``--progress-file``;
- the job (:mod:`analysis.jobs.jobdir`): the params as JSON (:func:`params_to_json`), never an argv,
  read back by :func:`params_from_json` and run by :func:`execute` as the CLI runs them;
- the page's rule (``ui.work.analysis``): inline below the inline limit by :attr:`Spec.cost`, a job
  above it, both keyed by :func:`cache_key`.

Adding an analysis is one module in :mod:`analysis.specs` and one line in its registry. Modules here
import no torch at import time: ``python -m analysis --help`` builds every parser from them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import Any

from analysis.errors import SubnetscopeError

FORMAT = "subnetscope.params/1"  # the params file of a job


class ParamsError(SubnetscopeError):
    """Params that do not fit their spec (a job file written by another version, a page's typo)."""


@dataclass(frozen=True)
class Spec:
    """One analysis.

    Attributes:
        name (str): the CLI command, the job's label.
        help (str): one line for ``--help``.
        params (type): a dataclass whose ``__post_init__`` checks the values (one-line
            :class:`~analysis.errors.SubnetscopeError`); field metadata drives the CLI.
        run (callable): ``run(params, progress) -> dict``: the result's JSON form (``progress`` is a
            ``progress(done, total, name)`` callback or None); it writes the params' own output
            files (a mask, scores).
        report (callable): ``report(params, result)``: the human summary printed by the CLI.
        refs (callable): ``refs(params) -> list[str]``: the checkpoints it reads (their file
            fingerprints key its cache and job).
        cost (callable): ``cost(params) -> int``: the work, in parameters read or passed through,
            estimated from the inputs' headers (no weights read); the page runs below the inline
            limit inline.
        data (callable, optional): ``data(params) -> list[str]``: the files besides the checkpoints
            (masks, calibration data) no output may touch. Default: none.
        outputs (tuple[str, ...]): params fields naming output files, beside ``--json``.
        json_required (bool): ``--json`` must be given (else the summary alone may be asked for).
        result (type): the ``TypedDict`` of the JSON it writes (:mod:`analysis.specs.results`).
        loads_model (bool): it loads a transformers model (``--quiet`` then also silences
            transformers' own bars; a spec that reads tensors only never imports transformers).
    """

    name: str
    help: str
    params: type
    run: Callable[[Any, Any], dict]
    report: Callable[[Any, dict], None]
    refs: Callable[[Any], list[str]]
    cost: Callable[[Any], int]
    data: Callable[[Any], list[str]] | None = None
    outputs: tuple[str, ...] = ()
    loads_model: bool = False
    result: type | None = None
    json_required: bool = True


# ---------------------------------------------------------------------------- params

def params_to_json(params) -> dict:
    """The params as plain JSON (tuples as lists), for a job file and a cache key."""
    return {f.name: (list(v) if isinstance(v := getattr(params, f.name), tuple) else v) for f in fields(params)}


def params_from_json(spec: Spec, obj: dict):
    """The params a job file holds, checked by the params' own ``__post_init__``.

    Raises:
        ParamsError: a field the spec does not declare, or a required one missing.
    """
    if not isinstance(obj, dict):
        raise ParamsError(f"{spec.name}: params must be a JSON object")
    names = {f.name for f in fields(spec.params)}
    unknown = sorted(set(obj) - names)
    if unknown:
        raise ParamsError(f"{spec.name}: unknown params {', '.join(unknown)}")
    try:
        return spec.params(**obj)
    except TypeError as e:  # a required field missing
        raise ParamsError(f"{spec.name}: {e}") from None


def cache_key(spec: Spec, params) -> str:
    """The id of a request: the spec, its params and the fingerprint of every checkpoint it reads."""
    from analysis.checkpoints import fingerprint

    key = json.dumps([spec.name, params_to_json(params), [fingerprint(r) for r in spec.refs(params)]],
                     sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- the CLI

def _kind(hint) -> type:
    base = [t for t in (typing.get_args(hint) or (hint,)) if t is not type(None)]
    kind = base[0]
    return str if typing.get_origin(kind) in (list, tuple) else kind


def add_parser(sub, spec: Spec) -> argparse.ArgumentParser:
    """The subcommand of ``spec``: its params' fields as arguments, then ``--json``, ``--quiet`` and
    the hidden ``--progress-file``."""
    s = sub.add_parser(spec.name, help=spec.help)
    hints = typing.get_type_hints(spec.params)
    for f in fields(spec.params):
        meta = f.metadata
        if meta.get("cli") is False:
            continue
        kwargs: dict = {"help": meta.get("help")}
        for key in ("nargs", "metavar", "choices", "const"):
            if key in meta:
                kwargs[key] = meta[key]
        kind = _kind(hints[f.name])
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = meta.get("type", kind)
            if "action" in meta:
                kwargs["action"] = meta["action"]
        if meta.get("positional"):
            s.add_argument(f.name, **kwargs)
            continue
        default = f.default if f.default is not MISSING else None
        if meta.get("required") or (f.default is MISSING and f.default_factory is MISSING):  # type: ignore[misc]
            kwargs["required"] = True
        s.add_argument(meta.get("flag", "--" + f.name.replace("_", "-")), dest=f.name, default=default, **kwargs)
    s.add_argument("--json", metavar="OUT", required=spec.json_required,
                   help=None if spec.json_required else "write the full result here")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--progress-file", metavar="P", help=argparse.SUPPRESS)
    s.set_defaults(spec=spec, func=lambda args: run_cli(spec, args))
    return s


def params_from_args(spec: Spec, args):
    values = {}
    for f in fields(spec.params):
        if f.metadata.get("cli") is False:
            continue
        v = getattr(args, f.name)
        values[f.name] = tuple(v) if isinstance(v, list) and f.metadata.get("pair") else v
    return spec.params(**values)


def run_cli(spec: Spec, args) -> int:
    return execute(spec, params_from_args(spec, args), json_out=args.json, quiet=args.quiet,
                   progress_file=args.progress_file)


def execute(spec: Spec, params, *, json_out: str | None, quiet: bool = True, progress_file=None,
            report: bool = True) -> int:
    """Runs ``spec`` as the CLI and a job do: the outputs checked before any work (none may touch an
    input or the weights of any checkpoint), a progress bar and/or progress file, the JSON written
    atomically, the summary printed.

    Returns:
        int: 0 (errors are raised, one line each, and turned into exit code 2 by the CLI).
    """
    from analysis.specs.common import check_outputs, inputs_of
    from analysis.io import write_json_atomic
    from analysis.jobs.progress import Progress

    inputs = inputs_of(spec.refs(params))
    for d in (spec.data(params) if spec.data else []):
        inputs.add(d)
    outs = argparse.Namespace(json=json_out, **{n: getattr(params, n) for n in spec.outputs})
    check_outputs(outs, inputs, "json", *spec.outputs)
    if quiet and spec.loads_model:
        from analysis.specs.common import quiet_transformers

        quiet_transformers(True)
    prog = Progress(spec.name, not quiet, progress_file)
    try:
        result = spec.run(params, prog)
    finally:
        prog.close()
    if json_out:  # outputs first: the summary below may go to a closed pipe
        write_json_atomic(json_out, result)
    if report:
        spec.report(params, result)
        if json_out:
            print(f"wrote {json_out}")
    return 0
