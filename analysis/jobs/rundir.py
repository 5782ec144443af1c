"""A run directory on disk: what it holds, whose it is, who writes it, and how it stands.

The one owner of a run directory's layout and state, used by the trainer (:mod:`.run`), the queue
(:mod:`.queue`) and the comparison (:mod:`.compare`):

- the **marker** ``.subnetscope-run`` says the directory is a Subnetscope run (a model directory
  also has a ``config.json``, so file names cannot say it): a new run refuses a non-empty
  directory without it unless asked to overwrite, and deletes nothing in a directory it does not
  mark as its own;
- the **lock**: the process training a run holds an exclusive ``flock`` on the marker, so a
  second writer (another ``finetune --out`` of the same directory, a ``--resume`` of a run still
  training) is refused in one line;
- the **status** (queued, running, finished, cancelled, failed, died) from ``summary.json`` and
  the liveness of the process that wrote it;
- the **state** a run resumes from (``state/``, or what a crash while saving left).
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from analysis.errors import SubnetscopeError

MARKER = ".subnetscope-run"
FORMAT = "subnetscope.run/1"
ACTIVE = ("queued", "running")
# what a run writes into its directory (all of it may be replaced by a new run in a marked directory)
OWN_FILES = ("config.json", "summary.json", "metrics.jsonl", "eval.json", "mask.safetensors", "progress.json",
             "job.json", "log.txt")
OWN_DIRS = ("model", "model.tmp", "state", "state.tmp", "state.old")


class RunError(SubnetscopeError):
    """A run directory that cannot be read or written, in one line."""


def is_run_dir(d: str | Path) -> bool:
    """True when ``d`` carries the marker of a Subnetscope run directory."""
    return (Path(d) / MARKER).is_file()


def mark(d: str | Path) -> None:
    """Makes ``d`` (created if missing) a run directory: writes the marker once."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    marker = d / MARKER
    if not marker.is_file():
        from analysis.io import write_json_atomic

        write_json_atomic(marker, {"format": FORMAT})


class RunLock:
    """An exclusive ``flock`` on a run directory's marker, held while a process writes the run.

    The kernel drops it when the process ends, however it ends, so a crashed run never leaves a
    stale lock. Use as a context manager or call :meth:`release`.

    Raises:
        RunError: another process holds the lock (one line naming the directory).
    """

    def __init__(self, d: str | Path):
        self.dir = Path(d)
        mark(self.dir)
        self._f = open(self.dir / MARKER, "rb")
        try:
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._f.close()
            self._f = None
            p = pid(self.dir)
            raise RunError(f"{self.dir}: another process{f' (pid {p})' if p else ''} is writing this run "
                           "directory; wait for it or cancel it first") from None

    def release(self) -> None:
        if self._f is not None:
            self._f.close()  # closing the file drops the flock
            self._f = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def locked(d: str | Path) -> bool:
    """True while some process holds the run directory's lock."""
    try:
        f = open(Path(d) / MARKER, "rb")
    except OSError:
        return False
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        f.close()
    return False


def read_json(path: Path):
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def summary(d: str | Path) -> dict:
    s = read_json(Path(d) / "summary.json")
    return s if isinstance(s, dict) else {}


def status(d: str | Path) -> str:
    """queued, running, finished, cancelled, failed, or died (running, but its process is gone)."""
    d = Path(d)
    s = read_json(d / "summary.json")
    if not isinstance(s, dict):
        return "queued" if (d / "config.json").is_file() else "failed"
    st = s.get("status", "failed")
    if st == "running":
        p = pid(d)
        if p is not None and not alive(p):
            return "died"
    return st


def pid(d: str | Path) -> int | None:
    """The pid training the run: the process that wrote the summary (a run started from the CLI,
    or resumed), else the queue worker's child (``job.json``)."""
    for f in ("summary.json", "job.json"):
        try:
            return int(json.loads((Path(d) / f).read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None



def alive(p) -> bool:
    from analysis.jobs import alive as _alive

    return _alive(p)


def state_dir(d: str | Path) -> Path | None:
    """The saved state of a run directory: ``state/``, or what a crash while saving left
    (``state.tmp/`` complete, or the previous ``state.old/``); None when there is none."""
    for name in ("state", "state.tmp", "state.old"):
        s = Path(d) / name
        if (s / "meta.json").is_file() and (s / "state.pt").is_file():
            return s
    return None


def saved_step(d: str | Path) -> int:
    """The step the saved state was taken at.

    Raises:
        RunError: no state, or a ``meta.json`` that cannot be read (one line).
    """
    s = state_dir(d)
    if s is None:
        raise RunError(f"{d}: no saved state to resume from")
    meta = read_json(s / "meta.json")
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or isinstance(meta.get("step"), bool):
        raise RunError(f"{s / 'meta.json'}: unreadable saved state (not the JSON a run writes)")
    return meta["step"]
