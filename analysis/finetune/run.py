"""One masked fine-tuning run, written to a run directory.

``RUN_DIR/config.json``, ``metrics.jsonl`` (one line per step, flushed: step, loss, lr,
grad_norm, tokens_per_s, trainable; the task's metrics when evaluated), ``model/`` (the final
weights as a safetensors HF directory, in the checkpoint's dtype), ``summary.json`` (status
finished / cancelled / failed with the error, final metrics, wall time, peak memory, the
inside-mask check), ``eval.json`` (per-problem results of the final evaluation, demo tasks) and
``state/`` (what :func:`resume_finetune` continues from: optimizer state, trained weights, random
streams). JSON and state files are written atomically; a cancel (``should_stop``; SIGTERM or
Ctrl-C in the CLI) stops after the current step with every metric kept and the state saved.

Run under ``torchrun`` / ``accelerate launch`` it trains data-parallel (see
:mod:`analysis.finetune.distributed`); rank 0 writes the run directory.

This module owns a run's lifecycle: the checks before anything is written (:func:`preflight`),
the writer lock, the summary and configuration, resuming. The rest lives along its seams: the
mask sources (:mod:`.sources`), the optimizers (:mod:`.optim`), the training loop and schedules
(:mod:`.trainer`, :mod:`analysis.training`), the final weights (:mod:`.weights`), the directory's
files (:class:`analysis.jobs.RunDir`).
"""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch

from analysis.errors import SubnetscopeError
from analysis.finetune.config import FinetuneConfig, FinetuneConfigError
from analysis.finetune.distributed import Distributed
from analysis.finetune.sources import check_mask_fits
from analysis.finetune.trainer import Trainer
from analysis.finetune.weights import stored_dtypes
from analysis.io import write_json_atomic
from analysis.jobs import RunDir, RunError, RunLock


# ----------------------------------------------------------------------------- the run

def run_finetune(config: FinetuneConfig, out_dir: str | Path, *, should_stop: Callable[[], bool] | None = None,
                 progress: Callable[[int, int, str], None] | None = None, resume: bool = False,
                 overwrite: bool = False, on_start: Callable[[Path], None] | None = None) -> dict:
    """Trains per ``config`` and writes the run directory (rank 0). Returns the summary.

    Args:
        config (FinetuneConfig): the run.
        out_dir (str or Path): the run directory: new, empty, or the run directory of an earlier
            run (whose files the new run replaces).
        should_stop (callable, optional): polled before every step; True cancels.
        progress (callable, optional): ``progress(step, steps, what)``.
        resume (bool): continue from ``out_dir/state`` (see :func:`resume_finetune`). Default: False.
        overwrite (bool): write into a non-empty directory that is not a run directory. Default: False.
        on_start (callable, optional): called (rank 0) with the run directory once the run owns it.
    Raises:
        SubnetscopeError: bad inputs or an output that may not be written (one line, nothing
            written), another process writing the same run directory, or an OS error while writing.
    """
    out = Path(out_dir)
    main = int(os.environ.get("RANK", "0")) == 0
    config = config.with_absolute_paths()  # what config.json records is found again from anywhere
    if not resume:
        preflight(config, out if main else None, overwrite=overwrite)
    lock = RunLock(out) if main else None  # one writer per run directory
    try:
        if lock is not None and on_start is not None:
            on_start(out)
        return _run_locked(config, out, should_stop, progress, resume)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(config: FinetuneConfig, out: Path, should_stop, progress, resume: bool) -> dict:
    device = Distributed.local_device(_device(config.device))
    dist = Distributed.from_env(device)
    t0 = time.time()
    summary = {"status": "running", "mask_source": config.mask_source, "task": config.task,
               "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "processes": dist.world, "pid": os.getpid()}
    run = RunDir(out)
    metrics_file = None
    if dist.main:
        previous = run.summary()
        if previous.get("title"):  # the name it was queued under
            summary["title"] = previous["title"]
        if resume and "initial" in previous:
            summary["initial"] = previous["initial"]  # the start of the run, measured before it was cut
        write_json_atomic(run.summary_file, summary)  # before config.json: never read as "queued"
        if run.config() != config.to_dict():  # unchanged: keep its time (the runs' order)
            write_json_atomic(run.config_file, config.to_dict())
        if resume:
            meta = run.read_meta()
            missing = run.truncate_metrics(meta["step"], meta.get("metrics_row"))
            if missing:  # lost before this resume (a damaged metrics.jsonl): said, not invented
                summary["metrics_missing"] = missing
        else:  # a new run in a used run directory: nothing of the old one may mix in
            run.clear_outputs()
        metrics_file = open(run.metrics_file, "a" if resume else "w", encoding="utf-8")
    try:
        trainer = Trainer(config, run, dist, device, metrics_file=metrics_file, should_stop=should_stop,
                          progress=progress)
        summary.update(trainer.train(resume))
    except BaseException as e:  # a crash keeps every metric written so far and records the error
        summary.update(status="cancelled" if isinstance(e, KeyboardInterrupt) else "failed",
                       error=str(e) if isinstance(e, SubnetscopeError) else f"{type(e).__name__}: {e}")
        raise
    finally:
        if metrics_file is not None:
            try:
                metrics_file.close()
            except OSError:
                pass  # a full disk: the error being raised says so
        summary["wall_s"] = round(time.time() - t0, 3)
        summary["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if device.type == "cuda":
            summary["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
        if dist.main:
            try:
                run.write_summary(finite(summary))
            except SubnetscopeError:
                if summary["status"] == "running":
                    raise  # else the error being raised already says what went wrong first
        dist.close()
    return summary


def finite(x):
    """``x`` with every NaN or infinite float (a diverged loss) as None: JSON has no such numbers."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def preflight(config: FinetuneConfig, out: str | Path | None = None, *, overwrite: bool = False) -> None:
    """Checks everything a run names before anything is written: the checkpoint, mask files (and
    that they fit the checkpoint), diff checkpoints, the lm data file and, given ``out``, that the
    run directory may be written (not an input, not inside or around one, not a stranger's
    non-empty directory unless ``overwrite``, writable). A bad one is a one-line error and no run
    directory."""
    from analysis.checkpoints import open_checkpoint
    from analysis.io import Inputs, check_output_dir

    ck = open_checkpoint(config.checkpoint)
    stored = stored_dtypes(ck)
    inputs = Inputs([ck.path])
    for path in config.mask or []:
        check_mask_fits(path, ck)
        inputs.add(path)
    for ref in config.diff or []:
        inputs.add(open_checkpoint(ref).path)
    if not any(d.is_floating_point for d in stored.values()):
        raise FinetuneConfigError(f"{config.checkpoint}: holds no floating-point weights to train "
                                  "(a quantized checkpoint? fine-tune its float original)")
    if config.dtype == "bfloat16":
        wider = sorted({str(d).removeprefix("torch.") for d in stored.values()
                        if d.is_floating_point and d != torch.bfloat16})
        if wider:
            raise FinetuneConfigError(f"{config.checkpoint} stores {', '.join(wider)} weights: training in bfloat16 "
                                      "would round every element, inside the mask or not (use --dtype float32)")
    if config.task == "lm":
        p = Path(config.data).expanduser()
        if (p.suffix in (".txt", ".jsonl") or os.sep in config.data) and not p.is_file():
            raise FinetuneConfigError(f"{p}: no such data file")
        inputs.add(p)
    if out is not None:
        check_output_dir(out, inputs, ours=lambda d: RunDir(d).is_run, overwrite=overwrite)


def resume_finetune(run_dir: str | Path, *, steps: int | None = None, **kwargs) -> dict:
    """Continues a run directory from its saved state (after a cancel, a crash or a full disk),
    optionally to a new number of steps. The metrics after the saved step are dropped and
    recomputed (a cut row of the saved step is put back from the state), so a resumed run gives
    the weights and metrics an uninterrupted one would.

    Raises:
        RunError: not a run directory, a damaged config.json or saved state (one line naming the
            file), a run still training, or ``steps`` not beyond the saved step."""
    d = Path(run_dir)
    run = RunDir(d)
    run.require_run()
    saved = run.read_config(FinetuneConfig.from_dict)
    done = run.saved_step()
    main = int(os.environ.get("RANK", "0")) == 0  # the other ranks see rank 0's lock and status
    if main and (run.locked or run.status() == "running"):
        raise RunError(f"{d}: the run is still training (cancel it first)")
    if steps is not None:
        if steps <= done:
            raise RunError(f"{d}: {done} steps are done already; --steps must be more than that")
        saved["steps"] = steps
    return run_finetune(FinetuneConfig.from_dict(saved), d, resume=True, **kwargs)


def _device(name: str) -> torch.device:
    from analysis.checkpoints.models import resolve_device

    return resolve_device(name)
