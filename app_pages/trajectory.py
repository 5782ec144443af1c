"""Trajectory: how the changed subnetwork of one run grows and settles over its checkpoints.

The run is a base and its checkpoints in training order: a folder of ``step-N`` / ``checkpoint-N``
directories (by default the demo's RL run, saved every 10 steps) or a list of paths; the base is the
first checkpoint's parent in the family. All of it is kept in the URL. Small models are measured inside the page
(cached by the files' fingerprints); larger ones by a background ``trajectory`` job.
"""

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from ui import plots
from analysis.families.demo import trajectory_dirs
from analysis.errors import SubnetscopeError
from analysis.paths import default_demo_dir
from analysis.sparsity.trajectory import at_tolerance, infer_steps, run_checkpoints
from analysis.specs.trajectory import TrajectoryParams
from analysis.definitions import DECADE_TOLS, PAPER_TOL
from ui import tables, work
from ui.state import label_of, mirror_to_url, normalize_ref, parent_of, url_bound
from ui.text import md_escape, fmt_tau

st.header("Trajectory")
st.caption("One run's checkpoints against its base and against each other: update sparsity along the steps, the "
           "changed set growing and settling, the step at which elements first change, and how much of the final "
           "subnetwork each checkpoint already holds (docs/design.md §11).")

# the run: one folder of step-N / checkpoint-N directories (sorted by step), or a list; its base is the first
# checkpoint's parent in the family (a run directory's start, a model card, the demo manifest), all in the URL
demo = default_demo_dir()
demo_run = trajectory_dirs(demo)
c1, c2 = st.columns([2, 1])
url_bound("trajectory_run", str(Path(demo_run[0]).parent) if demo_run else "", param="run", parse=normalize_ref)
folder = c1.text_input("Run folder", key="trajectory_run",
                       help="A folder of the run's saved checkpoints: step-N or checkpoint-N directories (sorted by "
                            "the step in their names), e.g. a Trainer's output_dir.")
ss = st.session_state
if "trajectory_list" not in ss:  # the URL's ?ckpt=…&ckpt=… the first time, then the text area's own value
    ss["trajectory_list"] = "\n".join(x for x in (normalize_ref(c) for c in st.query_params.get_all("ckpt")) if x)
with st.expander("…or list the checkpoints in training order", expanded=bool(ss["trajectory_list"])):
    st.text_area("One path a line (used instead of the folder when given)", key="trajectory_list", height=120,
                 help="Directories or files; the steps are read from the names when they carry them.")
listed = [x for x in (normalize_ref(line) for line in ss["trajectory_list"].splitlines()) if x]
mirror_to_url({"ckpt": listed})
cks = listed
if not cks and folder:
    try:
        cks = run_checkpoints(folder)
    except SubnetscopeError as e:
        st.error(md_escape(str(e)))
        st.stop()
start = parent_of(cks[0]) if cks else None
url_bound("trajectory_base", start or "", param="from", parse=normalize_ref)
if not st.session_state["trajectory_base"] and start:
    st.session_state["trajectory_base"] = start
base = c2.text_input("Base (the run's start)", key="trajectory_base",
                     help="The checkpoint the run started from; by default the first checkpoint's parent in its "
                          "files (a run directory's start, a model card's base_model, the demo manifest).")
if cks:
    st.caption(f"{len(cks)} checkpoints: " + md_escape(", ".join(label_of(c) for c in cks)) + " — from "
               + md_escape(label_of(base) if base else "?"))
c3, c4 = st.columns(2)
TAUS = list(DECADE_TOLS)
url_bound("trajectory_tol", PAPER_TOL, param="tol", parse=float, valid=lambda v: v in TAUS)
tol = c3.select_slider("Tolerance τ", options=TAUS, format_func=fmt_tau, key="trajectory_tol")
try:
    named_steps = ",".join(map(str, infer_steps(cks))) if cks else ""
except SubnetscopeError as e:  # step names out of training order: said below, never renumbered
    named_steps, order_problem = "", e
else:
    order_problem = None
steps_text = c4.text_input("Steps (optional)", named_steps,
                           help="Comma-separated training step of each checkpoint; where the names carry steps "
                                "(checkpoint-500, step-20), the same ones.")
if not base or not cks:
    st.info("Give the base and at least one checkpoint of the run.")
    st.stop()
if order_problem is not None:
    st.error(md_escape(str(order_problem)))
    st.stop()


try:
    steps = [int(s) for s in steps_text.split(",") if s.strip()]
except ValueError:
    st.error(f"Steps: whole numbers separated by commas, not {md_escape(repr(steps_text))}")
    st.stop()
# One pass answers every τ of the slider for the sparsity lines and the layer heatmap (at_tolerance);
# the set counts (ever changed, first changed, back at the base, overlap with the final set) need the
# changed sets, so they stay at the pass τ until the user asks for them at another.
pass_tol = st.session_state.setdefault("trajectory_pass_tol", PAPER_TOL)
try:
    d = work.analysis("trajectory", TrajectoryParams(base, tuple(cks), steps=",".join(map(str, steps)) or None,
                                                     tol=pass_tol), key="trajectory")
    if d is None:
        st.stop()
    sets = d  # the set counts, at the pass τ
    if tol != pass_tol:
        d = at_tolerance(d, tol)
except SubnetscopeError as e:
    st.error(md_escape(str(e)))
    st.stop()
except ValueError as e:  # a result written before the per-τ counts existed
    st.warning(f"{md_escape(e)}; the page measures the run at τ = {fmt_tau(tol)} instead.")
    st.session_state["trajectory_pass_tol"] = tol
    st.rerun()

if d.get("skipped"):  # nothing dropped silently: the tensors left out, with their reasons
    st.warning(f"{len(d['skipped'])} tensor(s) skipped: " + "; ".join(md_escape(f"{x['name']}: {x['reason']}")
                                                                    for x in d["skipped"][:5])
               + (f"; and {len(d['skipped']) - 5} more (see the JSON)" if len(d["skipped"]) > 5 else ""))
for r in d.get("resized", []):
    st.caption(f"Resized {md_escape(r['key'])}: compared on the {r['compared_rows']:,} shared rows.")
detail = d.get("detail_tolerance", d["tolerance"])
if detail != tol:
    n1, n2 = st.columns([4, 1])
    n1.caption(f"Sparsity and the layer heatmap are at τ = {fmt_tau(tol)}. Ever changed, first changed, back at the "
               f"base and the overlap with the final set come from the pass at τ = {fmt_tau(detail)}; recomputing "
               "them reads the weights again.")
    if n2.button(f"Sets at τ = {fmt_tau(tol)}", key="trajectory_details"):
        st.session_state["trajectory_pass_tol"] = tol
        st.rerun()
last = d["checkpoints"][-1]
suffix = "" if detail == tol else f" (τ = {fmt_tau(detail)})"
m1, m2, m3, m4 = st.columns(4)
m1.metric("checkpoints", f"{len(d['checkpoints'])}")
m2.metric("final update sparsity", f"{last['vs_base']['update_sparsity']:.2%}")
m3.metric("ever changed" + suffix, f"{last['cumulative_changed']:,}", help=f"of {d['total_params']:,} elements")
m4.metric("never changed" + suffix, f"{d['first_changed_histogram']['never']:,}")
st.plotly_chart(plots.trajectory_sparsity(d), key="sparsity")
a, b = st.columns(2)
a.plotly_chart(plots.trajectory_sets(sets), key="sets")  # one τ in one chart: the pass's
b.plotly_chart(plots.trajectory_overlap(sets), key="overlap")
st.plotly_chart(plots.trajectory_layers(d), key="layers")
rows = [{"step": c["step"], "checkpoint": label_of(c["checkpoint"]),
         "sparsity vs base": c["vs_base"]["update_sparsity"],
         "sparsity vs previous": c["vs_previous"]["update_sparsity"],
         "changed": c["vs_base"]["changed"], "ever changed" + suffix: c["cumulative_changed"],
         "first changed here" + suffix: c["first_changed"], "back at the base" + suffix: c["returned_to_base"],
         "o1 with final" + suffix: c["overlap_with_final"]["o1"]} for c in d["checkpoints"]]
tables.show(st, pd.DataFrame(rows))
st.download_button("Download JSON", data=json.dumps(d, indent=2), file_name="trajectory.json",
                   mime="application/json")
