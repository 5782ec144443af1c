"""Analyses for the pages: small checkpoints inline (cached), large ones as background jobs.

A diff, overlap, importance scoring or selector evaluation of a large checkpoint never runs
inside the page rerun: it is a job (the CLI in a subprocess, :class:`analysis.jobs.JobDir`) that
a fragment polls every second with a progress bar and a cancel button; the finished result is
read from the job directory. "Large" is :func:`inline_limit` parameters.
"""

from __future__ import annotations

import os

import streamlit as st

from analysis.checkpoints import fingerprint
from analysis.sparsity.diff import diff_checkpoints
from analysis.errors import SubnetscopeError
from analysis.jobs import JobDir
from analysis.sparsity.overlap import overlap
from ui.text import md_escape


def inline_limit() -> int:
    """Parameters below which an analysis runs inline (well under a second per pair); above it
    runs as a job. ``SUBNETSCOPE_INLINE_LIMIT`` overrides the default of 20M."""
    return int(os.environ.get("SUBNETSCOPE_INLINE_LIMIT", 20_000_000))


@st.cache_data(show_spinner="Diffing…", max_entries=64)
def _diff_inline(base: str, tuned: str, tol: float, rank: bool, fps: tuple) -> dict:
    return diff_checkpoints(base, tuned, tol=tol, rank=rank).to_json()


@st.cache_data(show_spinner="Measuring overlap…", max_entries=32)
def _overlap_inline(base: str, tuned: tuple[str, ...], tol: float, fps: tuple) -> dict:
    return overlap(base, list(tuned), tol=tol).to_json()


def diff(base: str, tuned: str, tol: float, rank: bool, total_params: int, key: str) -> dict | None:
    """The diff JSON of base → tuned, or None while its background job runs."""
    refs = [base, tuned]
    if total_params < inline_limit():
        return _diff_inline(base, tuned, tol, rank, tuple(fingerprint(r) for r in refs))
    argv = ["diff", base, tuned, "--tol", repr(tol), "--quiet", *(["--rank"] if rank else [])]
    return _job(argv, refs, key)


def overlap_of(base: str, tuned: list[str], tol: float, total_params: int, key: str) -> dict | None:
    refs = [base, *tuned]
    if total_params < inline_limit():
        return _overlap_inline(base, tuple(tuned), tol, tuple(fingerprint(r) for r in refs))
    return _job(["overlap", base, *tuned, "--tol", repr(tol), "--quiet"], refs, key)


def param_count(ref: str) -> int:
    """The checkpoint's parameter count, from its headers (nothing loaded)."""
    return _param_count(ref, fingerprint(ref))


@st.cache_data(max_entries=64, show_spinner=False)
def _param_count(ref: str, fp: tuple) -> int:
    from analysis.checkpoints import open_checkpoint, summarize

    return summarize(open_checkpoint(ref))["total_params"]


def importance_job(ref: str, selector: str, granularity: str | None, data: str, samples: int, seq_len: int,
                   scope: str, density: float, key: str, **options) -> tuple[dict, str] | None:
    """``python -m analysis importance`` as a job: (its JSON, the mask file it wrote), or None
    while it runs."""
    argv = ["importance", ref, "--selector", selector, "--data", data, "--samples", str(samples),
            "--seq-len", str(seq_len), "--scope", scope, "--density", repr(density),
            "--mask-out", "{job}/mask.safetensors", "--quiet",
            *(["--granularity", granularity] if granularity else []),
            *(a for k, v in sorted(options.items()) for a in ("--option", f"{k}={v}"))]
    refs = [ref, *(v for k, v in sorted(options.items()) if k in ("base", "tuned"))]
    res = _job(argv, refs, key, label=f"score {selector}")
    return None if res is None else (res, res["mask"]["file"])


def evaluate_job(ref: str, selectors: list[str], data: str, samples: int, seq_len: int, scope: str,
                 density: float, key: str, against: tuple[str, str] | None = None) -> dict | None:
    """``python -m analysis evaluate-selectors`` as a job: its JSON, or None while it runs."""
    argv = ["evaluate-selectors", ref, "--selectors", ",".join(selectors), "--data", data, "--samples",
            str(samples), "--seq-len", str(seq_len), "--scope", scope, "--density", repr(density), "--quiet",
            *(["--against-diff", *against] if against else [])]
    return _job(argv, [ref, *(against or ())], key, label=f"evaluate {len(selectors)} selectors")


def _job(argv: list[str], refs: list[str], key: str, label: str | None = None) -> dict | None:
    job = JobDir.of(argv, refs)
    stt = job.state()
    if stt.status == "done":
        return stt.result()
    if stt.status in ("failed", "died", "cancelled", "missing"):
        if stt.status != "missing":
            st.error(f"{argv[0]} job {stt.status}: {md_escape(stt.error or 'no result')}")
        if st.button(f"Run {md_escape(label or argv[0])} in the background", key=f"start_{key}", type="primary"):
            try:
                job.start(argv, refs)
            except SubnetscopeError as e:  # e.g. a full disk under the jobs folder: one line, no traceback
                st.error(md_escape(str(e)))
                return None
            st.rerun()
        return None
    _poll(job, key)
    return None


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


@st.cache_resource(show_spinner="Diffing for the changed elements…", max_entries=8)
def _changed(base: str, tuned: str, tol: float, fps: tuple) -> dict:
    masks = {}
    diff_checkpoints(base, tuned, tol=tol, on_mask=masks.__setitem__)
    return masks


def changed_mask(base: str, tuned: str, tol: float) -> dict:
    """name -> BoolTensor of the elements base → tuned changed at τ (cached)."""
    return _changed(base, tuned, tol, (fingerprint(base), fingerprint(tuned)))


def attribution_job(ref: str, prompt: str, target: str, method: str, steps: int | str, device: str,
                    compare: str | None, key: str, budget: int | None = None) -> dict | None:
    """``python -m analysis attribute`` as a job (IG with many steps, ablation of a long prompt on a
    large model): its JSON, or None while it runs. ``steps`` may be ``"auto"`` (then ``budget``
    bounds the adaptive IG)."""
    argv = ["attribute", ref, "--prompt", prompt, "--target", target, "--method", method, "--steps", str(steps),
            *(["--step-budget", str(budget)] if budget else []),
            "--device", device, "--quiet", *(["--compare", compare] if compare else [])]
    return _job(argv, [ref, *([compare] if compare else [])], key, label=f"{method} attribution")


def trajectory_job(base: str, checkpoints: list[str], steps: list[int], tol: float, key: str) -> dict | None:
    """``python -m analysis trajectory`` as a job: its JSON, or None while it runs."""
    argv = ["trajectory", base, *checkpoints, "--tol", repr(tol), "--quiet",
            *(["--steps", ",".join(map(str, steps))] if steps else [])]
    return _job(argv, [base, *checkpoints], key, label="trajectory")


def geometry_job(base: str, tuned: str, k, tol: float, key: str, label: str | None = None) -> dict | None:
    """``python -m analysis geometry`` as a job (a large pair: an SVD per block matrix): its JSON,
    or None while it runs; ``label`` names the pair on the button."""
    argv = ["geometry", base, tuned, "--tol", repr(tol), "--quiet", *(["--k", str(k)] if k is not None else [])]
    return _job(argv, [base, tuned], key, label=f"geometry of {label or tuned}")
