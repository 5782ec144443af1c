"""Analyses for the pages: below the inline limit computed in the page (cached), above it a
background job — one rule for every analysis, from its spec (:mod:`analysis.specs`).

:func:`analysis` takes a spec's name and its params: when the spec's cost (estimated from the
checkpoints' headers) is below :func:`inline_limit`, it runs in the page, cached by the spec's cache
key; above it, it is a job (:class:`analysis.jobs.JobDir`: the params as JSON, run by ``python -m
analysis run-job`` in a subprocess) that a fragment polls every second with a progress bar and a
cancel button, and the finished result is read from the job directory. No page writes a flag.
"""

from __future__ import annotations

import json
import os

import streamlit as st

from analysis.checkpoints import fingerprint
from analysis.errors import SubnetscopeError
from analysis.jobs import JobDir
from analysis.specs import get_spec
from analysis.specs.base import params_to_json
from analysis.sparsity.diff import diff_checkpoints
from ui.text import md_escape


def inline_limit() -> int:
    """The cost (parameters read, :attr:`analysis.specs.base.Spec.cost`) below which an analysis runs
    inline (well under a second per pair); above it runs as a job. ``SUBNETSCOPE_INLINE_LIMIT``
    overrides the default of 20M."""
    return int(os.environ.get("SUBNETSCOPE_INLINE_LIMIT", 20_000_000))


def launcher():
    """How the page starts a job: None (a detached ``run-job`` process) unless
    ``SUBNETSCOPE_JOBS_IN_PROCESS=1`` — then the job runs in the page's process to its end (tests: the
    same job directory, params file and result, without a process per job)."""
    if os.environ.get("SUBNETSCOPE_JOBS_IN_PROCESS") == "1":
        from analysis.jobs import run_in_process

        return run_in_process
    return None


def runs_inline(name: str, params) -> bool:
    """The one rule: whether ``name`` with ``params`` is computed in the page."""
    return get_spec(name).cost(params) < inline_limit()


@st.cache_data(show_spinner="Computing…", max_entries=128)
def _inline(name: str, params_json: str, fps: tuple) -> dict:
    from analysis.specs.base import params_from_json

    spec = get_spec(name)
    if spec.loads_model:  # the page shows its own spinner: no transformers bars in the server's log
        from analysis.specs.common import quiet_transformers

        quiet_transformers(True)
    return spec.run(params_from_json(spec, json.loads(params_json)), None)


def analysis(name: str, params, key: str, label: str | None = None) -> dict | None:
    """The result JSON of analysis ``name`` with ``params`` (a params dataclass of its spec): computed
    here below the inline limit, else a background job's — None while that runs (or waits for a
    click: a job starts only on the button)."""
    spec = get_spec(name)
    if runs_inline(name, params):
        return _inline(name, json.dumps(params_to_json(params), sort_keys=True),
                       tuple(fingerprint(r) for r in spec.refs(params)))
    return job(name, params, key, label)


def diff(base: str, tuned: str, tol: float, rank: bool, key: str) -> dict | None:
    """The diff JSON of base → tuned, or None while its background job runs."""
    from analysis.specs.diff import DiffParams

    return analysis("diff", DiffParams(base, tuned, tol=tol, rank=rank), key)


def overlap_of(base: str, tuned: list[str], tol: float, key: str) -> dict | None:
    from analysis.specs.overlap import OverlapParams

    return analysis("overlap", OverlapParams(base, tuple(tuned), tol=tol), key)


def importance_job(params, key: str) -> tuple[dict, str] | None:
    """``importance`` as a job, its mask written into the job directory: (its JSON, the mask file),
    or None while it runs."""
    import dataclasses

    res = job("importance", dataclasses.replace(params, mask_out="{job}/mask.safetensors"), key,
              label=f"score {params.selector}")
    return None if res is None else (res, res["mask"]["file"])


def job(name: str, params, key: str, label: str | None = None) -> dict | None:
    """Analysis ``name`` as a background job: its JSON once done, else None (a start button, or the
    progress of the running job)."""
    spec = get_spec(name)
    jd = JobDir.of(spec, params)
    stt = jd.state()
    if stt.status == "done":
        return stt.result()
    if stt.status in ("failed", "died", "cancelled", "missing"):
        if stt.status != "missing":
            st.error(f"{name} job {stt.status}: {md_escape(stt.error or 'no result')}")
        st.caption(size_note(spec, params))
        if st.button(f"Run {md_escape(label or name)} in the background", key=f"start_{key}", type="primary"):
            try:
                jd.start(spec, params, launcher=launcher())
            except SubnetscopeError as e:  # e.g. a full disk under the jobs folder: one line, no traceback
                st.error(md_escape(str(e)))
                return None
            st.rerun()
        return None
    _poll(jd, key)
    return None


DISK_RATE = 400e6  # bytes/s: a cold read of an 8B pair's 32 GB took 85 s on the 2-core VM (the timing)


def size_note(spec, params) -> str:
    """What a job will read, said before it starts: the weights' size on disk, the parameters its cost
    counts, and a time at disk speed (a floor: SVDs and calibration passes add to it)."""
    from analysis.specs.common import human_bytes

    total = sum(size for r in spec.refs(params) for _, size, _ in fingerprint(r)[1])
    cost = spec.cost(params)
    secs = total / DISK_RATE
    when = f"{secs:.0f} s" if secs < 120 else f"{secs / 60:.1f} min"
    return (f"Reads {human_bytes(total)} of weights ({cost:,} parameter reads by its cost) — at least {when} at "
            f"disk speed ({DISK_RATE / 1e6:.0f} MB/s); progress and cancel below once it runs.")


def _poll(job: JobDir, key: str) -> None:
    @st.fragment(run_every=1.0)
    def progress():
        s = job.state()
        if s.status != "running":
            st.rerun()  # the whole page: it now shows the result (or the error)
        st.progress(s.fraction, text=f"{s.done:,} of {s.total:,} — {md_escape(s.current)}")  # a tensor's name
        if st.button("Cancel", key=f"cancel_{key}"):
            job.cancel()

    progress()


@st.cache_data(show_spinner="Building the mask…", max_entries=8)
def _mask_bytes(base: str, tuned: str, tol: float, fps: tuple) -> bytes:
    import tempfile
    from pathlib import Path

    from analysis.sparsity.masks import save_mask

    masks = {}
    diff_checkpoints(base, tuned, tol=tol, on_mask=masks.__setitem__)
    with tempfile.TemporaryDirectory() as tmp:
        f = save_mask(Path(tmp) / "mask.safetensors", masks, source=f"diff {base} -> {tuned} tol={tol:g}")
        return f.read_bytes()


def mask_bytes(base: str, tuned: str, tol: float) -> bytes:
    """The changed elements of base → tuned at τ as a packed-bits mask file (small models)."""
    return _mask_bytes(base, tuned, tol, (fingerprint(base), fingerprint(tuned)))


# ---------------------------------------------------------------------------- importance

@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def _model(ref: str, fp: tuple):
    from analysis.checkpoints.models import load_model

    return load_model(ref, device="auto")


@st.cache_resource(show_spinner="Scoring…", max_entries=32)
def _scores(ref: str, fp: tuple, selector: str, granularity: str | None, data: str, samples: int, seq_len: int,
            seed: int, options: tuple):
    from analysis.importance.calibration import calibration_batches
    from analysis.importance.scores import compute_scores
    from analysis.importance.selectors import get_selector

    model, tokenizer = _model(ref, fp)
    batches = None
    if get_selector(selector).needs_data:
        batches = calibration_batches(data, tokenizer, samples=samples, seq_len=seq_len, seed=seed)
    return compute_scores(model, selector, batches, granularity=granularity, seed=seed, **dict(options))


def scores(ref: str, selector: str, granularity: str | None, data: str, samples: int, seq_len: int, seed: int = 0,
           **options):
    """Importance scores of a checkpoint (cached per file fingerprint and every parameter)."""
    return _scores(ref, fingerprint(ref), selector, granularity, data, samples, seq_len, seed,
                   tuple(sorted(options.items())))
