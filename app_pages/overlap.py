"""Overlap: do different fine-tunes of one base change the same parameters, beyond chance?"""

import json

import pandas as pd
import streamlit as st

from ui import plots
from analysis.sparsity.diff import tolerance_grid
from analysis.errors import SubnetscopeError
from analysis.definitions import PAPER_TOL
from ui import tables, work
from ui.loaders import summary, try_load
from ui.state import family, label_of, normalize_ref, parent_of, selection, url_bound
from ui.text import md_escape, fmt_tau

st.header("Subnetwork overlap")
base, tuned = selection()
if not base or len(tuned) < 2:
    st.info("Choose a base and at least two fine-tunes of it in the sidebar.")
    st.stop()

# the runs must share a base: by default the runs' common parent in the family (the demo's RL runs come from its
# SFT model, not from its base), kept in the URL with the runs
fam = family()
shared = [parent_of(t) for t in tuned]
common = max(set(shared) - {None}, key=shared.count, default=None)
default_base = common if common and shared.count(common) >= 2 else base
options = list(dict.fromkeys([default_base, base, *tuned, *fam.everyone()]))
c1, c2, c3 = st.columns([3, 2, 2])
url_bound("overlap_tol", PAPER_TOL, param="tol", parse=float, valid=lambda v: v in tolerance_grid())
tol = c1.select_slider("Tolerance τ", options=tolerance_grid(), format_func=fmt_tau, key="overlap_tol")
url_bound("overlap_base", default_base, param="runs_base", parse=normalize_ref, valid=lambda v: v in options)
if st.session_state["overlap_base"] not in options:  # the sidebar's checkpoints changed
    st.session_state["overlap_base"] = default_base
run_base = c2.selectbox("Base of the runs", options, format_func=label_of, key="overlap_base",
                        help="The checkpoint every run was fine-tuned from: their common parent in the family.")
candidates = [t for t in tuned if t != run_base]
default_runs = [t for t in candidates if parent_of(t) == run_base]
default_runs = default_runs if len(default_runs) >= 2 else candidates
url_bound("overlap_runs", default_runs, param="runs", parse=normalize_ref,
          valid=lambda v: all(x in candidates for x in v))
if any(x not in candidates for x in st.session_state["overlap_runs"]):  # the base or the sidebar changed
    st.session_state["overlap_runs"] = default_runs
runs = c3.multiselect("Runs", candidates, format_func=label_of, key="overlap_runs")
if len(runs) < 2:
    st.info("Pick at least two runs fine-tuned from the chosen base.")
    st.stop()
if any(parent_of(x) != run_base for x in runs):
    strays = ", ".join(f"{label_of(x)} (parent {label_of(parent_of(x))})" for x in runs if parent_of(x) != run_base)
    st.warning(f"Not every run is a child of {md_escape(label_of(run_base))} in the family: {md_escape(strays)}. "
               "Their overlap mixes updates from different starts.")
base = run_base
base_summary = try_load(summary, base)
if base_summary is None:
    st.stop()
try:
    r = work.overlap_of(base, runs, tol, key="overlap")
except SubnetscopeError as e:
    st.error(md_escape(str(e)))
    st.stop()
if r is None:
    st.stop()

labels = [label_of(x) for x in runs]
st.caption(f"Runs fine-tuned from **{md_escape(label_of(base))}**; {r['total_params']:,} elements compared at "
           f"τ = {fmt_tau(tol)}.")
st.markdown(
    "For runs *a*, *b* with changed sets I_a, I_b: **o1** = |I_a ∩ I_b| / |I_a|, **o2** = |I_a ∩ I_b| / |I_b|. "
    "*Random* is the paper's baseline (independent subnetworks of the same sizes: o1 = 1 − s_b); "
    "*matched* draws them within each (tensor, exponent of θ⁰) stratum — small weights have a small bf16 step, "
    "so any two runs tend to change the same small weights (arXiv 2505.11711 §5; docs/design.md §4).")
st.plotly_chart(plots.overlap_matrix(r["pairs"], labels), key="matrix")
pairs = pd.DataFrame([{**p, "a": labels[p["a"]], "b": labels[p["b"]]} for p in r["pairs"]])
tables.show(st, pairs[["a", "b", "sparsity_a", "sparsity_b", "o1", "o1_random", "o1_matched", "o2", "o2_random",
                       "o2_matched", "jaccard", "jaccard_random"]])

left, right = st.columns(2)
names = [f"{labels[p['a']]} ∩ {labels[p['b']]}" for p in r["pairs"]]
if r["layers"]:
    i = left.selectbox("Pair", range(len(names)), format_func=lambda k: names[k])
    left.plotly_chart(plots.overlap_by_layer(r["layers"], i), key="by_layer")
right.plotly_chart(plots.consensus_bar(r["consensus"]), key="consensus")
right.caption(f"{r['total_params']:,} elements compared; k = 0 are unchanged by every run.")

if all("cosine" in p for p in r["pairs"]):
    st.subheader("Runs as vectors")
    st.markdown("With Δ = θ_run − θ_base: the **cosine** of two runs' updates (1: the same direction, 0: "
                "orthogonal, −1: opposite), and the **sign agreement** on the elements both changed at τ "
                "(0.5 by chance; the sign election of TIES merging, arXiv 2306.01708). Float64, one pass with "
                "the counts above (docs/design.md §16).")
    vec = pd.DataFrame([{"a": labels[p["a"]], "b": labels[p["b"]], "cosine": p["cosine"],
                         "sign_agreement": p["sign_agreement"], "sign_agreement_random": 0.5} for p in r["pairs"]])
    tables.show(st, vec)
    j = st.selectbox("Pair ", range(len(names)), format_func=lambda k: names[k], key="vector_pair")
    st.plotly_chart(plots.vectors_by_layer(r["pairs"][j]), key="vectors_by_layer")
st.download_button("Download JSON", json.dumps(r, indent=1), "overlap.json", "application/json")
