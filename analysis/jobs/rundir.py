"""A fine-tune's run directory: what it holds, whose it is, who writes it, and how it stands.

The one owner of a run directory's layout and state, used by the trainer
(:mod:`analysis.finetune.run`), the queue (:mod:`analysis.jobs.queue`), the comparison
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
- the **state** a run resumes from (``state/``, or what a crash while saving left);
- the **reader** of its files: every file is read here, checked against what a run writes, and a
  damaged one is named with its problem in one line (:class:`RunError`); a damaged line of
  ``metrics.jsonl`` is skipped and counted, the good ones kept (:meth:`RunDir.read_metrics`).

The files: ``config.json`` (the run's configuration), ``summary.json`` (status and final
metrics), ``metrics.jsonl`` (one line a step), ``eval.json``, ``mask.safetensors`` (the trained
subnetwork), ``model/`` (the final weights), ``state/`` (to resume), and for a run the queue
trains, ``job.json`` (the child's pid), ``progress.json`` and ``log.txt``.
"""

from __future__ import annotations

import errno
import fcntl
import json
from pathlib import Path

from analysis.errors import SubnetscopeError, one_line, quoted
from analysis.jobs.process import alive
from analysis.jobs.progress import read_json

MARKER = ".subnetscope-run"
FORMAT = "subnetscope.run/1"
ACTIVE = ("queued", "running")
# what a run writes into its directory (all of it may be replaced by a new run in a marked directory)
OWN_FILES = ("config.json", "summary.json", "metrics.jsonl", "eval.json", "mask.safetensors", "progress.json",
             "job.json", "log.txt")
OWN_DIRS = ("model", "model.tmp", "state", "state.tmp", "state.old")
STATUSES = ("queued", "running", "finished", "cancelled", "failed")
MAX_JSON_BYTES = 16 * 2**20  # config.json, summary.json, meta.json: a run writes a few KiB
MAX_METRICS_LINE = 2**20  # one metrics row (a LISA row lists its blocks: a few KiB at most)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numbers(v) -> bool:
    """A metrics object (``final``, ``initial``): names to numbers (None, or a list of them, allowed)."""
    return isinstance(v, dict) and all(
        x is None or _number(x) or (isinstance(x, list) and all(_number(y) for y in x)) for x in v.values())


# what a run writes into summary.json: field -> (check, in words); other fields are not read
SUMMARY_FIELDS = {
    "status": (lambda v: v in STATUSES, f"one of {', '.join(STATUSES)}"),
    **{k: (lambda v: isinstance(v, str), "a string") for k in ("title", "mask_source", "task", "error", "started",
                                                                "metric")},
    **{k: (lambda v: _int(v) and v >= 0, "a whole number ≥ 0") for k in (
        "pid", "processes", "steps_done", "trainable", "peak_rss_bytes", "peak_cuda_bytes", "optimizer_state_bytes",
        "metrics_missing")},
    "outside_mask_changed": (lambda v: v is None or (_int(v) and v >= 0), "a whole number ≥ 0 or null"),
    **{k: (lambda v: _number(v), "a number") for k in ("wall_s", "queued")},
    **{k: (_numbers, "an object of numbers") for k in ("final", "initial", "final_eval")},
    "ranks_identical": (lambda v: isinstance(v, bool), "true or false"),
    "rank_digests": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
}
# what a metrics row holds: field -> check (other fields are kept as they are)
METRIC_FIELDS = {"step": lambda v: _int(v) and v >= 1,
                 **{k: _number for k in ("loss", "lr", "grad_norm", "tokens_per_s", "step_s", "trainable", "unmasked",
                                         "accuracy", "reward", "eval_loss", "perplexity")},
                 "lisa_layers": lambda v: isinstance(v, list) and all(_int(x) for x in v)}


class RunError(SubnetscopeError):
    """A run directory that cannot be read or written, in one line."""


def _json_kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true or false", type(None): "null"}.get(
        type(v), "a number")


def read_json_file(path: Path, what: str):
    """The JSON value of a run file, read whole (at most :data:`MAX_JSON_BYTES`).

    Raises:
        FileNotFoundError: the file is missing (the caller says what that means).
        RunError: unreadable, larger than a run writes, not UTF-8, or not JSON (one line naming it).
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise RunError(f"{path}: cannot read {what} ({e.strerror or one_line(e)})") from None
    if len(data) > MAX_JSON_BYTES:
        raise RunError(f"{path}: larger than {MAX_JSON_BYTES // 2**20} MiB; not the {what} a run writes")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise RunError(f"{path}: unreadable {what} (not UTF-8 text)") from None
    except ValueError as e:
        raise RunError(f"{path}: unreadable {what} (not JSON: {getattr(e, 'msg', e)}"
                       + (f" at line {e.lineno}" if hasattr(e, "lineno") else "") + ")") from None


def check_summary(summary, path: Path) -> dict:
    """``summary`` if it is what a run writes into ``summary.json``, else a RunError naming the field."""
    if not isinstance(summary, dict):
        raise RunError(f"{path}: damaged run summary ({_json_kind(summary)}, not a JSON object)")
    for key, (ok, kind) in SUMMARY_FIELDS.items():
        if key in summary and not ok(summary[key]):
            raise RunError(f"{path}: damaged run summary ({key} must be {kind}, got {quoted(summary[key], 40)})")
    return summary


CUT = "cut short (no end of line)"  # the last line, when a crash cut it


def metrics_row(raw: bytes) -> tuple[dict | None, str | None]:
    """One line of ``metrics.jsonl``: (the row, None), (None, None) for a blank line, or (None, the problem)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    if not text.strip():
        return None, None
    try:
        row = json.loads(text)
    except ValueError:
        return None, "not JSON" if text.endswith("\n") else CUT
    if not isinstance(row, dict):
        return None, f"{_json_kind(row)}, not a JSON object"
    for key, ok in METRIC_FIELDS.items():
        if (key in row or key == "step") and not ok(row.get(key)):
            return None, f"{key} is {quoted(row.get(key), 30)}"
    return row, None


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

    def require_run(self) -> None:
        """Raises a RunError unless the path is a run directory (a directory with the marker)."""
        if not self.path.is_dir():
            why = "not a directory" if self.path.exists() else "no such directory"
            raise RunError(f"{self.path}: not a run directory ({why})")
        if not self.is_run:
            raise RunError(f"{self.path}: not a run directory (no {MARKER} marker; a fine-tune's --out has one)")

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

    def read_summary(self) -> dict | None:
        """``summary.json`` as checked by :func:`check_summary`; None when it is missing.

        Raises:
            RunError: a damaged summary (one line naming the file and the problem).
        """
        try:
            return check_summary(read_json_file(self.summary_file, "run summary"), self.summary_file)
        except FileNotFoundError:
            return None

    def summary(self) -> dict:
        """``summary.json``, or {} when it is missing or damaged (see :meth:`read_summary`)."""
        try:
            return self.read_summary() or {}
        except RunError:
            return {}

    def config(self) -> dict | None:
        """``config.json`` as saved, or None when it is missing or unreadable (not checked: see
        :meth:`read_config`)."""
        return read_json(self.config_file)

    def read_config(self, check) -> dict:
        """``config.json``, checked to be a run configuration that can run.

        Args:
            check (callable): the configuration's own check, given the dict (the fine-tune passes
                :meth:`FinetuneConfig.from_dict <analysis.finetune.config.FinetuneConfig.from_dict>`:
                the run directory owns the file, the trainer owns what it means).

        Raises:
            RunError: not a run directory, or a damaged configuration (one line naming the file).
        """
        try:
            config = read_json_file(self.config_file, "run configuration")
        except FileNotFoundError:
            raise RunError(f"{self.path}: not a run directory (missing config.json)") from None
        if not isinstance(config, dict):
            raise RunError(f"{self.config_file}: damaged run configuration ({_json_kind(config)}, not a JSON object)")
        try:
            check(dict(config))
        except SubnetscopeError as e:
            raise RunError(f"{self.config_file}: damaged run configuration ({e})") from None
        return config

    def _metric_lines(self):
        """``(line number, line, row, problem)`` for each non-blank line of ``metrics.jsonl``, read in
        bounded pieces (a line longer than :data:`MAX_METRICS_LINE` is a damaged one, never read
        whole); ``row`` is None where ``problem`` says why. A row must come after the one before it."""
        try:
            f = open(self.metrics_file, "rb")
        except FileNotFoundError:
            return
        except OSError as e:
            raise RunError(f"{self.metrics_file}: cannot read the metrics ({e.strerror or one_line(e)})") from None
        last = 0
        with f:
            lineno = 0
            while True:
                raw = f.readline(MAX_METRICS_LINE + 1)
                if not raw:
                    return
                lineno += 1
                if len(raw) > MAX_METRICS_LINE and not raw.endswith(b"\n"):
                    while raw and not raw.endswith(b"\n"):  # skip the rest of it
                        raw = f.readline(MAX_METRICS_LINE + 1)
                    yield lineno, None, None, f"longer than {MAX_METRICS_LINE:,} bytes"
                    continue
                row, problem = metrics_row(raw)
                if row is None and problem is None:
                    continue
                if row is not None and row["step"] <= last:
                    row, problem = None, f"step {row['step']} after step {last}"
                if row is not None:
                    last = row["step"]
                yield lineno, None if row is None else raw.decode("utf-8").rstrip("\n"), row, problem

    def read_metrics(self, training: bool = False) -> tuple[list[dict], str | None]:
        """The rows of ``metrics.jsonl`` and, when some lines were damaged (garbage, random bytes, a
        line cut by a crash, a row out of order), one line saying how many were skipped and why the
        first was. An empty or missing file has no rows and no problem.

        Args:
            training (bool): the run is training: its last line may be being written (not damage).
        Raises:
            RunError: the file exists but cannot be read.
        """
        rows, bad, first = [], 0, None
        for lineno, _, row, problem in self._metric_lines():
            if training and problem == CUT:
                continue
            if row is None:
                bad += 1
                first = first or f"line {lineno}: {problem}"
            else:
                rows.append(row)
        if not bad:
            return rows, None
        return rows, (f"{self.metrics_file}: {bad} damaged line{'s' if bad > 1 else ''} skipped, {len(rows)} "
                      f"row{'s' if len(rows) != 1 else ''} kept (first: {first})")

    def metrics(self) -> list[dict]:
        """The good rows of ``metrics.jsonl`` (see :meth:`read_metrics`)."""
        return self.read_metrics()[0]

    def read_eval(self) -> dict | None:
        """``eval.json`` of a finished demo-task run (per-problem results); None when there is none.

        Raises:
            RunError: a damaged file (one line naming it and the problem).
        """
        try:
            ev = read_json_file(self.eval_file, "evaluation")
        except FileNotFoundError:
            return None
        if not isinstance(ev, dict):
            raise RunError(f"{self.eval_file}: damaged evaluation ({_json_kind(ev)}, not a JSON object)")
        for key, v in ev.items():
            ok = (isinstance(v, list) and all(_number(x) for x in v)) if key.startswith("per_problem") else (
                v is None or _number(v))
            if not ok:
                raise RunError(f"{self.eval_file}: damaged evaluation ({key} is {quoted(v, 30)})")
        return ev

    def read(self, check) -> dict:
        """``{"run", "config", "summary", "metrics", "warnings"}`` of the run, every file checked
        (the configuration by ``check``, as :meth:`read_config`): ``warnings`` holds the one-line
        problems that left the run readable (damaged metric lines).

        Raises:
            RunError: not a run directory, or a damaged configuration or summary (one line naming
                the file and the problem).
        """
        self.require_run()
        config = self.read_config(check)
        summary = self.read_summary()
        if summary is None:
            raise RunError(f"{self.path}: not a run directory (missing summary.json)")
        rows, problem = self.read_metrics(training=self.status() in ACTIVE)
        return {"run": str(self.path), "config": config, "summary": summary, "metrics": rows,
                "warnings": [problem] if problem else []}

    def status(self) -> str:
        """queued, running, finished, cancelled, failed (also: a damaged summary), or died (running,
        but its process is gone)."""
        try:
            s = self.read_summary()
        except RunError:
            return "failed"
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

    def read_meta(self) -> dict:
        """The saved state's ``meta.json``: ``step`` (the step it was taken at) and ``metrics_row``
        (that step's line of ``metrics.jsonl``, to restore it should a crash have cut it).

        Raises:
            RunError: no state, or a ``meta.json`` that is not the one a run writes (one line).
        """
        s = self.state_dir()
        if s is None:
            raise RunError(f"{self.path}: no saved state to resume from")
        f = s / "meta.json"
        try:
            meta = read_json_file(f, "saved state")
        except FileNotFoundError:
            raise RunError(f"{self.path}: no saved state to resume from") from None
        if not isinstance(meta, dict):
            raise RunError(f"{f}: unreadable saved state ({_json_kind(meta)}, not a JSON object)")
        if not (_int(meta.get("step")) and meta["step"] >= 0):
            raise RunError(f"{f}: unreadable saved state (step must be a whole number ≥ 0, "
                           f"got {quoted(meta.get('step'), 30)})")
        if not isinstance(meta.get("metrics_row", ""), str):
            raise RunError(f"{f}: unreadable saved state (metrics_row must be a string)")
        return meta

    def saved_step(self) -> int:
        """The step the saved state was taken at.

        Raises:
            RunError: no state, or a ``meta.json`` that cannot be read (one line).
        """
        return self.read_meta()["step"]

    # ---- what a run writes (rank 0 of the process that holds the lock)
    def clear_outputs(self) -> None:
        """A new run in a used run directory: nothing of the old run may mix in."""
        import shutil

        for f in (self.eval_file, self.mask_file):
            f.unlink(missing_ok=True)
        for name in OWN_DIRS:
            shutil.rmtree(self.path / name, ignore_errors=True)

    def truncate_metrics(self, step: int, last_row: str | None = None) -> int:
        """Keeps the good metric rows up to ``step`` (a resumed run rewrites the rest) and drops the
        damaged lines. ``last_row``, the row of ``step`` saved with the state, is put back when a
        crash cut it from the file.

        Returns:
            int: the rows of steps 1 … ``step`` that are still missing (lost and not recomputable).
        """
        from analysis.io import write_atomic

        keep = {row["step"]: line for _, line, row, _ in self._metric_lines()
                if row is not None and row["step"] <= step}
        if step not in keep and last_row:
            row, problem = metrics_row(last_row.encode() + b"\n")
            if row is not None and row["step"] == step:
                keep[step] = last_row
        if keep or self.metrics_file.exists():
            write_atomic(self.metrics_file, "".join(keep[k] + "\n" for k in sorted(keep)))
        return step - len(keep)

    def write_summary(self, summary: dict) -> None:
        """Writes ``summary.json`` atomically; on a full disk, where no new file fits, the summary
        is written over the old one in place (it fits the space that one holds, so a run that
        failed on a full disk says so rather than staying "running").

        Raises:
            SubnetscopeError: it could not be written either way (one line).
        """
        import os

        from analysis.io import write_json_atomic

        try:
            write_json_atomic(self.summary_file, summary)
        except SubnetscopeError as e:
            if "No space left on device" not in str(e) or not self.summary_file.is_file():
                raise
            data = json.dumps(summary, separators=(",", ":"), allow_nan=False).encode() + b"\n"
            try:
                with open(self.summary_file, "r+b") as f:
                    f.write(data)
                    f.truncate(len(data))
                    f.flush()
                    os.fsync(f.fileno())
            except OSError:
                raise e from None

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

        from analysis.io import write_errors, write_json_atomic

        tmp, cur, old = (self.path / n for n in ("state.tmp", "state", "state.old"))
        f = None
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            # through a file of ours: torch's own writer says "unexpected pos" for a full disk, and
            # the partial file it holds open would keep the disk full while the summary is written
            f = _Recording(open(tmp / "state.pt", "wb"))
            torch.save(blob, f)
            f.close()
            write_json_atomic(tmp / "meta.json", meta)
        except (*write_errors(), SubnetscopeError) as e:
            cause = (f.error if f is not None else None) or e
            if f is not None:
                f.close(quiet=True)  # the partial file's space is free once it is closed and removed
            error = disk_error(cur / "state.pt", cause)
            shutil.rmtree(tmp, ignore_errors=True)
            raise error from None
        except BaseException:  # a second Ctrl-C: the previous state stays whole
            if f is not None:
                f.close(quiet=True)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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

        from analysis.io import write_errors

        tmp = self.path / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            shutil.rmtree(self.model_dir, ignore_errors=True)
            os.replace(tmp, self.model_dir)
        except write_errors() as e:
            error = disk_error(self.model_dir, e)
            shutil.rmtree(tmp, ignore_errors=True)
            raise error from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def disk_error(path, e: BaseException) -> SubnetscopeError:
    """The one line for a failed write of ``path`` (see :func:`analysis.io.os_error`); a full disk
    (ENOSPC, however the writer reports it) is said in words, with the bytes free there."""
    import shutil

    from analysis.io import os_error

    text = str(e)
    if not ((isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in text
            or "os error 28" in text):
        return e if isinstance(e, SubnetscopeError) else os_error(path, e)
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = f"{shutil.disk_usage(where).free:,} bytes free on it"
    except OSError:
        free = "free space unknown"
    return RunError(f"{path}: cannot write: No space left on device (the disk is full: {free})")


class _Recording:
    """A binary file that remembers the OS error of a failed write (torch's writer replaces it with
    its own message), and is flushed to disk when closed."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()

    def close(self, quiet: bool = False) -> None:
        """Flushes, syncs and closes; ``quiet``: after a failure, only close (errors are remembered)."""
        import os

        try:
            if not self.f.closed:
                self.f.flush()
                os.fsync(self.f.fileno())
        except OSError as e:
            self.error = self.error or e
            if not quiet:
                raise
        finally:
            try:
                self.f.close()  # the descriptor is closed even when this flush fails
            except OSError as e:
                self.error = self.error or e
                if not quiet:
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
