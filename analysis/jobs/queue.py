"""Runs on disk, and a queue that trains them one at a time.

Every run is a directory (:class:`analysis.jobs.RunDir` owns its layout and state). The runs the app launches live under
``$SUBNETSCOPE_HOME/runs/``; a run started from the CLI anywhere else is registered in
``runs/index.json`` when it starts, so :func:`list_runs` finds every run of this user whether the
page or the CLI started it, after a page reload or an app restart.

The queue: :func:`enqueue` writes a run directory holding only ``config.json`` and a
``summary.json`` with status ``queued``; :func:`ensure_worker` starts (detached, at most one) the
worker ``python -m analysis run-queue``, which trains the oldest queued run as a CLI subprocess
(``job.json`` holds its pid), then the next, and exits when none is left. One at a time, and one
at a time with the app's analysis jobs too: the worker takes the same slot they take turns on
(:func:`analysis.jobs.slots.job_slot`) before it starts a run, since each uses every core.
:func:`cancel` drops a queued run or sends SIGTERM to a running one (the CLI finishes the current
step, saves the state, status ``cancelled``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

from analysis.finetune.config import FinetuneConfig
from analysis.io import write_json_atomic
from analysis.jobs import ACTIVE, RunDir, alive, last_line, read_json, spawn, terminate
from analysis.jobs.slots import SlotAbandoned, job_slot, slot_lock
from analysis.paths import runs_dir

__all__ = ["ACTIVE", "cancel", "enqueue", "ensure_worker", "index_problem", "list_runs", "queued", "register",
           "running", "runs_dir", "shutdown", "status", "work"]


def status(run_dir: str | Path) -> str:
    """The status of a run directory (see :meth:`analysis.jobs.RunDir.status`)."""
    return RunDir(run_dir).status()


def register(run_dir: str | Path) -> None:
    """Adds a run directory outside :func:`runs_dir` to the index the page lists."""
    d = Path(run_dir).resolve()
    root = runs_dir()
    if d.parent == root.resolve():
        return
    index = root / "index.json"
    known, problem = _index(index)
    if problem:  # keep the unreadable index for its owner to look at; start a new one
        aside = index.with_name(f"index.json.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(index, aside)
        print(f"warning: {problem}; moved to {aside}", file=sys.stderr)
    if str(d) not in known:
        write_json_atomic(index, known + [str(d)])


def list_runs() -> list[Path]:
    """Every run directory known: those under :func:`runs_dir` and the registered ones that still
    exist, oldest first (by the time their config was written)."""
    root = runs_dir()
    found = [d for d in root.iterdir() if RunDir(d).config_file.is_file()] if root.is_dir() else []
    found += [Path(p) for p in _index(root / "index.json")[0] if RunDir(p).config_file.is_file()]
    unique = {d.resolve(): d for d in found}
    return sorted(unique.values(), key=lambda d: ((d / "config.json").stat().st_mtime, d.name))


def short_label(ref: str | None, labels: dict[str, str] | None = None) -> str:
    """A checkpoint as a reader names it: its label when known (``demo/sft``), else the last two
    parts of its path (``demo/sft``), a hub id unchanged."""
    if not ref:
        return "?"
    for label, path in (labels or {}).items():
        if path == ref:
            return label
    parts = str(ref).rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) > 2 else str(ref)


def default_title(config: FinetuneConfig, labels: dict[str, str] | None = None, when: float | None = None) -> str:
    """A short readable run name: the mask source, the start checkpoint's label and the time,
    e.g. ``diff sft→rl-seed1 · demo/sft · 23:15``."""
    name = lambda r: short_label(r, labels).split("/")[-1]  # noqa: E731
    s = config.source
    if s == "diff":
        src = f"diff {name(config.diff[0])}→{name(config.diff[1])}"
    elif s == "random":
        src = f"random {config.random:.3g}"
    elif s == "selector":
        src = f"{config.selector} {config.density:.3g}" + (f" {config.granularity}" if config.granularity else "")
    elif s == "mask":
        src = "mask " + "+".join(name(m) for m in config.mask)
    elif s == "id3":
        src = f"id3 {config.id3:.3g}"
    else:
        src = config.mask_source  # full, lora r=K
    if config.schedule == "lisa":
        src += " + LISA"
    return f"{src} · {short_label(config.checkpoint, labels)} · {time.strftime('%H:%M', time.localtime(when))}"


def enqueue(config: FinetuneConfig, name: str | None = None, *, title: str | None = None) -> Path:
    """A new queued run directory under :func:`runs_dir` (the worker trains it when its turn comes).

    Args:
        config: the run.
        name: the directory name's stem (made safe; the time is prefixed and a clash numbered).
            Default: the title.
        title: the name the page shows (``summary.json``'s ``title``). Default: :func:`default_title`.
    """
    from analysis.finetune.run import preflight

    config = config.with_absolute_paths()  # the worker runs elsewhere; config.json names files from anywhere
    preflight(config)  # a bad input fails now, not later in the worker
    title = (title or "").strip() or default_title(config)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name or title)[:60].strip("-") or "run"
    d = runs_dir() / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"
    n = 1
    while d.exists():
        n += 1
        d = d.with_name(f"{d.name.rsplit('~', 1)[0]}~{n}")
    run = RunDir(d)
    run.mark()
    write_json_atomic(run.summary_file, {"status": "queued", "mask_source": config.mask_source, "title": title,
                                           "task": config.task, "queued": time.time()})
    write_json_atomic(run.config_file, config.to_dict())
    return d


def title_of(run_dir: str | Path) -> str:
    """The name a run is listed under: the title it was queued with, else its directory's name."""
    return RunDir(run_dir).summary().get("title") or Path(run_dir).name


def trash(run_dir: str | Path) -> Path:
    """Moves a finished run of the app's (under :func:`runs_dir`) to ``$SUBNETSCOPE_HOME/trash``, so a
    misclick loses nothing (move it back to restore it).

    Returns:
        Path: where it went.
    Raises:
        SubnetscopeError: the run is queued or running, or it is not one of the app's runs (a run
            written by the CLI elsewhere is the user's folder: the app does not move it).
    """
    from analysis.errors import SubnetscopeError
    from analysis.io import os_error
    from analysis.paths import subnetscope_home

    d = Path(run_dir)
    if status(d) in ACTIVE:
        raise SubnetscopeError(f"{d}: the run is {status(d)}; cancel it before deleting it")
    if d.resolve().parent != runs_dir().resolve():
        raise SubnetscopeError(f"{d}: not one of the app's runs (started from the CLI); delete its folder yourself")
    dest = subnetscope_home() / "trash" / f"{d.name}-deleted-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(d, dest)
    except OSError as e:
        raise os_error(dest, e) from None
    return dest


def queued() -> list[Path]:
    return [d for d in list_runs() if status(d) == "queued"]


def running() -> list[Path]:
    return [d for d in list_runs() if status(d) == "running"]


def cancel(run_dir: str | Path) -> None:
    """A queued run is marked cancelled (never started); a running one gets SIGTERM."""
    run = RunDir(run_dir)
    s = run.status()
    if s == "queued":
        write_json_atomic(run.summary_file, {**run.summary(), "status": "cancelled", "steps_done": 0})
        terminate(run.pid())  # the worker may have just started it: stop that process too
    elif s == "running":
        terminate(run.pid())


def ensure_worker() -> int | None:
    """Starts the queue worker unless one is alive or nothing is queued. Returns its pid."""
    lock = runs_dir() / "worker.json"
    worker = read_json(lock) or {}
    if alive(worker.get("pid"), worker.get("started")):
        return worker["pid"]
    if not queued():
        return None
    runs_dir().mkdir(parents=True, exist_ok=True)
    proc = spawn(["run-queue"], runs_dir() / "worker.log")
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
        run = RunDir(todo[0])
        try:  # one computation at a time with the app's analysis jobs (each uses every core)
            with job_slot(run.progress_file, f"fine-tune {run.path.name}", lock=slot_lock(),
                          give_up=lambda run=run: stop["flag"] or run.status() != "queued"):
                child = spawn(["finetune", "--config", str(run.config_file), "--out", str(run.path), "--quiet",
                               "--progress-file", str(run.progress_file)], run.log_file, detach=False)
                write_json_atomic(run.job_file, {"pid": child.pid, "started": time.time()})
                started += 1
                while child.poll() is None:
                    if stop["flag"]:
                        child.send_signal(signal.SIGTERM)
                    time.sleep(poll)
        except SlotAbandoned:  # cancelled (or the worker stopped) while waiting for the slot: never started
            run.progress_file.unlink(missing_ok=True)  # its "waiting for ..." is no longer true
            continue
        if run.status() in ACTIVE:  # the child never wrote a final status (killed, or failed before starting)
            write_json_atomic(run.summary_file, {**run.summary(), "status": "failed",
                                                 "error": last_line(run.log_file) or f"exit code {child.returncode}"})
    lock.unlink(missing_ok=True)
    guard.close()
    return started


def shutdown(timeout: float = 10.0) -> None:
    """Stops the worker and the run it trains (SIGTERM, then SIGKILL after ``timeout``); the
    queued runs stay queued."""
    pids = [p for p in [RunDir(d).pid() for d in running()] if p is not None]
    worker = (read_json(runs_dir() / "worker.json") or {}).get("pid")
    if worker is not None:
        pids.append(worker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            terminate(pid, sig)
        deadline = time.time() + timeout
        while any(alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.1)


def index_problem() -> str | None:
    """What is wrong with ``runs/index.json`` (the runs started from the CLI elsewhere), or None.
    The page shows it: runs registered there are not listed while it is unreadable."""
    return _index(runs_dir() / "index.json")[1]


def _index(index: Path) -> tuple[list[str], str | None]:
    """The registered run directories, and a one-line problem when the index cannot be read."""
    try:
        known = json.loads(index.read_text())
    except FileNotFoundError:
        return [], None
    except (OSError, ValueError) as e:
        return [], f"{index}: unreadable run index ({type(e).__name__}: {e}); the runs registered there are not listed"
    if not isinstance(known, list) or not all(isinstance(p, str) for p in known):
        return [], f"{index}: not a list of run directories; the runs registered there are not listed"
    return known, None
