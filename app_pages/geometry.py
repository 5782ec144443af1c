"""Geometry: how each fine-tune moved the weight matrices — spectra, principal subspaces, and
whether the update lands on the principal weights or off them (arXiv 2511.08567)."""

import json

import pandas as pd
import streamlit as st

from ui import plots
from analysis.checkpoints import fingerprint
from analysis.sparsity.diff import tolerance_grid
from analysis.errors import SubnetscopeError
from analysis.sparsity.geometry import matrix_detail, parse_k
from analysis.specs.geometry import GeometryParams
from analysis.definitions import PAPER_TOL
from ui import tables, work
from ui.state import label_of, parent_of, selection, url_bound
from ui.text import md_escape, fmt_tau

st.header("Geometry of an update")
st.caption("Per block matrix, base W₀ against tuned W₁: how far the singular values moved (spectral drift), how "
           "far the top-k singular subspaces turned (principal angles), how much of ΔW lies in the base's top-k "
           "subspace against a random update (k²/mn), whether the changed elements are the principal weights "
           "(largest |U_kΣ_kV_kᵀ|) or the smallest weights, and WeightWatcher's heavy-tail exponent α. "
           "RL is reported to stay off the principals, SFT to write on them (arXiv 2511.08567).")
base, tuned = selection()
if not base or not tuned:
    st.info("Choose a base and at least one fine-tune in the sidebar.")
    st.stop()
c1, c2, c3 = st.columns([1, 2, 2])
url_bound("geometry_k", "1%", param="k")
url_bound("geometry_tol", PAPER_TOL, param="tol", parse=float, valid=lambda v: v in tolerance_grid())
k_text = c1.text_input("k", help="Size of the principal subspace: a count (8), a fraction of each matrix's "
                                       "rank (0.05) or a percentage (1%, the default).", key="geometry_k")
tol = c2.select_slider("Tolerance τ of the changed sets", options=tolerance_grid(), format_func=fmt_tau,
                       key="geometry_tol")
against = c3.radio("Compare each fine-tune with", ["its start checkpoint", "the sidebar base"], horizontal=True,
                   help="The demo's RL runs start from its SFT model: against their start, the update is the RL "
                        "update alone.", key="geometry_against")
try:
    k = parse_k(k_text)
except SubnetscopeError as e:
    st.error(f"k: {md_escape(e)}")
    st.stop()


@st.cache_data(show_spinner="Full spectra of the matrix…", max_entries=32)
def _detail(b: str, t: str, key: str, k, tol: float, fps: tuple) -> dict:
    return matrix_detail(b, t, key, k=k, tol=tol)


runs: dict[str, dict] = {}
pairs: dict[str, tuple[str, str]] = {}
for i, t in enumerate(tuned):
    start = parent_of(t) if against == "its start checkpoint" else None
    b = start or base
    if b == t:
        continue
    label = f"{label_of(t)} (from {label_of(b)})"
    try:
        d = work.analysis("geometry", GeometryParams(b, t, k=k_text or None, tol=tol), key=f"geometry_{i}",
                          label=f"geometry of {label}")
    except SubnetscopeError as e:
        st.error(md_escape(f"{label}: {e}"))
        continue
    if d is not None:
        runs[label] = d
        pairs[label] = (b, t)
if not runs:
    st.stop()
for label, d in runs.items():  # a matrix left out (NaN / inf, another shape …) is said, never dropped silently
    left_out = [x for x in d.get("skipped", []) if x.get("kind") and x.get("layer") is not None]
    if left_out:
        st.warning(f"{md_escape(label)}: {len(left_out)} block matri{'ces' if len(left_out) > 1 else 'x'} skipped, "
                   "left out of the heatmaps, the table and α — "
                   + "; ".join(md_escape(f"{x['name']}: {x['reason']}") for x in left_out[:5])
                   + (f"; and {len(left_out) - 5} more (see the JSON)" if len(left_out) > 5 else ""))
    if len(d.get("skipped", [])) > len(left_out):
        st.caption(f"{md_escape(label)}: {len(d['skipped']) - len(left_out)} other tensors not compared "
                   "(see the JSON).")

if not isinstance(k, int):  # a fraction of each matrix's rank: say where it rounds to a single direction
    ones = sorted({t["kind"] for d in runs.values() for t in d["tensors"] if t.get("k") == 1})
    if ones:
        st.warning(f"k = {md_escape(k_text or '1%')} of the rank is k = 1 for the {', '.join(ones)} matrices (their "
                   "rank is under 100 / the fraction): each top-k subspace is a single singular direction. Give a "
                   "count (e.g. 8) or a larger fraction for a subspace.")
url_bound("geometry_field", "spectral_drift", param="show", valid=lambda v: v in plots.GEOMETRY_FIELDS)
field = st.radio("Heatmap", list(plots.GEOMETRY_FIELDS), horizontal=True, key="geometry_field",
                 format_func=lambda f: plots.GEOMETRY_FIELDS[f][0].split(" (")[0].split(" ‖")[0])
items = list(runs.items())
for row in range(0, len(items), 2):  # two a row: a heatmap in a third of the page lost its plot area
    cols = st.columns(2)
    for i, (col, (label, d)) in enumerate(zip(cols, items[row:row + 2]), start=row):
        col.plotly_chart(plots.geometry_heatmap(d, field, title=label), key=f"heat_{i}")

st.subheader("On the principal weights, or off them?")
st.caption("Per kind, means over the layers. *o1*: the share of the changed elements that are among the same number "
           "of principal / smallest / random weights. *alignment*: share of ‖ΔW‖² inside the base's top-k "
           "singular subspaces, beside its value for a random update.")
rows = []
for label, d in runs.items():
    for r in d["kinds"]:
        rows.append({"run": label, "kind": r["kind"], "matrices": r["matrices"], "skipped": r.get("skipped", 0),
                     "principal o1": r["principal_o1"],
                     "smallest o1": r["smallest_o1"], "random o1": r["random_o1"], "alignment": r["alignment"],
                     "alignment random": r["alignment_random"], "spectral drift": r["spectral_drift"],
                     "angle U (°)": r["angle_u_mean"], "α base": r["alpha_base"], "α tuned": r["alpha_tuned"]})
tables.show(st, pd.DataFrame(rows))
st.plotly_chart(plots.geometry_alpha(runs), key="alpha")

st.subheader("One matrix")
c4, c5 = st.columns(2)
run = c4.selectbox("Run", list(runs), key="geometry_run")
names = [t["name"] for t in runs[run]["tensors"]]
key = c5.selectbox("Matrix", names, key="geometry_matrix")
b, t = pairs[run]
try:
    m = _detail(b, t, key, k, tol, (fingerprint(b), fingerprint(t)))
except SubnetscopeError as e:
    st.error(md_escape(str(e)))
    st.stop()
m1, m2, m3, m4 = st.columns(4)
m1.metric("k", m["k"])
m2.metric("spectral drift", "—" if m["spectral_drift"] is None else f"{m['spectral_drift']:.2e}")
m3.metric("largest angle U / V",
          "—" if m["angle_u_max"] is None else f"{m['angle_u_max']:.2f}° / {m['angle_v_max']:.2f}°")
m4.metric("alignment ÷ random", "—" if m["alignment"] is None else f"{m['alignment'] / m['alignment_random']:.2f}")
undefined = m.get("undefined") or {}
if undefined:  # one line per distinct reason, with the quantities it leaves undefined
    by_reason: dict[str, list[str]] = {}
    for f, why in undefined.items():
        by_reason.setdefault(why, []).append(f)
    st.caption("Undefined: " + "; ".join(md_escape(f"{', '.join(fs)} — {why}") for why, fs in by_reason.items()))
a, bcol = st.columns(2)
a.plotly_chart(plots.geometry_spectra(m["sigma_base"], m["sigma_tuned"], key), key="spectra")
if m["angles_u"] is not None:
    bcol.plotly_chart(plots.geometry_angles(m["angles_u"], m["angles_v"]), key="angles")
st.download_button("Download JSON", data=json.dumps(runs, indent=2), file_name="geometry.json",
                   mime="application/json")
