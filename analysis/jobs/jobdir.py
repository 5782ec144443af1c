"""Background jobs: long analyses run as a subprocess of the same CLI, writing to a job directory.

A job directory holds ``job.json`` (command, pid, start time), ``progress.json`` (written by
the child: done / total / current tensor / status), ``result.json`` (the command's ``--json``
output, written atomically last) and ``log.txt`` (stderr). The app polls it; nothing of the
work runs inside a page rerun, and a job survives a page reload or an app restart. The job id
is a hash of the command and the checkpoints' file fingerprints, so the same request finds its
finished result instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from analysis.checkpoints import fingerprint
from analysis.io import os_error, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]


def jobs_dir() -> Path:
    from analysis.demo import subnetscope_home

    return subnetscope_home() / "jobs"


def job_id(argv: list[str], refs: list[str]) -> str:
    """Stable id of a request: the CLI arguments plus the fingerprint of every checkpoint."""
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


def start(argv: list[str], refs: list[str], root: Path | None = None) -> JobState:
    """Starts ``python -m analysis <argv> --json DIR/result.json --progress-file DIR/progress.json``
    in the background unless the same job is running or finished."""
    jid = job_id(argv, refs)
    d = (root or jobs_dir()) / jid
    st = state(d)
    if st.status in ("running", "done"):
        return st
    cmd = [sys.executable, "-m", "analysis", *argv, "--json", str(d / "result.json"),
           "--progress-file", str(d / "progress.json")]
    try:
        d.mkdir(parents=True, exist_ok=True)
        for f in ("progress.json", "result.json"):
            (d / f).unlink(missing_ok=True)
        with open(d / "log.txt", "wb") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
    except OSError as e:  # a full disk or a read-only home: one line for the page
        raise os_error(d, e) from None
    write_json_atomic(d / "job.json", {"argv": argv, "refs": refs, "pid": proc.pid, "started": time.time()})
    write_json_atomic(d / "progress.json", {"status": "running", "done": 0, "total": 0, "current": ""})
    return state(d)


def state(d: Path) -> JobState:
    """Reads a job directory; a job whose process is gone without a final status is "died"."""
    jid = d.name
    if (d / "result.json").is_file():
        return JobState(jid, d, "done")
    try:
        p = json.loads((d / "progress.json").read_text())
        job = json.loads((d / "job.json").read_text())
    except (OSError, ValueError):
        return JobState(jid, d, "missing")
    status = p.get("status", "running")
    if status == "running" and not alive(job.get("pid")):
        status = "died"
        p["error"] = last_line(d / "log.txt") or "the job's process ended without a result"
    return JobState(jid, d, status, p.get("done", 0), p.get("total", 0), p.get("current", ""), p.get("error", ""))


def cancel(d: Path) -> None:
    """Asks a running job to stop (SIGTERM: the CLI exits cleanly, status "cancelled")."""
    try:
        pid = json.loads((d / "job.json").read_text())["pid"]
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError, KeyError):
        pass


def alive(pid) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def last_line(p: Path) -> str:
    try:
        lines = [ln for ln in p.read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1][:300] if lines else ""
    except OSError:
        return ""
