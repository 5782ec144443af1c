"""Update sparsity: which parameters a fine-tune changed, where, and at which tolerance."""

import json

import pandas as pd
import streamlit as st

from ui import plots
from analysis.sparsity.diff import at_tolerance, tolerance_grid
from analysis.errors import SubnetscopeError
from analysis.definitions import PAPER_TOL
from ui import tables, work
from ui.loaders import summary, try_load
from ui.state import label_of, parent_of, selection, url_bound
from ui.text import md_escape, fmt_tau

st.header("Update sparsity")
base, tuned = selection()
if not base or not tuned:
    st.info("Choose a base and at least one fine-tune in the sidebar.")
    st.stop()

c1, c2, c3 = st.columns([3, 2, 1])
url_bound("sparsity_tol", PAPER_TOL, param="tol", parse=float, valid=lambda v: v in tolerance_grid())
tol = c1.select_slider("Tolerance τ", options=tolerance_grid(), key="sparsity_tol", format_func=fmt_tau,
                       help="Element i is unchanged iff its stored values are bit-identical or |θ¹ᵢ − θ⁰ᵢ| ≤ τ "
                            "(float32 difference). The paper (arXiv 2505.11711) uses "
                            f"{fmt_tau(PAPER_TOL)} on bf16 weights.")
url_bound("sparsity_focus", tuned[0], param="focus", valid=lambda v: v in tuned)
if st.session_state["sparsity_focus"] not in tuned:  # the sidebar's fine-tunes changed
    st.session_state["sparsity_focus"] = tuned[0]
focus = c2.selectbox("Details for", tuned, format_func=label_of, key="sparsity_focus")
rank = c3.checkbox("Update rank", help="rank(ΔW) / min(m, n) per matrix (torch.linalg.matrix_rank; costly).")

# each fine-tune is compared with its parent in the family (the sidebar: read from the files, or as the user
# corrected it — kept in the URL), the sidebar base when none is known
parents = {t: parent_of(t) or base for t in tuned}
unknown = [t for t in tuned if parent_of(t) is None and t != base]
if unknown:
    st.caption(md_escape(", ".join(label_of(t) for t in unknown)) + ": no parent in the files; compared with the "
               "sidebar base. Set a parent under the sidebar's family to change it.")
parents = {t: p for t, p in parents.items() if p != t}


def pair_label(t: str) -> str:
    return f"{label_of(parents[t])} → {label_of(t)}"


base_summary = try_load(summary, base)
if base_summary is None:
    st.stop()
# One pass answers every grid τ: the diff runs at the "pass τ" (the paper's until the user asks for details at
# another τ) and the slider re-aggregates its per-τ counts (tensors, layers, kinds, heads); only MLP
# channels and the absorption view (and --rank) need the weights again, on request.
pass_tol = st.session_state.setdefault("sparsity_pass_tol", PAPER_TOL)
results: dict[str, dict] = {}
for ref in parents:
    try:
        r = work.diff(parents[ref], ref, pass_tol, rank and ref == focus, key=f"diff_{ref}")
        if r is not None and tol != pass_tol:
            try:
                r = at_tolerance(r, tol)
            except ValueError:  # a result written before the per-τ counts existed: a pass at τ
                r = work.diff(parents[ref], ref, tol, rank and ref == focus, key=f"diff_{ref}_tol")
    except SubnetscopeError as e:
        st.error(md_escape(f"{label_of(ref)}: {e}"))
        continue
    if r is not None:
        results[ref] = r
if not results:
    st.stop()

cols = st.columns(len(results))
for col, (ref, r) in zip(cols, results.items()):
    col.metric(md_escape(pair_label(ref)), f"{r['update_sparsity']:.2%}",
               help="Update sparsity: the fraction of elements unchanged at τ (docs/design.md §3).")
    col.caption(f"changed at τ = {fmt_tau(tol)}: {r['changed_params']:,} of {r['total_params']:,} elements")
    exact = r.get("by_compare", {}).get("exact_bits", {})
    if exact.get("numel"):
        col.caption(f"of which compared by exact bits (integer / bool / packed tensors, τ does not apply): "
                    f"{exact['changed']:,} of {exact['numel']:,} elements in {exact['tensors']} tensors changed")

st.plotly_chart(plots.sparsity_sweep({pair_label(k): v["tolerance_sweep"] for k, v in results.items()}, tol),
                key="sweep")

if focus not in results:
    st.stop()
r = results[focus]
st.subheader(md_escape(pair_label(focus)))
detail = r.get("detail_tolerance", r["tolerance"])
if detail != tol:
    n1, n2 = st.columns([4, 1])
    n1.caption(f"Counts, layers, kinds, tensors and heads are at τ = {fmt_tau(tol)}. MLP channels and the absorption "
               f"view come from the pass at τ = {fmt_tau(detail)}; recomputing them reads the weights again.")
    if n2.button(f"Details at τ = {fmt_tau(tol)}", key="sparsity_details"):
        st.session_state["sparsity_pass_tol"] = tol
        st.rerun()
left, right = st.columns(2)
left.plotly_chart(plots.layer_kind_heatmap(r["layer_kinds"]), key="layer_kind")
components = [c for c in ("q", "k", "v", "o") if any(u["component"] == c for u in r["units"])]
if components:
    comp = right.radio("Heads of", components, horizontal=True, key="head_comp",
                       help="q/o: query heads; k/v: kv heads (GQA: each serves a group of query heads).")
    right.plotly_chart(plots.unit_heatmap(r["units"], comp, f"Update sparsity per head ({comp})"), key="heads")

left, right = st.columns(2)
left.plotly_chart(plots.delta_histogram(r["delta_histogram"]), key="hist")
right.plotly_chart(plots.absorption(r["absorption"], detail), key="absorption")
channels = [c for c in ("gate", "up", "down") if any(u["component"] == c for u in r["units"])]
if channels:
    ch = st.radio("MLP channels of", channels, horizontal=True, key="chan_comp")
    st.plotly_chart(plots.unit_heatmap(r["units"], ch, f"Update sparsity per MLP channel ({ch})"), key="channels")

layers = pd.DataFrame(r["layers"])
if not layers.empty:
    st.caption("Per layer: *update_sparsity* is weighted by element count; *update_sparsity_unweighted* is the "
               "mean over tensors, as the paper's script averages.")
    tables.show(st, layers)

tensors = pd.DataFrame(r["tensors"])
show = ["name", "update_sparsity", "changed", "numel", "delta_fro", "max_abs_delta", "rank", "rank_fraction", "kind",
        "layer", "shape", "dtype", "compare"]  # the numbers right after the name: visible without scrolling
show = [c for c in show if c in tensors]  # compare: "tolerance", or "exact_bits" for integer / bool tensors
t1, t2 = st.columns(2)
t1.caption("Most changed tensors")
tables.show(t1, tensors.sort_values("update_sparsity").head(10)[show])
t2.caption("Least changed tensors")
tables.show(t2, tensors.sort_values("update_sparsity", ascending=False).head(10)[show])
if r["skipped"]:
    st.warning(f"{len(r['skipped'])} tensors not compared: " + "; ".join(md_escape(f"{s['name']} ({s['reason']})")
                                                                      for s in r["skipped"][:10]))

if st.button("Train the changed subnetwork", icon=":material/model_training:",
             help=f"Open the masked fine-tune form: from {label_of(parents[focus])}, train only the elements "
                  f"{label_of(focus)} changed at τ = {fmt_tau(tol)} (the paper's experiment)."):
    st.session_state["ft_handoff"] = {
        "from": "Update sparsity", "checkpoint": parents[focus], "source": "diff", "diff": [parents[focus], focus],
        "diff_tol": tol, "summary": f"the elements {label_of(focus)} changed from {label_of(parents[focus])} at "
                                    f"τ = {fmt_tau(tol)}, trained from {label_of(parents[focus])}"}
    st.switch_page("app_pages/finetune.py")
d1, d2, d3 = st.columns(3)
stem = f"diff-{label_of(parents[focus])}-{label_of(focus)}-tol{fmt_tau(tol)}".replace("/", "_")
d1.download_button("Download JSON", json.dumps(r, indent=1), f"{stem}.json", "application/json")
d2.download_button("Download CSV (tensors)", tensors[show].to_csv(index=False), f"{stem}.csv", "text/csv")
if base_summary["total_params"] < work.inline_limit():
    d3.download_button("Download mask", work.mask_bytes(parents[focus], focus, tol), f"{stem}-mask.safetensors",
                       "application/octet-stream", help="Changed elements as a packed-bits mask file.")
else:
    d3.caption("Mask of a large model: "
               f"`python -m analysis diff BASE TUNED --tol {fmt_tau(tol)} --json OUT --mask-out M`")
