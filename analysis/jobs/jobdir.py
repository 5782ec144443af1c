"""A job directory: a long analysis run as a subprocess of the same CLI, which the app polls.

Layout (owned here, nowhere else):

- ``job.json``: the CLI arguments, the checkpoints' references, the pid and start time;
- ``progress.json``: written by the child through :class:`~analysis.jobs.progress.Progress`
  (done / total / current tensor / status);
- ``result.json``: the command's ``--json`` output, written atomically last;
- ``log.txt``: the child's stderr.

Nothing of the work runs inside a page rerun, and a job survives a page reload or an app
restart. The job id is a hash of the command and the checkpoints' file fingerprints, so the same
request finds its finished result instead of recomputing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from analysis.io import os_error, write_json_atomic
from analysis.jobs.process import alive, last_line, spawn, terminate
from analysis.jobs.progress import read_json
from analysis.paths import jobs_dir


SLOT_LOCK = "jobs.lock"  # beside the jobs folder (not in it: it holds only job directories)


def is_app_job(progress_file: str | Path) -> bool:
    """Whether a progress file is a job's of the app's jobs folder (only those take turns: a
    ``--progress-file`` elsewhere is the user's, and no lock goes next to it)."""
    try:
        return Path(progress_file).resolve().parent.parent == jobs_dir().resolve()
    except OSError:
        return False


class SlotAbandoned(Exception):
    """Raised by :func:`job_slot` when ``give_up()`` said so before the slot was free."""


def slot_lock() -> Path:
    """The one lock every computation of the app takes turns on: analysis jobs and fine-tunes."""
    return jobs_dir().parent / SLOT_LOCK


@contextlib.contextmanager
def job_slot(progress_file: str | Path, what: str, *, lock: str | Path | None = None, give_up=None):
    """Runs the body once no other job of this jobs folder is computing: jobs take turns in one
    slot (an ``fcntl`` lock on SLOT_LOCK beside the folder, released when the holder exits, even if it
    dies), because each already uses every core (numba and torch threads): three geometry jobs at
    once on two cores ran each 3x slower, together slower than one after another. While waiting
    the progress file says so and a cancel (SIGTERM) still ends the job.

    Args:
        progress_file (str | Path): the job's ``progress.json`` in ``<jobs>/<id>/``; the lock is
            ``<jobs>/../SLOT_LOCK``.
        what (str): this job, for the message of the jobs waiting behind it.
        lock (str | Path, optional): the lock file, when the progress file is not in the jobs
            folder (a fine-tune's run directory: :func:`slot_lock`). Default: beside the jobs folder.
        give_up (callable, optional): polled while waiting; True raises :class:`SlotAbandoned`
            (the run was cancelled while it waited). Default: wait until the slot is free.
    """
    import fcntl

    lock = Path(lock) if lock is not None else Path(progress_file).resolve().parent.parent.parent / SLOT_LOCK
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as f:
        told = False
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if give_up is not None and give_up():
                    raise SlotAbandoned(what) from None
                if not told:
                    f.seek(0)
                    holder = f.read().strip() or "another job"
                    write_json_atomic(progress_file, {"status": "running", "done": 0, "total": 0,
                                                      "current": f"queued: waiting for {holder[:120]} to finish"})
                    told = True
                time.sleep(0.5)
        f.seek(0)
        f.truncate()
        f.write(what)
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def job_id(argv: list[str], refs: list[str]) -> str:
    """Stable id of a request: the CLI arguments plus the fingerprint of every checkpoint."""
    from analysis.checkpoints import fingerprint

    key = json.dumps([argv, [fingerprint(r) for r in refs]], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class JobState:
    id: str
    dir: Path
    status: str  # "missing" | "running" | "done" | "failed" | "cancelled" | "died"
    done: int = 0
    total: int = 0
    current: str = ""
    error: str = ""

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0

    def result(self) -> dict:
        return json.loads((self.dir / "result.json").read_text())


class JobDir:
    """One job directory (see the module's docstring for its layout).

    Args:
        path (str | Path): the directory (it need not exist yet).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def of(cls, argv: list[str], refs: list[str], root: Path | None = None) -> JobDir:
        """The job directory of a request: ``root`` (default: the app's jobs folder) / its id."""
        return cls((root or jobs_dir()) / job_id(argv, refs))

    job_file = property(lambda self: self.path / "job.json")
    progress_file = property(lambda self: self.path / "progress.json")
    result_file = property(lambda self: self.path / "result.json")
    log_file = property(lambda self: self.path / "log.txt")

    def start(self, argv: list[str], refs: list[str]) -> JobState:
        """Starts ``python -m analysis <argv> --json result.json --progress-file progress.json``
        in the background unless this job is running or finished. ``{job}`` in an argument is
        replaced by the job directory (e.g. ``--mask-out {job}/mask.safetensors``), after the id
        was taken, so the same request finds the same directory.

        Raises:
            OutputError: the directory cannot be written (a full disk, a read-only home).
        """
        st = self.state()
        if st.status in ("running", "done"):
            return st
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            for f in (self.progress_file, self.result_file):
                f.unlink(missing_ok=True)
            self.log_file.write_bytes(b"")
            proc = spawn([*(a.replace("{job}", str(self.path)) for a in argv), "--json", str(self.result_file),
                          "--progress-file", str(self.progress_file)], self.log_file)
        except OSError as e:  # one line for the page
            raise os_error(self.path, e) from None
        write_json_atomic(self.job_file, {"argv": argv, "refs": refs, "pid": proc.pid, "started": time.time()})
        write_json_atomic(self.progress_file, {"status": "running", "done": 0, "total": 0, "current": ""})
        return self.state()

    def state(self) -> JobState:
        """How the job stands; a job whose process is gone without a final status is "died"."""
        jid = self.path.name
        if self.result_file.is_file():
            return JobState(jid, self.path, "done")
        p, job = read_json(self.progress_file), read_json(self.job_file)
        if p is None or job is None:
            return JobState(jid, self.path, "missing")
        status = p.get("status", "running")
        if status == "running" and not alive(job.get("pid"), job.get("started")):
            status = "died"
            p["error"] = last_line(self.log_file) or "the job's process ended without a result"
        return JobState(jid, self.path, status, p.get("done", 0), p.get("total", 0), p.get("current", ""),
                        p.get("error", ""))

    def cancel(self) -> None:
        """Asks a running job to stop (SIGTERM: the CLI exits cleanly, status "cancelled")."""
        job = read_json(self.job_file) or {}
        if alive(job.get("pid"), job.get("started")):
            terminate(job["pid"])
