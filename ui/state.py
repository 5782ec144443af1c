"""The sidebar checkpoint picker and the selection every page reads.

The selection lives in ``st.session_state`` ("base_ref", "tuned_refs"); when nothing is
chosen yet the demo family is the default, so a page opened directly still has checkpoints.
"""

from __future__ import annotations

import json

import streamlit as st

from analysis.paths import default_demo_dir, subnetscope_home
from analysis.io import write_json_atomic
from analysis.families.lineage import normalize_ref
from ui.text import md_code, md_escape, visible

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

    from analysis.checkpoints import is_hub_id

    # a local path that has gone away is dropped; a hub id (org/name, not on disk) is kept; a
    # string with control characters (never written here) is not a reference
    return [r for r in refs if isinstance(r, str) and r and visible(r) == r
            and (Path(r).exists() or is_hub_id(r))][:20]


def remember(ref: str) -> None:
    """Adds a reference that opened successfully to the recent list: one the user chose, not one
    that only came with a link (``url_refs``); never the demo's, nor a string with control
    characters."""
    recent = recent_refs()
    if not ref or visible(ref) != ref or ref in st.session_state.get("url_refs", ()):
        return
    if ref in demo_refs().values() or (recent and recent[0] == ref):
        return
    refs = [ref] + [r for r in recent if r != ref]
    try:
        write_json_atomic(_recent_file(), refs[:20])
    except OSError:
        pass  # a read-only home must not break the page


def demo_refs() -> dict[str, str]:
    """label -> path of the built demo family, and of the SmolLM2 family when ``demo --real
    --finetunes`` built it ({} when neither is built)."""
    from analysis.families.real_family import family_refs

    d = default_demo_dir()
    refs = {}
    if (d / "manifest.json").is_file():
        names = ["base", *DEMO_TUNED]
        refs = {f"demo/{n}": str(d / n) for n in names if (d / n).is_dir()}
    return refs | family_refs()


# ---------------------------------------------------------------------------- the family

def _url_parents() -> dict[str, str | None]:
    """The parents the URL sets (``parent=CHILD::PARENT``, an empty PARENT: none), read once per
    session; the sidebar's corrections join them."""
    ss = st.session_state
    if "url_parents" not in ss:
        found = {}
        for item in st.query_params.get_all("parent"):
            child, sep, parent = item.partition("::")
            child, parent = normalize_ref(child), normalize_ref(parent)
            if sep and child and parent != child:
                found[child] = parent
        ss["url_parents"] = found
    return ss["url_parents"]


def corrections() -> dict[str, str | None]:
    """The user's parents: ``$SUBNETSCOPE_HOME/family.json``, then the URL's (a shared link wins)."""
    from analysis.families.lineage import load_corrections

    return load_corrections() | _url_parents()


_FRESH_S = 2.0  # the family's files are read again after this long (a model card written meanwhile)


def family():
    """The family of the checkpoints chosen in the sidebar (:class:`analysis.families.lineage.Family`):
    each one's parent from its files or the user's correction, read once per rerun or so."""
    import time

    from analysis.families.lineage import Family

    base, tuned = selection()
    refs = tuple(r for r in [base, *tuned] if r)
    corr = corrections()
    given = {path: lab for lab, path in demo_refs().items()}
    key = (refs, tuple(sorted(corr.items(), key=str)), tuple(sorted(given.items())))
    ss = st.session_state
    hit = ss.get("_family")
    if hit and hit[0] == key and time.monotonic() - hit[1] < _FRESH_S:
        return hit[2]
    fam = Family.of(refs, corr)
    labels = fam.labels(given)
    ss["_family"] = (key, time.monotonic(), fam, labels)
    return fam


def parent_of(ref: str | None) -> str | None:
    """The checkpoint ``ref`` was trained from: the family's (the user's correction, else what its
    files say: run directory, adapter, model card, config, manifest — docs/design.md §14)."""
    from analysis.families.lineage import declared_parent

    if not ref:
        return None
    fam = family()
    if ref in fam.parents:
        return fam.parent(ref)
    corr = corrections()
    return corr[ref] if ref in corr else declared_parent(ref, fam.everyone()).ref


BASE_KEY, TUNED_KEY = "picker_base", "picker_tuned"  # the sidebar widgets' keys


def _from_url() -> tuple[str | None, list[str], list[str]]:
    """(base, fine-tunes, dropped) from the page URL's ``base`` and ``tuned`` parameters; a local
    path that does not exist is dropped (and named, for a warning)."""
    from pathlib import Path

    qp = st.query_params
    base = normalize_ref(qp.get("base"))
    tuned = [normalize_ref(t) for t in qp.get_all("tuned")]
    dropped = []

    def ok(r):
        if r and r.startswith("/") and not Path(r).exists():
            dropped.append(r)
            return False
        return bool(r)

    base = base if ok(base) else None
    tuned = list(dict.fromkeys(t for t in tuned if ok(t) and t != base))[:MAX_TUNED]
    return base, tuned, dropped


def _cached_only(refs: list[str | None], role: str) -> list[str | None]:
    """``refs`` without the hub ids that are not in the local cache: those wait in
    ``hub_pending`` for the sidebar's download button. A link or the picker only ever reads the
    cache (no network, no token); a download starts with a click."""
    from analysis.checkpoints import cached_hub_id, is_hub_id
    from analysis.errors import SubnetscopeError

    pending = st.session_state.setdefault("hub_pending", [])
    kept = []
    for r in refs:
        if r and is_hub_id(r):
            try:
                cached = cached_hub_id(r)
            except SubnetscopeError:
                cached = r  # a bad id or an unreadable cache: the page says why (from the cache alone)
            if cached is None:
                if (role, r) not in pending:
                    pending.append((role, r))
                continue
        kept.append(r)
    return kept


def selection() -> tuple[str | None, list[str]]:
    """(base ref, fine-tune refs) chosen in the sidebar. On a session's first run they come from
    the page URL (``?base=…&tuned=…``, so a reload or a shared link shows the same checkpoints),
    else the demo family. A hub id not in the local cache is left out until the user downloads
    it (see :func:`sidebar`); references that came only with the link are not remembered."""
    ss = st.session_state
    added = ss.pop("_add_tuned", None)  # a checkpoint a page wrote (a hybrid): into the picker before it is drawn
    if added and BASE_KEY in ss:
        now = list(ss.get(TUNED_KEY) or [])
        if added not in now and len(now) < MAX_TUNED:
            ss[TUNED_KEY] = [*now, added]
            ss["picker_options"] = list(dict.fromkeys([*ss.get("picker_options", []), added]))
    if BASE_KEY in ss and (moved_by_history("base") or moved_by_history("tuned")):
        # back / forward to an entry with other checkpoints: that entry's choice, as a link would give it
        base, tuned, _ = _from_url()
        for k in ("base", "tuned"):  # handled: later calls in this run see no move
            ss["_url_last"][k] = st.query_params.get_all(k)
        ss[BASE_KEY], ss[TUNED_KEY] = base, tuned
        ss["base_ref"], ss["tuned_refs"] = base, tuned
        ss["picker_options"] = list(dict.fromkeys([*ss.get("picker_options", []), *(r for r in [base, *tuned] if r)]))
    if BASE_KEY in ss:  # the sidebar's widgets hold the latest choice
        before = {ss.get("base_ref"), *ss.get("tuned_refs", [])}
        base = normalize_ref(ss[BASE_KEY])
        tuned = list(dict.fromkeys(normalize_ref(t) for t in ss.get(TUNED_KEY) or [] if t))
        chosen = {base, *tuned} - before
        if chosen and ss.get("url_refs"):
            ss["url_refs"] = ss["url_refs"] - chosen  # chosen again by the user
        ss["base_ref"] = (_cached_only([base], "base") or [None])[0]
        ss["tuned_refs"] = _cached_only(tuned, "tuned")
    if "base_ref" not in ss:
        base, tuned, dropped = _from_url()
        if dropped:
            ss["url_dropped"] = dropped
        if base is None and not tuned:
            refs = demo_refs()
            base = refs.get("demo/base")
            tuned = [refs[f"demo/{n}"] for n in DEMO_TUNED if f"demo/{n}" in refs]
        else:
            ss["url_refs"] = {r for r in [base, *tuned] if r}
        ss["base_ref"] = (_cached_only([base], "base") or [None])[0]
        ss["tuned_refs"] = _cached_only(tuned, "tuned")
    return ss["base_ref"], list(ss.get("tuned_refs", []))


def add_tuned(ref: str) -> bool:
    """Puts ``ref`` (a checkpoint a page just wrote) among the sidebar's fine-tunes on the next run
    and in the recent list. False when the picker already holds :data:`MAX_TUNED` fine-tunes."""
    remember(ref)
    if len(st.session_state.get("tuned_refs", [])) >= MAX_TUNED:
        return False
    st.session_state["_add_tuned"] = ref
    return True


def chosen_refs(empty: str | None = "Choose a checkpoint in the sidebar.") -> list[str]:
    """The base and fine-tunes chosen in the sidebar, base first; with none chosen, the page says
    ``empty`` and stops (``empty=None``: it goes on with an empty list)."""
    base, tuned = selection()
    refs = [r for r in [base, *tuned] if r]
    if not refs and empty is not None:
        st.info(empty)
        st.stop()
    return refs


def _labels_with(refs) -> dict[str, str]:
    """The family's short names, and names for ``refs`` outside it chosen beside them."""
    family()
    labels = st.session_state["_family"][3]
    extra = [r for r in refs if r and r not in labels]
    if not extra:
        return labels
    from analysis.families.lineage import load_names, short_names

    given = {path: lab for lab, path in demo_refs().items()} | load_names()
    return short_names([*labels, *extra], given | labels)


def label_of(ref: str | None) -> str:
    """A checkpoint's short name: the shortest trailing path parts that tell the family's members
    and their parents apart (``arith/grpo-seed1``; the demo's ``demo/sft``), the user's own name
    when given, a hub id as it is (docs/design.md §14)."""
    if not ref:
        return "—"
    return _labels_with([ref]).get(ref, ref)


def formatter(refs) -> callable:
    """A widget's ``format_func`` over ``refs``: their short names as of this run (a snapshot, so the
    widget's labels do not depend on when Streamlit calls it)."""
    labels = dict(_labels_with(list(refs)))
    return lambda r: labels.get(r) or label_of(r)


def _hub_downloads(base: str | None, tuned: list[str]) -> tuple[str | None, list[str]]:
    """The hub ids waiting in ``hub_pending``: each is named with a download button and a
    dismiss button; a click downloads it (config, tokenizer and weights) and selects it."""
    from analysis.checkpoints import download_hub_id
    from analysis.errors import SubnetscopeError

    ss = st.session_state
    pending = ss.get("hub_pending", [])
    for i, (role, ref) in enumerate(list(pending)):
        st.warning(f"{md_code(ref)}: hub id not in the local cache; a link or the picker never downloads")
        c1, c2 = st.columns([3, 1])
        if c1.button(f"Download {md_escape(ref)}", key=f"hub_download_{i}_{ref}", icon=":material/download:"):
            try:
                with st.spinner(f"Downloading {md_escape(ref)}…"):
                    download_hub_id(ref)
            except SubnetscopeError as e:
                st.error(md_escape(str(e)))
                continue
            pending.remove((role, ref))
            ss["url_refs"] = ss.get("url_refs", set()) - {ref}  # chosen by the click
            if role == "base":
                base = ref
            elif ref not in tuned and len(tuned) < MAX_TUNED:
                tuned = [*tuned, ref]
            ss["base_ref"], ss["tuned_refs"] = base, tuned
            ss[BASE_KEY], ss[TUNED_KEY] = base, tuned  # what selection() reads first; no widget drawn yet
            st.rerun()
        elif c2.button("Dismiss", key=f"hub_dismiss_{i}_{ref}"):
            pending.remove((role, ref))
            st.rerun()
    return base, tuned


def sidebar() -> None:
    """Draws the picker: a base and up to three fine-tunes from the demo families, recent
    references, or a typed path / hub id (typed values are accepted as new options).

    The widgets are keyed and never given an ``index`` / ``default`` after the first run: a value
    passed again on every rerun, computed from the previous choice, made Streamlit treat the widget
    as new and undo every second change. The choice is mirrored into the URL."""
    ss = st.session_state
    base, tuned = selection()
    with st.sidebar:
        st.subheader("Checkpoints")
        for r in ss.pop("url_dropped", []):
            st.warning(f"{md_escape(r)}: no such path; dropped from the link")
        base, tuned = _hub_downloads(base, tuned)
    labels = demo_refs()
    options = ss.setdefault("picker_options", [])  # grows only: a stable option list
    for r in [*labels.values(), *recent_refs(), base, *tuned]:
        if r and r not in options:
            options.append(r)
    ss[BASE_KEY] = base  # the latest choice (selection() read it from these keys first)
    ss[TUNED_KEY] = [t for t in tuned if t in options]
    fmt = formatter(options)
    with st.sidebar:
        st.selectbox("Base", options, key=BASE_KEY, format_func=fmt, accept_new_options=True,
                     placeholder="path or hub id",
                     help="A model directory, a .safetensors or .bin file, or a hub id (org/name).")
        st.multiselect("Fine-tunes", options, key=TUNED_KEY, format_func=fmt, accept_new_options=True,
                       max_selections=MAX_TUNED, placeholder="paths or hub ids",
                       help="Up to three fine-tunes of the base; type a path and press Enter to add one.")
        if not labels:
            st.caption("Demo family not built yet: `python -m analysis demo`")
    base, tuned = selection()
    with st.sidebar:
        family_panel()
    fam = family()
    mirror_to_url({"base": base, "tuned": tuned,
                   "parent": [f"{c}::{p or ''}" for c, p in _url_parents().items() if c in fam.members]})


def family_panel() -> None:
    """The family as a small tree (each checkpoint under its parent, the full path and where the
    parent was read in a tooltip), and a form to correct a parent or a short name once: kept in
    ``$SUBNETSCOPE_HOME/family.json`` and in the URL."""
    from analysis.families.lineage import FamilyError, declared_parent, set_name, set_parent

    fam = family()
    if not fam.members:
        return
    st.caption("Family — each fine-tune is compared with its parent")
    for depth, r in fam.tree():
        src = fam.source(r)
        why = (f"parent from the {src.source}: {src.file}" if src.ref else
               "no parent set by you" if src.source == "user" else "no parent named in its files")
        chosen = "" if r in fam.members else " *(not chosen)*"
        indent = ("\u200b" + "\u2003" * depth + "↳ ") if depth else ""  # a zero-width start: the indent is kept
        st.markdown(f"{indent}{md_code(label_of(r))}{chosen}",
                    help=f"{visible(r)} — {visible(why)}")
    ss = st.session_state
    with st.expander("Correct a parent or a name"):
        child = st.selectbox("Checkpoint", fam.members, format_func=formatter(fam.members), key="family_child")
        files = declared_parent(child, fam.everyone()).ref
        keep_files, no_parent = "(as its files say)", "(no parent)"
        others = [r for r in dict.fromkeys([*fam.everyone(), *demo_refs().values()]) if r != child]
        fmt = formatter(others)
        pick = st.selectbox("Its parent", [keep_files, no_parent, *others], key=f"family_parent_{child}",
                            format_func=lambda r: r if r in (keep_files, no_parent) else fmt(r),
                            accept_new_options=True, help=f"Its files say: {visible(files or 'none')}. Type a "
                                                          "path or hub id to name another.")
        name = st.text_input("Short name", label_of(child), key=f"family_name_{child}")
        c1, c2 = st.columns(2)
        try:
            if c1.button("Keep the parent", key="family_keep_parent"):
                if pick == keep_files:
                    set_parent(child, None, forget=True)
                    _url_parents().pop(child, None)
                else:
                    parent = None if pick == no_parent else normalize_ref(pick)
                    set_parent(child, parent)
                    _url_parents()[child] = parent
                ss.pop("_family", None)
                st.rerun()
            if c2.button("Keep the name", key="family_keep_name"):
                set_name(child, name)  # blank: back to the computed name
                ss.pop("_family", None)
                st.rerun()
        except FamilyError as e:
            st.error(md_escape(str(e)))


def mirror_to_url(params: dict) -> None:
    """Writes ``params`` into the page URL (a list: the key repeated; None: removed), touching it
    only where it differs."""
    qp = st.query_params
    last = st.session_state.setdefault("_url_last", {})
    for k, v in params.items():
        want = [] if v is None else [str(x) for x in v] if isinstance(v, list) else [str(v)]
        if qp.get_all(k) != want:
            if want:
                qp[k] = want if isinstance(v, list) else want[0]  # a new browser history entry
            elif k in qp:
                del qp[k]
        last[k] = want


def moved_by_history(param: str) -> bool:
    """True when the URL's ``param`` is not what this session last wrote there: the browser's back or
    forward button brought an earlier entry (Streamlit reruns the page with its query string), so
    the URL's value is the user's choice again."""
    last = st.session_state.get("_url_last", {})
    now = st.query_params.get_all(param)
    # an absent parameter is not a move: switching pages starts the new page's URL without one
    return param in last and bool(now) and now != last[param]


def url_bound(key: str, default, *, parse=str, valid=None, param: str | None = None):
    """Binds the page widget keyed ``key`` to the URL parameter ``param`` (default: ``key``), so
    a reload, a new tab or a shared link shows the same choice. Call it just before the widget
    and create the widget with ``key=key`` and no ``value`` / ``index`` / ``default`` of its own.

    The first time in a session the value comes from the URL when it is there and valid
    (``parse`` raises or ``valid`` says no: an ``st.warning`` names what was dropped, and the
    default is used), else from ``default``; every run then writes the current value back.
    A list default binds a repeated parameter (``?runs=a&runs=b``).

    Returns:
        the widget's current value.
    """
    ss = st.session_state
    param = param or key
    if key in ss and moved_by_history(param):  # back / forward: the entry's value, read as on a first visit
        del ss[key]
    if key not in ss:
        value = default
        raw = st.query_params.get_all(param) if isinstance(default, list) else st.query_params.get(param)
        if raw not in (None, []):
            try:
                v = [parse(r) for r in raw] if isinstance(default, list) else parse(raw)
                ok = valid is None or valid(v)
            except (ValueError, TypeError):
                ok = False
            if ok:
                value = v
            else:
                st.warning(f"{md_code(f'{param}={raw}')} from the link does not apply here; using the default")
        ss[key] = value
    mirror_to_url({param: ss[key]})
    return ss[key]
