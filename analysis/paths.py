"""Where Subnetscope keeps its files: the one owner of the home directory and what lies under it.

Imports nothing heavy (no torch), so the UI glue can find a path without loading a model stack.
"""

from __future__ import annotations

import os
from pathlib import Path


def subnetscope_home() -> Path:
    """Returns ``$SUBNETSCOPE_HOME``, or ``~/.cache/subnetscope`` when it is unset."""
    env = os.environ.get("SUBNETSCOPE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "subnetscope"


def default_demo_dir() -> Path:
    """Returns where the demo family lives by default: ``subnetscope_home() / "demo"``."""
    return subnetscope_home() / "demo"


def smollm2_dir() -> Path:
    """Returns where ``demo --real`` converts SmolLM2-135M-Instruct to by default."""
    return subnetscope_home() / "smollm2-135m-instruct"


def jobs_dir() -> Path:
    """Returns the directory of the app's background jobs: ``subnetscope_home() / "jobs"``."""
    return subnetscope_home() / "jobs"


def runs_dir() -> Path:
    """Returns ``$SUBNETSCOPE_RUNS``, or ``subnetscope_home() / "runs"``: the app's fine-tune runs."""
    env = os.environ.get("SUBNETSCOPE_RUNS")
    return Path(env).expanduser() if env else subnetscope_home() / "runs"
