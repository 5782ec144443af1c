"""Runs on disk, and a queue that trains them one at a time.

Every run is a directory (see :mod:`analysis.finetune.run`). The runs the app launches live under
``$SUBNETSCOPE_HOME/runs/``; a run started from the CLI anywhere else is registered in
``runs/index.json`` when it starts, so :func:`list_runs` finds every run of this user whether the
page or the CLI started it, after a page reload or an app restart.

The queue: :func:`enqueue` writes a run directory holding only ``config.json`` and a
``summary.json`` with status ``queued``; :func:`ensure_worker` starts (detached, at most one) the
worker ``python -m analysis run-queue``, which trains the oldest queued run as a CLI subprocess
(``job.json`` holds its pid), then the next, and exits when none is left. One at a time: on a CPU
two runs would only halve each other's speed. :func:`cancel` drops a queued run or sends SIGTERM
to a running one (the CLI finishes the current step, saves the state, status ``cancelled``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from analysis.finetune import rundir
from analysis.finetune.config import FinetuneConfig
from analysis.finetune.rundir import ACTIVE, alive, status
from analysis.io import write_json_atomic
from analysis.jobs import last_line

ROOT = Path(__file__).resolve().parents[2]


def runs_dir() -> Path:
    """``$SUBNETSCOPE_RUNS``, or ``$SUBNETSCOPE_HOME/runs``."""
    from analysis.demo import subnetscope_home

    env = os.environ.get("SUBNETSCOPE_RUNS")
    return Path(env).expanduser() if env else subnetscope_home() / "runs"


def register(run_dir: str | Path) -> None:
    """Adds a run directory outside :func:`runs_dir` to the index the page lists."""
    d = Path(run_dir).resolve()
    root = runs_dir()
    if d.parent == root.resolve():
        return
    index = root / "index.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = []
    if str(d) not in known:
        write_json_atomic(index, known + [str(d)])


def list_runs() -> list[Path]:
    """Every run directory known: those under :func:`runs_dir` and the registered ones that still
    exist, oldest first (by the time their config was written)."""
    root = runs_dir()
    found = [d for d in root.iterdir() if (d / "config.json").is_file()] if root.is_dir() else []
    try:
        found += [Path(p) for p in json.loads((root / "index.json").read_text()) if (Path(p) / "config.json").is_file()]
    except (OSError, ValueError):
        pass
    unique = {d.resolve(): d for d in found}
    return sorted(unique.values(), key=lambda d: ((d / "config.json").stat().st_mtime, d.name))


def enqueue(config: FinetuneConfig, name: str | None = None) -> Path:
    """A new queued run directory under :func:`runs_dir` (the worker trains it when its turn comes)."""
    from analysis.finetune.run import preflight

    preflight(config)  # a bad input fails now, not later in the worker
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name or config.mask_source)[:60].strip("-") or "run"
    d = runs_dir() / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"
    n = 1
    while d.exists():
        n += 1
        d = d.with_name(f"{d.name.rsplit('~', 1)[0]}~{n}")
    rundir.mark(d)
    write_json_atomic(d / "summary.json", {"status": "queued", "mask_source": config.mask_source,
                                           "task": config.task, "queued": time.time()})
    write_json_atomic(d / "config.json", config.to_dict())
    return d


def queued() -> list[Path]:
    return [d for d in list_runs() if status(d) == "queued"]


def running() -> list[Path]:
    return [d for d in list_runs() if status(d) == "running"]


def cancel(run_dir: str | Path) -> None:
    """A queued run is marked cancelled (never started); a running one gets SIGTERM."""
    d = Path(run_dir)
    s = status(d)
    if s == "queued":
        write_json_atomic(d / "summary.json", {**rundir.summary(d), "status": "cancelled", "steps_done": 0})
        pid = rundir.pid(d)  # the worker may have just started it: stop that process too
        if pid is not None and alive(pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
    elif s == "running":
        pid = rundir.pid(d)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass


def ensure_worker() -> int | None:
    """Starts the queue worker unless one is alive or nothing is queued. Returns its pid."""
    lock = runs_dir() / "worker.json"
    try:
        pid = json.loads(lock.read_text())["pid"]
        if alive(pid):
            return pid
    except (OSError, ValueError, KeyError):
        pass
    if not queued():
        return None
    runs_dir().mkdir(parents=True, exist_ok=True)
    with open(runs_dir() / "worker.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "analysis", "run-queue"], cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True)
    write_json_atomic(lock, {"pid": proc.pid, "started": time.time()})
    return proc.pid


def work(*, poll: float = 0.5) -> int:
    """The worker loop: trains queued runs one at a time; returns how many it started."""
    import fcntl

    runs_dir().mkdir(parents=True, exist_ok=True)
    guard = open(runs_dir() / "worker.lock", "w")  # one worker at a time, whoever started it
    try:
        fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        guard.close()
        return 0
    lock = runs_dir() / "worker.json"
    write_json_atomic(lock, {"pid": os.getpid(), "started": time.time()})
    started = 0
    stop = {"flag": False}

    def _stop(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _stop)
    while not stop["flag"]:
        todo = queued()
        if not todo:
            break
        d = todo[0]
        cmd = [sys.executable, "-m", "analysis", "finetune", "--config", str(d / "config.json"), "--out", str(d),
               "--quiet", "--progress-file", str(d / "progress.json")]
        with open(d / "log.txt", "ab") as log:
            child = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        write_json_atomic(d / "job.json", {"pid": child.pid, "started": time.time()})
        started += 1
        while child.poll() is None:
            if stop["flag"]:
                child.send_signal(signal.SIGTERM)
            time.sleep(poll)
        if status(d) in ACTIVE:  # the child never wrote a final status (killed, or failed before starting)
            log_tail = last_line(d / "log.txt")
            write_json_atomic(d / "summary.json", {**rundir.summary(d), "status": "failed",
                                                   "error": log_tail or f"exit code {child.returncode}"})
    lock.unlink(missing_ok=True)
    guard.close()
    return started


def shutdown(timeout: float = 10.0) -> None:
    """Stops the worker and the run it trains (SIGTERM, then SIGKILL after ``timeout``); the
    queued runs stay queued."""
    pids = [p for p in [rundir.pid(d) for d in running()] if p is not None]
    try:
        pids.append(int(json.loads((runs_dir() / "worker.json").read_text())["pid"]))
    except (OSError, ValueError, KeyError):
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + timeout
        while any(alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.1)
