"""The slots every computation of the app takes turns in: analysis jobs and fine-tunes alike.

One at a time by default, because each already uses every core (numba and torch threads): three
geometry jobs at once on two cores ran each 3x slower, together slower than one after another.
``SUBNETSCOPE_JOBS=N`` allows N at once (a machine with more cores than one job uses). A slot is an
``fcntl`` lock on a file beside the jobs folder (``jobs.lock``, ``jobs.lock.1``, …), released when the
holder exits, even if it dies; its file names what holds it, for the message of those waiting.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from analysis.errors import SubnetscopeError
from analysis.io import write_json_atomic
from analysis.paths import jobs_dir

SLOT_LOCK = "jobs.lock"  # beside the jobs folder (not in it: it holds only job directories)


def slots() -> int:
    """How many computations may run at once: ``SUBNETSCOPE_JOBS`` (default 1).

    Raises:
        SubnetscopeError: a value that is not a whole number ≥ 1.
    """
    raw = os.environ.get("SUBNETSCOPE_JOBS", "1")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise SubnetscopeError(f"SUBNETSCOPE_JOBS={raw!r}: the number of jobs at once, a whole number >= 1")
    return n


def is_app_job(progress_file: str | Path) -> bool:
    """Whether a progress file is a job's of the app's jobs folder (only those take turns: a
    ``--progress-file`` elsewhere is the user's, and no lock goes next to it)."""
    try:
        return Path(progress_file).resolve().parent.parent == jobs_dir().resolve()
    except OSError:
        return False


class SlotAbandoned(Exception):
    """Raised by :func:`job_slot` when ``give_up()`` said so before a slot was free."""


def slot_lock() -> Path:
    """The first slot's lock, beside the app's jobs folder (the others: ``.1``, ``.2`` …)."""
    return jobs_dir().parent / SLOT_LOCK


def _lock_files(first: Path, n: int) -> list[Path]:
    return [first] + [first.with_name(f"{first.name}.{i}") for i in range(1, n)]


@contextlib.contextmanager
def job_slot(progress_file: str | Path, what: str, *, lock: str | Path | None = None, give_up=None):
    """Runs the body once a slot is free. While waiting, the progress file says for what, and a
    cancel (SIGTERM) still ends the job.

    Args:
        progress_file (str | Path): the job's ``progress.json`` in ``<jobs>/<id>/`` (or a run's).
        what (str): this job, for the message of the jobs waiting behind it.
        lock (str | Path, optional): the first slot's lock file, when the progress file is not in the
            jobs folder (a fine-tune's run directory: :func:`slot_lock`). Default: beside the jobs folder.
        give_up (callable, optional): polled while waiting; True raises :class:`SlotAbandoned`
            (the run was cancelled while it waited). Default: wait until a slot is free.
    """
    import fcntl

    first = Path(lock) if lock is not None else Path(progress_file).resolve().parent.parent.parent / SLOT_LOCK
    first.parent.mkdir(parents=True, exist_ok=True)
    files = [open(f, "a+") for f in _lock_files(first, slots())]
    try:
        told, held = False, None
        while held is None:
            for f in files:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = f
                    break
                except BlockingIOError:
                    continue
            if held is not None:
                break
            if give_up is not None and give_up():
                raise SlotAbandoned(what) from None
            if not told:
                holders = []
                for f in files:
                    f.seek(0)
                    holders.append(f.read().strip() or "another job")
                write_json_atomic(progress_file, {"status": "running", "done": 0, "total": 0,
                                                  "current": f"queued: waiting for {' and '.join(holders)[:120]} "
                                                             "to finish"})
                told = True
            time.sleep(0.5)
        held.seek(0)
        held.truncate()
        held.write(what)
        held.flush()
        try:
            yield
        finally:
            held.seek(0)
            held.truncate()
            fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    finally:
        for f in files:
            f.close()
