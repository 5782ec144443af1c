"""The sidebar checkpoint picker and the selection every page reads.

The selection lives in ``st.session_state`` ("base_ref", "tuned_refs"); when nothing is
chosen yet the demo family is the default, so a page opened directly still has checkpoints.
"""

from __future__ import annotations

import json

import streamlit as st

from analysis.paths import default_demo_dir, subnetscope_home
from analysis.io import write_json_atomic

MAX_TUNED = 3
DEMO_TUNED = ("sft", "rl-seed1", "rl-seed2")


def _recent_file():
    return subnetscope_home() / "recent.json"


def recent_refs() -> list[str]:
    """Paths / hub ids that opened successfully before (most recent first)."""
    try:
        refs = json.loads(_recent_file().read_text())
    except (OSError, ValueError):
        return []
    from pathlib import Path

    # a local path that has gone away is dropped; a hub id (org/name, not on disk) is kept
    return [r for r in refs if isinstance(r, str) and (Path(r).exists() or not r.startswith(("/", ".", "~")))][:20]


def remember(ref: str) -> None:
    """Adds a reference that opened successfully to the recent list (the demo's are not listed)."""
    recent = recent_refs()
    if ref in demo_refs().values() or (recent and recent[0] == ref):
        return
    refs = [ref] + [r for r in recent if r != ref]
    try:
        write_json_atomic(_recent_file(), refs[:20])
    except OSError:
        pass  # a read-only home must not break the page


def demo_refs() -> dict[str, str]:
    """label -> path of the built demo family ({} when it is not built)."""
    d = default_demo_dir()
    if not (d / "manifest.json").is_file():
        return {}
    names = ["base", *DEMO_TUNED]
    return {f"demo/{n}": str(d / n) for n in names if (d / n).is_dir()}


def parent_of(ref: str) -> str | None:
    """The checkpoint a fine-tune was trained from, when known (the demo manifest's parents)."""
    d = default_demo_dir()
    try:
        models = json.loads((d / "manifest.json").read_text())["models"]
    except (OSError, ValueError, KeyError):
        return None
    for name, m in models.items():
        if str(d / name) == ref and m.get("parent"):
            return str(d / m["parent"])
    return None


def _label(ref: str, labels: dict[str, str]) -> str:
    return next((lab for lab, r in labels.items() if r == ref), ref)


def selection() -> tuple[str | None, list[str]]:
    """(base ref, fine-tune refs) chosen in the sidebar, defaulting to the demo family."""
    ss = st.session_state
    if "base_ref" not in ss:
        refs = demo_refs()
        ss["base_ref"] = refs.get("demo/base")
        ss["tuned_refs"] = [refs[f"demo/{n}"] for n in DEMO_TUNED if f"demo/{n}" in refs]
    return ss["base_ref"], list(ss.get("tuned_refs", []))


def chosen_refs(empty: str | None = "Choose a checkpoint in the sidebar.") -> list[str]:
    """The base and fine-tunes chosen in the sidebar, base first; with none chosen, the page says
    ``empty`` and stops (``empty=None``: it goes on with an empty list)."""
    base, tuned = selection()
    refs = [r for r in [base, *tuned] if r]
    if not refs and empty is not None:
        st.info(empty)
        st.stop()
    return refs


def label_of(ref: str) -> str:
    """Short display name of a reference (demo/sft rather than the full path)."""
    return _label(ref, demo_refs())


def sidebar() -> None:
    """Draws the picker: a base and up to three fine-tunes from the demo family, recent
    references, or a typed path / hub id (typed values are accepted as new options)."""
    base, tuned = selection()
    labels = demo_refs()
    options = list(dict.fromkeys([*labels.values(), *recent_refs(), *([base] if base else []), *tuned]))
    fmt = lambda r: _label(r, labels)  # noqa: E731
    with st.sidebar:
        st.subheader("Checkpoints")
        new_base = st.selectbox("Base", options, index=options.index(base) if base in options else None,
                                format_func=fmt, accept_new_options=True, placeholder="path or hub id",
                                help="A model directory, a .safetensors or .bin file, or a hub id (org/name).")
        new_tuned = st.multiselect("Fine-tunes", options, default=[t for t in tuned if t in options],
                                   format_func=fmt, accept_new_options=True, max_selections=MAX_TUNED,
                                   placeholder="paths or hub ids",
                                   help="Up to three fine-tunes of the base; type a path and press Enter to add one.")
        if not labels:
            st.caption("Demo family not built yet: `python -m analysis demo`")
    st.session_state["base_ref"] = new_base
    st.session_state["tuned_refs"] = list(new_tuned)
