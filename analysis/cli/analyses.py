"""The analysis commands — ``diff``, ``overlap``, ``trajectory``, ``geometry``, ``importance``,
``evaluate-selectors``, ``attribute`` — generated from their specs (:mod:`analysis.specs`), and the
hidden ``run-job JOB_DIR`` a page's background job runs: the params as the job file holds them,
run as the command runs them."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from analysis.specs import MODULES, get_spec
    from analysis.specs.base import add_parser

    for name in MODULES:
        add_parser(sub, get_spec(name))
    s = sub.add_parser("run-job", help=argparse.SUPPRESS)
    s.add_argument("job_dir")
    s.set_defaults(func=cmd_run_job)


def cmd_run_job(args) -> int:
    from analysis.jobs.jobdir import JobDir

    return JobDir(args.job_dir).run_here()
