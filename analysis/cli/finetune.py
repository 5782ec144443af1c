"""``finetune``, ``run-queue`` and ``compare-runs``: masked fine-tuning from the command line.

The ``finetune`` options are generated from :class:`~analysis.finetune.config.FinetuneConfig`'s
fields (name, type, choices, help, default), the single declaration the page's form also reads.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from analysis.cli.common import check_outputs, density, quiet_transformers, tolerance
from analysis.errors import SubnetscopeError
from analysis.jobs.progress import Progress
from analysis.definitions import PAPER_TOL


class FinetuneArgsError(SubnetscopeError):
    pass


def _flag(f) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    """One argument per :class:`FinetuneConfig` field, generated from the field: ``--name`` (or the
    field's ``flag``), its type, choices, ``nargs`` and ``metavar``, and its help text followed by
    its default. Every default is None on the command line, so a field not given takes the
    dataclass's default (and ``--resume`` can tell "not given" from "given").

    The mask sources (fields marked ``source``) are mutually exclusive; the returned group lets the
    caller add ``--resume`` to it.
    """
    from analysis.finetune.config import FinetuneConfig

    hints = typing.get_type_hints(FinetuneConfig)
    sources = parser.add_mutually_exclusive_group()
    for f in fields(FinetuneConfig):
        meta = f.metadata
        target = sources if meta.get("source") else parser
        text = meta.get("help", "")
        if f.default is not MISSING and f.default not in (None, False):
            text += f" Default: {f.default}."
        kwargs: dict = {"help": text, "default": None}
        if f.name == "checkpoint":
            parser.add_argument("checkpoint", nargs="?", help=meta.get("help"))
            continue
        base = typing.get_args(hints[f.name]) or (hints[f.name],)
        kind = next(t for t in base if t is not type(None))
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            if typing.get_origin(kind) is list:
                kind = str
            kwargs["type"] = density if meta.get("fraction") else tolerance if meta.get("tolerance") else kind
            for key in ("choices", "nargs", "metavar"):
                if key in meta:
                    kwargs[key] = meta[key]
        target.add_argument(_flag(f), dest=f.name, **kwargs)
    return sources


def config_from_args(args) -> FinetuneConfig:  # noqa: F821 (a string annotation)
    """The :class:`FinetuneConfig` of the given fields (the others take their defaults)."""
    from analysis.finetune.config import FinetuneConfig

    return FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)
                             if getattr(args, f.name, None) is not None})


def cmd_finetune(args) -> int:
    """``finetune``: SIGTERM (a cancel) and Ctrl-C stop after the current step with the state
    saved, so ``--resume`` continues; a second Ctrl-C stops at once."""
    stop = {"flag": False}
    main_rank = int(os.environ.get("RANK", "0")) == 0

    def _stop(signum, frame):  # a cancel: finish the current step, keep every metric, status cancelled
        stop["flag"] = True

    def _interrupt(signum, frame):  # Ctrl-C: as SIGTERM (the state is saved); a second one stops at once
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True
        if main_rank:
            _say("\ninterrupted: stopping after the current step and saving the state (finetune --resume "
                 "continues it); press Ctrl-C again to stop at once, without saving\n")

    previous = signal.signal(signal.SIGTERM, _stop), signal.signal(signal.SIGINT, _interrupt)
    try:
        return _finetune(args, stop)
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def _say(text: str) -> None:
    """Writes to stderr from a signal handler: straight to the descriptor, since the handler may run
    while the progress bar is in the middle of a buffered write (a reentrant write would raise)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced stderr (tests): its own write
        sys.stderr.write(text)
        return
    os.write(fd, text.encode())


def _finetune(args, stop: dict) -> int:
    from analysis.finetune.config import FinetuneConfig
    from analysis.finetune.run import resume_finetune, run_finetune

    quiet_transformers(args.quiet)
    prog = Progress("finetune", not args.quiet and int(os.environ.get("RANK", "0")) == 0, args.progress_file)
    try:
        if args.resume:
            summary = resume_finetune(args.resume, steps=args.steps, should_stop=lambda: stop["flag"],
                                      progress=prog)
            out, source = args.resume, summary["mask_source"]
        else:
            if args.out is None or (args.checkpoint is None) == (args.config is None):
                raise FinetuneArgsError("finetune needs CKPT (or --config FILE) and --out RUN_DIR, or --resume RUN_DIR")
            if args.config is not None:
                from analysis.jobs import RunDir
                from analysis.jobs.rundir import read_json_file

                try:
                    saved = read_json_file(Path(args.config), "run configuration")
                except FileNotFoundError:
                    raise FinetuneArgsError(f"{args.config}: no such run configuration file") from None
                try:
                    config = FinetuneConfig.from_dict(saved)
                except SubnetscopeError as e:
                    raise FinetuneArgsError(f"{args.config}: damaged run configuration ({e})") from None

                run = RunDir(args.out)
                if run.status() == "cancelled" and not run.metrics_file.exists():
                    print(f"{args.out}: cancelled before it started")
                    return 0
            else:
                config = config_from_args(args)
            from analysis.jobs.queue import register

            # once the run owns its directory, the page lists it too (runs started from the CLI)
            summary = run_finetune(config, args.out, should_stop=lambda: stop["flag"], progress=prog,
                                   overwrite=args.overwrite, on_start=register)
            out, source = args.out, config.mask_source
    finally:
        prog.close()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    final = summary.get("final", {})
    metric = summary.get("metric", "accuracy")
    value = final.get(metric)
    start = (summary.get("initial") or {}).get(metric)
    print(f"{summary['status']}: {summary['steps_done']} steps, {summary['trainable']:,} trainable elements "
          f"({source}); loss {final.get('loss', float('nan')):.4f}, {metric} "
          + (f"{start:.4g} -> " if start is not None else "") + f"{'n/a' if value is None else f'{value:.4g}'}")
    if summary.get("metrics_missing"):
        print(f"warning: {Path(out) / 'metrics.jsonl'}: {summary['metrics_missing']} rows before the saved step "
              "were lost (a damaged file) and cannot be recomputed", file=sys.stderr)
    if summary.get("outside_mask_changed") is not None:
        print(f"  elements changed outside the mask: {summary['outside_mask_changed']}")
    if "ranks_identical" in summary:
        print(f"  {summary['processes']} processes; final weights identical on every rank: "
              f"{summary['ranks_identical']}")
    print(f"run directory: {out}")
    return 0


def cmd_run_queue(args) -> int:
    from analysis.jobs.queue import work

    n = work()
    print(f"trained {n} queued run(s)")
    return 0


def cmd_compare_runs(args) -> int:
    from analysis.finetune.compare import compare_runs
    from analysis.io import Inputs, write_json_atomic

    check_outputs(args, Inputs([*args.runs, args.reference]), "json")
    d = compare_runs(args.runs, reference=args.reference, tol=args.tol)
    for w in d["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    write_json_atomic(args.json, d)
    for r in d["runs"]:
        extra = ""
        if "to_reference_identical_fraction" in r:
            cos = r["to_reference_cosine"]
            extra = (f"  identical to reference {r['to_reference_identical_fraction']:.3f}, "
                     f"update cosine {cos if cos is None else round(cos, 3)}")
        print(f"{r['run']}: {r['status']}, {r['mask_source']}, accuracy {r['accuracy']}, "
              f"outside mask {r['outside_mask_changed']}{extra}")
    for v in d["verdicts"]:  # each masked run against a random mask at the same budget
        ci = v["accuracy_gap_ci"]
        gap = "" if ci is None else f": accuracy gap {v['accuracy_gap']:+.3f}, 95% [{ci[0]:+.3f}, {ci[1]:+.3f}]"
        print(f"verdict: {v['run']} ({v['mask_source']}) {v['verdict']} {v['random']}{gap}")
    print(f"wrote {args.json}")
    return 0


def register(sub) -> None:
    s = sub.add_parser("finetune", help="train only a subnetwork (mask, selector, diff, random, ID3) or all of it",
                       description="Masked fine-tuning. Runs data-parallel unchanged under `torchrun "
                                   "--standalone --nproc_per_node N -m analysis finetune ...` or `accelerate launch`.")
    sources = add_config_arguments(s)
    sources.add_argument("--resume", metavar="RUN_DIR", help="continue this run directory from its saved state")
    s.add_argument("--config", metavar="FILE", help="take the whole configuration from a run's config.json")
    s.add_argument("--out", metavar="RUN_DIR", help="the run directory to write: new, empty, or an earlier run's")
    s.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out that is not a Subnetscope run directory (never allowed: "
                        "an input, or a directory holding or inside one)")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--progress-file", metavar="P", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("run-queue", help="train the queued runs of the app one at a time (started by the app)")
    s.set_defaults(func=cmd_run_queue)

    s = sub.add_parser("compare-runs", help="metrics, inside-mask counts and distance to a reference run")
    s.add_argument("runs", nargs="+", metavar="RUN")
    s.add_argument("--reference", metavar="RUN", help="e.g. the full fine-tune of the same task")
    s.add_argument("--tol", type=tolerance, default=PAPER_TOL)
    s.add_argument("--json", metavar="OUT", required=True)
    s.add_argument("--quiet", action="store_true", help="accepted as by every command (no progress is shown)")
    s.set_defaults(func=cmd_compare_runs)
