"""Overlap: do different fine-tunes of one base change the same parameters, beyond chance?"""

import json

import pandas as pd
import streamlit as st

from ui import plots
from analysis.sparsity.diff import tolerance_grid
from analysis.errors import SubnetscopeError
from analysis.definitions import PAPER_TOL
from ui import work
from ui.loaders import summary, try_load
from ui.state import label_of, parent_of, selection, url_bound
from ui.text import md_escape

st.header("Subnetwork overlap")
base, tuned = selection()
if not base or len(tuned) < 2:
    st.info("Choose a base and at least two fine-tunes of it in the sidebar.")
    st.stop()

# the runs must share a base: the demo's RL runs come from its SFT model, not from its base
shared = [parent_of(t) for t in tuned]
common = max(set(shared) - {None}, key=shared.count, default=None)
default_base = common if common in [base, *tuned] and shared.count(common) >= 2 else base
c1, c2, c3 = st.columns([3, 2, 2])
url_bound("overlap_tol", PAPER_TOL, param="tol", parse=float, valid=lambda v: v in tolerance_grid())
tol = c1.select_slider("Tolerance τ", options=tolerance_grid(), format_func=lambda t: f"{t:g}", key="overlap_tol")
options = [base, *tuned]
run_base = c2.selectbox("Base of the runs", options, index=options.index(default_base), format_func=label_of,
                        help="The checkpoint every run was fine-tuned from.")
candidates = [t for t in tuned if t != run_base]
default_runs = [t for t in candidates if parent_of(t) == run_base] if common == run_base else candidates
runs = c3.multiselect("Runs", candidates, default=default_runs if len(default_runs) >= 2 else candidates,
                      format_func=label_of)
if len(runs) < 2:
    st.info("Pick at least two runs fine-tuned from the chosen base.")
    st.stop()
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
           f"τ = {tol:g}.")
st.markdown(
    "For runs *a*, *b* with changed sets I_a, I_b: **o1** = |I_a ∩ I_b| / |I_a|, **o2** = |I_a ∩ I_b| / |I_b|. "
    "*Random* is the paper's baseline (independent subnetworks of the same sizes: o1 = 1 − s_b); "
    "*matched* draws them within each (tensor, exponent of θ⁰) stratum — small weights have a small bf16 step, "
    "so any two runs tend to change the same small weights (arXiv 2505.11711 §5; docs/design.md §4).")
st.plotly_chart(plots.overlap_matrix(r["pairs"], labels), key="matrix")
pairs = pd.DataFrame([{**p, "a": labels[p["a"]], "b": labels[p["b"]]} for p in r["pairs"]])
st.dataframe(pairs[["a", "b", "sparsity_a", "sparsity_b", "o1", "o1_random", "o1_matched", "o2", "o2_random",
                    "o2_matched", "jaccard", "jaccard_random"]], hide_index=True)

left, right = st.columns(2)
names = [f"{labels[p['a']]} ∩ {labels[p['b']]}" for p in r["pairs"]]
if r["layers"]:
    i = left.selectbox("Pair", range(len(names)), format_func=lambda k: names[k])
    left.plotly_chart(plots.overlap_by_layer(r["layers"], i), key="by_layer")
right.plotly_chart(plots.consensus_bar(r["consensus"]), key="consensus")
right.caption(f"{r['total_params']:,} elements compared; k = 0 are unchanged by every run.")
st.download_button("Download JSON", json.dumps(r, indent=1), "overlap.json", "application/json")
