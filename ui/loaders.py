"""Cached calls into analysis. Keys include the checkpoint's file fingerprint, so editing a
checkpoint on disk invalidates its cached numbers."""

from __future__ import annotations

import streamlit as st

from analysis.checkpoints import align, fingerprint, open_checkpoint, summarize
from analysis.errors import SubnetscopeError
from ui.state import remember
from ui.text import md_escape


@st.cache_data(show_spinner="Reading checkpoint metadata…", max_entries=64)
def _summary(ref: str, fp: tuple) -> dict:
    return summarize(open_checkpoint(ref, local_only=True))  # a hub id: from the local cache only


def summary(ref: str) -> dict:
    """``analysis.checkpoints.summarize`` for a reference, cached by file fingerprint. A
    reference that opens is remembered for the sidebar's recent list."""
    s = _summary(ref, fingerprint(ref))
    remember(ref)
    return s


@st.cache_data(show_spinner="Aligning checkpoints…", max_entries=32)
def _alignment(refs: tuple[str, ...], fps: tuple) -> dict:
    d = align([open_checkpoint(r, local_only=True) for r in refs]).to_dict()
    d.pop("tensors")  # the page shows the report, not the per-tensor list
    return d


def alignment(refs: list[str]) -> dict:
    return _alignment(tuple(refs), tuple(fingerprint(r) for r in refs))


def try_load(fn, *args):
    """Runs a loader; on a user-facing error shows ``st.error`` (its text, never Markdown) and
    returns None."""
    try:
        return fn(*args)
    except SubnetscopeError as e:
        st.error(md_escape(str(e)))
        return None
