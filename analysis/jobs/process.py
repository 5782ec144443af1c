"""The processes behind jobs and runs: start one detached, ask whether it lives, stop it.

Liveness through ``psutil`` (portable, and it tells a zombie — exited, not yet reaped by its
parent — from a live process, and a reused pid from the process that was started).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]  # the repository: `python -m analysis` runs from here


def alive(pid, started: float | None = None) -> bool:
    """Whether process ``pid`` is running (not a zombie).

    Args:
        pid (int | None): the process id; None or 0 is never alive.
        started (float, optional): the Unix time the process was started at (as a job file records
            it): a process with this pid created more than a second later is another process
            that reused the pid. Default: None (not checked).
    """
    if not pid or isinstance(pid, bool) or not isinstance(pid, int):
        return False
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or p.create_time() <= started + 1.0
    except (psutil.Error, ValueError):  # gone, or not ours to see
        return False


def spawn(argv: list[str], log: Path, *, detach: bool = True) -> subprocess.Popen:
    """Starts ``python -m analysis <argv>`` from the repository, stdout and stderr appended to ``log``.

    Args:
        argv (list[str]): the CLI arguments.
        log (Path): the log file (created or appended to).
        detach (bool): a new session, so the process outlives the app that started it and a
            Ctrl-C in the app's terminal does not reach it. Default: True.

    Raises:
        OSError: the log cannot be written, or the process cannot be started.
    """
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "analysis", *argv], cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=f, stderr=f, start_new_session=detach)


def terminate(pid, sig: int = signal.SIGTERM) -> None:
    """Sends ``sig`` (default SIGTERM: a cancel, the CLI exits cleanly) to ``pid`` if it lives."""
    if not alive(pid):
        return
    try:
        psutil.Process(pid).send_signal(sig)
    except psutil.Error:
        pass


def last_line(path: Path) -> str:
    """The last non-blank line of a log (300 characters at most), or "" when there is none."""
    try:
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1][:300] if lines else ""
    except OSError:
        return ""
