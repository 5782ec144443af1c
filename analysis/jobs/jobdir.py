"""A job directory: a long analysis run as a subprocess of the same CLI, which the app polls.

Layout (owned here, nowhere else):

- ``params.json``: the analysis (a spec's name, :mod:`analysis.specs`) and its params as JSON —
  never an argv; ``python -m analysis run-job DIR`` reads it and runs the spec as its command does;
- ``job.json``: the checkpoints' references, the pid and start time;
- ``progress.json``: written by the child through :class:`~analysis.jobs.progress.Progress`
  (done / total / current tensor / status);
- ``result.json``: the command's ``--json`` output, written atomically last;
- ``log.txt``: the child's stderr.

Nothing of the work runs inside a page rerun, and a job survives a page reload or an app
restart. The job id is the spec's cache key (:func:`analysis.specs.base.cache_key`: its name, params
and the checkpoints' file fingerprints), so the same request finds its finished result instead of
recomputing. How a job's process starts is injectable (``launcher``): tests run jobs in-process.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from analysis.io import os_error, write_json_atomic
from analysis.jobs.process import alive, last_line, spawn, terminate
from analysis.jobs.progress import read_json
from analysis.paths import jobs_dir


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
    def of(cls, spec, params, root: Path | None = None) -> JobDir:
        """The job directory of a request: ``root`` (default: the app's jobs folder) / its cache key."""
        from analysis.specs.base import cache_key

        return cls((root or jobs_dir()) / cache_key(spec, params))

    job_file = property(lambda self: self.path / "job.json")
    params_file = property(lambda self: self.path / "params.json")
    progress_file = property(lambda self: self.path / "progress.json")
    result_file = property(lambda self: self.path / "result.json")
    log_file = property(lambda self: self.path / "log.txt")

    def start(self, spec, params, *, launcher=None) -> JobState:
        """Starts ``python -m analysis run-job DIR`` for ``spec`` and ``params`` in the background
        unless this job is running or finished. ``{job}`` in a string param is replaced by the job
        directory (e.g. ``mask_out="{job}/mask.safetensors"``), after the id was taken, so the same
        request finds the same directory.

        Args:
            launcher (callable, optional): ``launcher(job_dir, log) -> pid | None`` starts the work;
                None (a job run in-process to its end) records no process. Default: a detached
                ``python -m analysis run-job`` process (:func:`~analysis.jobs.process.spawn`).

        Raises:
            OutputError: the directory cannot be written (a full disk, a read-only home).
        """
        import dataclasses

        from analysis.specs.base import FORMAT, params_to_json

        st = self.state()
        if st.status in ("running", "done"):
            return st
        values = {k: (v.replace("{job}", str(self.path)) if isinstance(v, str) else v)
                  for k, v in params_to_json(params).items()}
        refs = spec.refs(dataclasses.replace(params, **{k: v for k, v in values.items()
                                                        if isinstance(v, str)}))
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            for f in (self.progress_file, self.result_file):
                f.unlink(missing_ok=True)
            self.log_file.write_bytes(b"")
            write_json_atomic(self.params_file, {"format": FORMAT, "spec": spec.name, "params": values})
            write_json_atomic(self.progress_file, {"status": "running", "done": 0, "total": 0, "current": ""})
            write_json_atomic(self.job_file, {"spec": spec.name, "refs": refs, "pid": None, "started": time.time()})
            pid = (launcher or _spawn_job)(self.path, self.log_file)
        except OSError as e:  # one line for the page
            raise os_error(self.path, e) from None
        if pid is not None:
            write_json_atomic(self.job_file, {"spec": spec.name, "refs": refs, "pid": pid, "started": time.time()})
        return self.state()

    def run_here(self) -> int:
        """Runs the job of ``params.json`` in this process, as its command runs (what ``run-job`` and an
        in-process launcher do): progress into ``progress.json``, the result into ``result.json``.

        Raises:
            ParamsError: a params file this version cannot read (one line naming it).
        """
        from analysis.specs import MODULES, get_spec
        from analysis.specs.base import FORMAT, ParamsError, execute, params_from_json

        job = read_json(self.params_file)
        if job is None or job.get("format") != FORMAT or job.get("spec") not in MODULES:
            raise ParamsError(f"{self.params_file}: not a job's params file ({FORMAT})")
        spec = get_spec(job["spec"])
        params = params_from_json(spec, job.get("params"))
        return execute(spec, params, json_out=str(self.result_file), progress_file=str(self.progress_file))

    def what(self) -> str:
        """The job in a few words, for the message of the jobs waiting behind it."""
        job = read_json(self.job_file) or {}
        return " ".join([job.get("spec", "job"), *("/".join(Path(r).parts[-2:]) for r in job.get("refs", []))])

    def state(self) -> JobState:
        """How the job stands; a job whose process is gone without a final status is "died"."""
        jid = self.path.name
        if self.result_file.is_file():
            return JobState(jid, self.path, "done")
        p, job = read_json(self.progress_file), read_json(self.job_file)
        if p is None or job is None:
            return JobState(jid, self.path, "missing")
        status = p.get("status", "running")
        if status == "running" and job.get("pid") is not None and not alive(job.get("pid"), job.get("started")):
            status = "died"
            p["error"] = last_line(self.log_file) or "the job's process ended without a result"
        return JobState(jid, self.path, status, p.get("done", 0), p.get("total", 0), p.get("current", ""),
                        p.get("error", ""))

    def cancel(self) -> None:
        """Asks a running job to stop (SIGTERM: the CLI exits cleanly, status "cancelled")."""
        job = read_json(self.job_file) or {}
        if alive(job.get("pid"), job.get("started")):
            terminate(job["pid"])


def _spawn_job(job_dir: Path, log: Path) -> int:
    return spawn(["run-job", str(job_dir)], log).pid


def run_in_process(job_dir: Path, log: Path) -> None:
    """A launcher that runs the job here, to its end (tests, and a caller that wants the result now):
    a one-line error is the job's, recorded in its progress file as the ``run-job`` process records
    it, and in its log."""
    from analysis.errors import SubnetscopeError, one_line

    job = JobDir(job_dir)
    try:
        job.run_here()
    except (SubnetscopeError, OSError) as e:
        msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else one_line(e)
        with open(log, "a") as f:
            f.write(f"error: {msg}\n")
        write_json_atomic(job.progress_file, {"status": "failed", "error": msg})
