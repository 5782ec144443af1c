"""Command line: ``python -m analysis <command> ...``, one module per command group.

- :mod:`.checkpoints`: ``inspect``, ``align``, ``demo``;
- :mod:`.analyses`: every analysis declared by a spec (:mod:`analysis.specs`): ``diff``,
  ``overlap``, ``trajectory``, ``geometry``, ``importance``, ``evaluate-selectors``, ``attribute``,
  and the hidden ``run-job`` of the app's background jobs;
- :mod:`.importance`: ``selectors``;
- :mod:`.finetune`: ``finetune`` (its options generated from ``FinetuneConfig``), ``run-queue``,
  ``compare-runs``.

Every command prints a human summary on stdout and, with ``--json OUT``, writes the full result
atomically. Bad input ends with one line on stderr and exit code 2. The work itself lives in the
analysis modules; a command parses, checks its outputs, calls them and prints.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from analysis.cli import analyses, checkpoints, finetune, importance
from analysis.cli.common import EXIT_USAGE, run_command
from analysis.errors import SubnetscopeError
from analysis.jobs.progress import Progress

__all__ = ["EXIT_USAGE", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis",
                                description="Subnetscope: parameter importance and update sparsity.")
    sub = p.add_subparsers(dest="command", required=True)
    for group in (checkpoints, analyses, importance, finetune):
        group.register(sub)
    return p


def _names(args) -> list[str]:
    """The checkpoints a command reads, by their last two path parts (for a waiting job's message)."""
    from pathlib import Path

    refs = []
    for name in ("base", "tuned", "checkpoint", "checkpoints"):
        v = getattr(args, name, None)
        refs += v if isinstance(v, list) else [v] if isinstance(v, str) else []
    return ["/".join(Path(r).parts[-2:]) for r in refs]


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    progress_file = getattr(args, "progress_file", None)
    if args.command == "run-job":  # a page's background job: its progress file is in its directory
        from analysis.jobs.jobdir import JobDir

        progress_file = JobDir(args.job_dir).progress_file
    status = Progress("", False, progress_file)
    if status.file and args.command != "finetune":  # a background job: SIGTERM is a cancel
        signal.signal(signal.SIGTERM, _terminate)
    try:
        from analysis.jobs.slots import is_app_job, job_slot

        if status.file and args.command != "finetune" and is_app_job(status.file):  # jobs take turns
            from analysis.jobs.jobdir import JobDir

            what = (JobDir(args.job_dir).what() if args.command == "run-job"
                    else " ".join([args.command, *_names(args)]))
            with job_slot(status.file, what):
                return run_command(args)
        return run_command(args)
    except SubnetscopeError as e:
        print(f"error: {e}", file=sys.stderr)
        try:
            status.write("failed", error=str(e))
        except SubnetscopeError:
            pass  # the progress file is on the same full disk: the line above says it all
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        status.write("cancelled")
        return 130
    except BrokenPipeError:  # e.g. `python -m analysis diff ... | head`: outputs are already written
        sys.stdout = open(os.devnull, "w")
        return 0
    except OSError as e:  # a full disk, a read-only path, an unreadable file ...: one line, not a traceback
        from analysis.errors import one_line

        msg = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else (e.strerror or one_line(e))
        print(f"error: {msg}", file=sys.stderr)
        try:
            status.write("failed", error=msg)
        except SubnetscopeError:
            pass
        return EXIT_USAGE
    except BaseException as e:
        status.write("failed", error=f"{type(e).__name__}: {e}")
        raise
