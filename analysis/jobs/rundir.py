"""A fine-tune's run directory: what it holds, whose it is, who writes it, and how it stands.

The one owner of a run directory's layout and state, used by the trainer
(:mod:`analysis.finetune.run`), the queue (:mod:`analysis.finetune.queue`), the comparison
(:mod:`analysis.finetune.compare`), the CLI and the Fine-tuning page:

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

The files: ``config.json`` (the run's configuration), ``summary.json`` (status and final
metrics), ``metrics.jsonl`` (one line a step), ``eval.json``, ``mask.safetensors`` (the trained
subnetwork), ``model/`` (the final weights), ``state/`` (to resume), and for a run the queue
trains, ``job.json`` (the child's pid), ``progress.json`` and ``log.txt``.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

from analysis.errors import SubnetscopeError
from analysis.jobs.process import alive
from analysis.jobs.progress import read_json

MARKER = ".subnetscope-run"
FORMAT = "subnetscope.run/1"
ACTIVE = ("queued", "running")
# what a run writes into its directory (all of it may be replaced by a new run in a marked directory)
OWN_FILES = ("config.json", "summary.json", "metrics.jsonl", "eval.json", "mask.safetensors", "progress.json",
             "job.json", "log.txt")
OWN_DIRS = ("model", "model.tmp", "state", "state.tmp", "state.old")


class RunError(SubnetscopeError):
    """A run directory that cannot be read or written, in one line."""


class RunDir:
    """One run directory (see the module's docstring for its layout).

    Args:
        path (str | Path): the directory (it need not exist yet).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    marker = property(lambda self: self.path / MARKER)
    config_file = property(lambda self: self.path / "config.json")
    summary_file = property(lambda self: self.path / "summary.json")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    eval_file = property(lambda self: self.path / "eval.json")
    mask_file = property(lambda self: self.path / "mask.safetensors")
    model_dir = property(lambda self: self.path / "model")
    job_file = property(lambda self: self.path / "job.json")
    progress_file = property(lambda self: self.path / "progress.json")
    log_file = property(lambda self: self.path / "log.txt")

    @property
    def is_run(self) -> bool:
        """True when the directory carries the marker of a Subnetscope run directory."""
        return self.marker.is_file()

    def mark(self) -> None:
        """Makes the directory (created if missing) a run directory: writes the marker once."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.marker.is_file():
            from analysis.io import write_json_atomic

            write_json_atomic(self.marker, {"format": FORMAT})

    def lock(self) -> RunLock:
        """Takes the run's writer lock (see :class:`RunLock`)."""
        return RunLock(self)

    @property
    def locked(self) -> bool:
        """True while some process holds the run directory's lock."""
        try:
            f = open(self.marker, "rb")
        except OSError:
            return False
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            f.close()
        return False

    def summary(self) -> dict:
        """``summary.json``, or {} when it is missing or unreadable."""
        return read_json(self.summary_file) or {}

    def config(self) -> dict | None:
        """``config.json`` as saved, or None when it is missing or unreadable."""
        return read_json(self.config_file)

    def metrics(self) -> list[dict]:
        """The rows of ``metrics.jsonl`` (a line cut by a crash ends the record)."""
        import json

        rows = []
        if self.metrics_file.is_file():
            for line in self.metrics_file.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    break
        return rows

    def read(self) -> dict:
        """``{"run", "config", "summary", "metrics"}`` of the run.

        Raises:
            RunError: not a run directory (no config or summary), or one of them unreadable.
        """
        import json

        try:
            config = json.loads(self.config_file.read_text())
            summary = json.loads(self.summary_file.read_text())
        except FileNotFoundError as e:
            raise RunError(f"{self.path}: not a run directory (missing {Path(e.filename).name})") from None
        except ValueError as e:
            raise RunError(f"{self.path}: unreadable run file ({e})") from None
        return {"run": str(self.path), "config": config, "summary": summary, "metrics": self.metrics()}

    def status(self) -> str:
        """queued, running, finished, cancelled, failed, or died (running, but its process is gone)."""
        s = read_json(self.summary_file)
        if s is None:
            return "queued" if self.config_file.is_file() else "failed"
        st = s.get("status", "failed")
        if st == "running":
            p = self.pid()
            if p is not None and not alive(p):
                return "died"
        return st

    def pid(self) -> int | None:
        """The pid training the run: the process that wrote the summary (a run started from the
        CLI, or resumed), else the queue worker's child (``job.json``)."""
        for f in (self.summary_file, self.job_file):
            p = (read_json(f) or {}).get("pid")
            if isinstance(p, int) and not isinstance(p, bool):
                return p
        return None

    def state_dir(self) -> Path | None:
        """The saved state: ``state/``, or what a crash while saving left (``state.tmp/``
        complete, or the previous ``state.old/``); None when there is none."""
        for name in ("state", "state.tmp", "state.old"):
            s = self.path / name
            if (s / "meta.json").is_file() and (s / "state.pt").is_file():
                return s
        return None

    def saved_step(self) -> int:
        """The step the saved state was taken at.

        Raises:
            RunError: no state, or a ``meta.json`` that cannot be read (one line).
        """
        s = self.state_dir()
        if s is None:
            raise RunError(f"{self.path}: no saved state to resume from")
        meta = read_json(s / "meta.json")
        step = (meta or {}).get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise RunError(f"{s / 'meta.json'}: unreadable saved state (not the JSON a run writes)")
        return step

    # ---- what a run writes (rank 0 of the process that holds the lock)
    def clear_outputs(self) -> None:
        """A new run in a used run directory: nothing of the old run may mix in."""
        import shutil

        for f in (self.eval_file, self.mask_file):
            f.unlink(missing_ok=True)
        for name in OWN_DIRS:
            shutil.rmtree(self.path / name, ignore_errors=True)

    def truncate_metrics(self, step: int) -> None:
        """Keeps the metric rows up to ``step`` (a resumed run rewrites the rest)."""
        import json

        if not self.metrics_file.is_file():
            return
        from analysis.io import write_atomic

        keep = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                break  # a line cut by a crash ends the record
            if row.get("step", 0) <= step:
                keep.append(line)
        write_atomic(self.metrics_file, "".join(k + "\n" for k in keep))

    def save_state(self, blob: dict, meta: dict) -> None:
        """``state/state.pt`` (``blob``: tensors, lists and strings only, so that
        ``torch.load(weights_only=True)`` reads it back) and ``state/meta.json``, written into
        ``state.tmp/`` and swapped in: a crash while saving leaves the previous state whole.

        Raises:
            SubnetscopeError: a full disk or another write error (one line); the previous state stays.
        """
        import os
        import shutil

        import torch

        from analysis.io import os_error, write_errors, write_json_atomic

        tmp, cur, old = (self.path / n for n in ("state.tmp", "state", "state.old"))
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            torch.save(blob, tmp / "state.pt")
            write_json_atomic(tmp / "meta.json", meta)
        except (*write_errors(), SubnetscopeError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise (e if isinstance(e, SubnetscopeError) else os_error(tmp / "state.pt", e)) from None
        shutil.rmtree(old, ignore_errors=True)
        if cur.exists():
            os.replace(cur, old)
        os.replace(tmp, cur)
        shutil.rmtree(old, ignore_errors=True)

    def load_state(self) -> dict:
        """The saved ``state.pt`` (see :meth:`save_state`), read with ``weights_only=True``.

        Raises:
            RunError: no state, or one that is truncated or not a run's (one line).
        """
        import torch

        from analysis.errors import one_line

        d = self.state_dir()
        if d is None:
            raise RunError(f"{self.path}: no saved state to resume from")
        try:
            blob = torch.load(d / "state.pt", weights_only=True, map_location="cpu")
            if not (isinstance(blob, dict) and isinstance(blob["ranks"], list) and isinstance(blob["step"], int)):
                raise ValueError("not the state a run writes")
        except Exception as e:  # truncated or foreign: one line, nothing trained
            raise RunError(f"{d / 'state.pt'}: unreadable saved state ({one_line(e) or type(e).__name__}); "
                           "it cannot be resumed") from None
        return blob

    def drop_state(self) -> None:
        """A finished run needs no state to resume from."""
        import shutil

        shutil.rmtree(self.path / "state", ignore_errors=True)

    def save_model(self, model, tokenizer=None) -> None:
        """``model/`` written as ``model.tmp/`` and renamed; on any failure (a full disk) the partial
        copy is removed and the state saved before it stays, so ``--resume`` finishes it."""
        import os
        import shutil

        from analysis.io import os_error, write_errors

        tmp = self.path / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            shutil.rmtree(self.model_dir, ignore_errors=True)
            os.replace(tmp, self.model_dir)
        except write_errors() as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise os_error(self.model_dir, e) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


class RunLock:
    """An exclusive ``flock`` on a run directory's marker, held while a process writes the run.

    The kernel drops it when the process ends, however it ends, so a crashed run never leaves a
    stale lock. Use as a context manager or call :meth:`release`.

    Raises:
        RunError: another process holds the lock (one line naming the directory).
    """

    def __init__(self, run: RunDir | str | Path):
        self.run = run if isinstance(run, RunDir) else RunDir(run)
        self.run.mark()
        self._f = open(self.run.marker, "rb")
        try:
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._f.close()
            self._f = None
            p = self.run.pid()
            raise RunError(f"{self.run.path}: another process{f' (pid {p})' if p else ''} is writing this run "
                           "directory; wait for it or cancel it first") from None

    def release(self) -> None:
        if self._f is not None:
            self._f.close()  # closing the file drops the flock
            self._f = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
