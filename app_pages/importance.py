"""Importance: which parameters matter by each selector, and which selector predicts a real update.

A model under the inline limit (``ui.work.inline_limit``) is scored inside the page (cached); a
larger one through the CLI as a background job (``importance``, ``evaluate-selectors``), started
on request, with progress and cancel — the page never runs long work in a rerun.
"""

import io
import json

import pandas as pd
import streamlit as st

from ui import plots
from analysis.attribution.prompts import is_demo_tokenizer
from analysis.checkpoints import fingerprint, open_checkpoint
from analysis.errors import SubnetscopeError
from analysis.importance.scores import calibration_length, sample_scores, scores_to_mask, summarize
from analysis.sparsity.masks import load_mask, per_tensor as mask_rows
from analysis.importance.selectors import SELECTORS
from analysis.specs.evaluate_selectors import EvaluateParams
from analysis.specs.importance import ImportanceParams
from analysis.specs.patch import PatchParams
from analysis.definitions import GRANULARITIES, PAPER_TOL
from ui import tables, work
from ui.state import chosen_refs, label_of, parent_of, selection, url_bound
from ui.text import md_escape, fmt_tau


@st.cache_data(max_entries=64, show_spinner=False)
def _seq_len(ref: str, fp: tuple) -> int:
    """Calibration tokens per sequence: 64, or the model's positions when fewer (the CLI's default)."""
    return calibration_length(open_checkpoint(ref, local_only=True).config, where=ref)


st.header("Importance")
refs = chosen_refs()
base, tuned = selection()
# the fine-tune whose update the scores should predict: by default one trained from another selected
# fine-tune (the demo's RL runs, from its SFT model), and the model scored is its parent
chained = [t for t in tuned if parent_of(t) in tuned]
default_target = (chained or tuned or [None])[0]
default_model = parent_of(default_target) if default_target and parent_of(default_target) in refs else refs[0]
c1, c2, c3 = st.columns(3)
ref = c1.selectbox("Model to score", refs, index=refs.index(default_model), format_func=label_of)
url_bound("imp_selector", "magnitude", param="selector", valid=lambda v: v in SELECTORS)
name = c2.selectbox("Selector", list(SELECTORS), format_func=lambda n: SELECTORS[n].label, key="imp_selector")
entry = SELECTORS[name]
c2.caption(f"{entry.description} — *{entry.paper}*. Cost: {entry.cost}.")
coarser = [g for g in GRANULARITIES
           if g in entry.granularities or entry.granularities[0] == "element"]
url_bound("imp_granularity", entry.granularities[0], param="granularity", valid=lambda v: v in coarser)
if st.session_state["imp_granularity"] not in coarser:  # another selector: its own default
    st.session_state["imp_granularity"] = entry.granularities[0]
granularity = c3.selectbox("Granularity", coarser, key="imp_granularity",
                           help="Element scores can be summed to rows, heads (GQA aware), channels or layers.")
c4, c5, c6, c7 = st.columns(4)
url_bound("imp_density", 0.05, param="density", parse=float, valid=lambda v: 0.001 <= v <= 1.0)
density = c4.number_input("Density (fraction selected)", 0.001, 1.0, step=0.01, format="%.3f", key="imp_density")
scope = c5.radio("Scope", ["blocks", "all"], horizontal=True,
                 help="blocks: the attention and MLP matrices of the transformer blocks; all: every parameter.")
data = c6.text_input("Calibration data", "demo", help="demo (the arithmetic task), or a .txt / .jsonl file path",
                     disabled=not entry.needs_data)
samples = c7.number_input("Samples", 4, 4096, 32, step=4, disabled=not entry.needs_data)
options = {}
if name == "diff":
    pair_tuned = tuned[0] if tuned else None
    if not pair_tuned:
        st.info("The diff selector needs a fine-tune in the sidebar.")
        st.stop()
    options = {"base": parent_of(pair_tuned) or base, "tuned": pair_tuned}

try:
    seq_len = _seq_len(ref, fingerprint(ref))
    params = ImportanceParams(ref, selector=name, granularity=granularity, data=data, samples=int(samples),
                              seq_len=seq_len, scope=scope, density=density,
                              option=tuple(f"{k}={v}" for k, v in sorted(options.items())) or None)
    inline = work.runs_inline("importance", params)
    if inline:
        scores = work.scores(ref, name, granularity, data, int(samples), seq_len, **options)
        summary = summarize(scores, scope=scope)
        mask = scores_to_mask(scores, density, scope=scope)
    else:  # a large model: the CLI scores it in the background and writes the mask into the job
        st.caption(f"{md_escape(label_of(ref))} has more than {work.inline_limit():,} parameters: it is scored as a "
                   "background job (`python -m analysis importance`).")
        job = work.importance_job(params, key="imp")
        if job is None:
            st.stop()
        scores, (summary, mask_path) = None, job
        mask = load_mask(mask_path)
except SubnetscopeError as e:
    st.error(md_escape(str(e)))
    st.stop()
scored_as = summary["granularity"]

st.subheader(f"{entry.label} on {md_escape(label_of(ref))} ({scored_as})")
left, right = st.columns(2)
if scored_as == "element":
    rows = [r for r in summary["layer_kinds"] if r["layer"] is not None]
    layers = sorted({r["layer"] for r in rows})
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    z = [[next((r["mean"] for r in rows if r["layer"] == L and r["kind"] == k), None) for k in kinds] for L in layers]
    left.plotly_chart(plots.score_heatmap(z, kinds, layers, "Mean score by layer and module kind", "module kind"),
                      key="imp_layer_kind")
    if summary["heads"]:
        heads = summary["heads"]["mean"]
        right.plotly_chart(plots.score_heatmap(heads, list(range(len(heads[0]))), list(range(len(heads))),
                                               "Mean score per attention head (q rows, o columns, shared kv)",
                                               "head"), key="imp_heads")
    if scores is not None:
        sample, total = sample_scores(scores, scope)
        shown = (f"all {total:,} elements in scope" if len(sample) == total else
                 f"a strided sample of {len(sample):,} of the {total:,} elements in scope")
        st.plotly_chart(plots.score_histogram(sample, f"Score distribution ({shown})"), key="imp_hist")
    else:
        st.caption("The score distribution is drawn for models scored inline; the job's JSON holds the statistics "
                   "by layer and module kind shown above.")
elif scored_as in ("head", "channel"):
    key = "heads" if scored_as == "head" else "channels"
    z = summary[key]
    left.plotly_chart(plots.score_heatmap(z, list(range(len(z[0]))), list(range(len(z))),
                                          f"Score per {scored_as}", scored_as), key="imp_units")
elif scored_as == "layer":
    left.bar_chart(pd.DataFrame({"score": summary["layers"]}))
else:  # row
    left.caption("Row scores: see the download.")

per_tensor = pd.DataFrame(mask_rows(mask), columns=["tensor", "selected", "numel", "fraction selected"])
selected = int(per_tensor["selected"].sum()) if len(per_tensor) else 0
right.metric("Selected elements", f"{selected:,}", help=f"density {density:g} of the {scope} scope")
right.caption("Where the top-k lands")
tables.show(right, per_tensor.sort_values("selected", ascending=False).head(15))


def _mask_file() -> bytes:
    import tempfile
    from pathlib import Path

    from analysis.sparsity.masks import save_mask

    with tempfile.TemporaryDirectory() as tmp:
        return save_mask(Path(tmp) / "m.safetensors", mask,
                         source=f"{name} {scored_as} density={density} scope={scope}").read_bytes()


st.session_state["last_selector"] = name  # the fine-tune form's selector defaults to the one last studied
d1, d2, d3 = st.columns(3)
d1.download_button("Download mask", _mask_file(), f"mask-{name}-{density:g}.safetensors", "application/octet-stream")
d2.download_button("Download scores summary (JSON)", json.dumps(summary), f"scores-{name}.json", "application/json")
if name != "diff" and d3.button("Train this mask", type="primary", icon=":material/model_training:",
                                help="Open the masked fine-tune form with this model, selector, granularity and "
                                     "density (the lab's masks cover the blocks' matrices)."):
    st.session_state["ft_handoff"] = {
        "from": "Importance", "checkpoint": ref, "source": "selector", "selector": name,
        "granularity": scored_as, "density": density,
        "summary": f"{entry.label}, {scored_as} granularity, density {density:g}, from {label_of(ref)}"
                   + (" (scope all on Importance; the lab's masks cover the blocks)" if scope == "all" else "")}
    st.switch_page("app_pages/finetune.py")

# ------------------------------------------------------------------ compare two selectors
st.subheader("Compare with another selector")
element_selectors = [n for n, e in SELECTORS.items() if e.granularities[0] == "element" and n != "diff"]
others = [n for n in element_selectors if n != name]
# by default one of another kind: a data-free selector beside one that reads calibration data (never magnitude
# beside its own inverse, which agrees at ρ = −1 by construction)
kind_default = next((n for n in (("magnitude", "wanda") if entry.needs_data else ("fisher", "wanda", "taylor"))
                     if n in others), others[0])
other = st.selectbox("Second selector", others, index=others.index(kind_default),
                     format_func=lambda n: SELECTORS[n].label, key=f"imp_other_{name}",
                     help="Defaults to a selector of the other kind (data-free vs calibration data).")
if scored_as == "element":
    try:
        res = work.analysis("evaluate-selectors", EvaluateParams(ref, selectors=f"{name},{other}", density=density,
                                                                 data=data, samples=int(samples), seq_len=seq_len,
                                                                 scope=scope), key="imp_cmp",
                            label="evaluate 2 selectors")
        rho, jac = (None, None) if res is None else (res["agreement"]["spearman"][0][1],
                                                     res["agreement"]["jaccard"][0][1])
        if rho is not None:
            cmp1, cmp2 = st.columns(2)
            cmp1.metric("Spearman ρ", f"{rho:+.3f}")
            cmp2.metric(f"Top-k Jaccard at density {density:g}", f"{jac:.3f}")
    except SubnetscopeError as e:
        st.error(md_escape(str(e)))
else:
    st.caption("Comparison works on element scores: choose the element granularity.")

# ------------------------------------------------------------------ does it predict the update?
st.subheader("Does it predict the update?")
if not tuned:
    st.info("Add a fine-tune in the sidebar to compare the scores with what it changed.")
    st.stop()
target = st.selectbox("Fine-tune", tuned, index=tuned.index(default_target), format_func=label_of,
                      key="imp_target")
parent = parent_of(target) or base
st.caption(f"Changed elements of {md_escape(label_of(parent))} → {md_escape(label_of(target))} at "
           f"τ = {fmt_tau(PAPER_TOL)} "
           f"(its parent in the family → the fine-tune), predicted from the scores of {md_escape(label_of(ref))}.")
chosen = st.multiselect("Selectors", [n for n in SELECTORS if n != "diff"],
                        default=["magnitude", "smallest_magnitude", "random", "wanda", "taylor", "fisher",
                                 "sensitivity"], format_func=lambda n: SELECTORS[n].label)
preds = {}
try:
    if not chosen:
        st.stop()
    # every selector and the diff in one evaluation (`evaluate-selectors --against-diff`): inline on a small
    # model, a background job on a large one
    res = work.analysis("evaluate-selectors", EvaluateParams(ref, selectors=",".join(chosen), density=density,
                                                             against_diff=(parent, target), data=data,
                                                             samples=int(samples), seq_len=seq_len, scope=scope),
                        key="imp_pred", label=f"evaluate {len(chosen)} selectors")
    preds = {} if res is None else {p["selector"]: p for p in res["prediction"]}
except SubnetscopeError as e:
    st.error(md_escape(str(e)))
    st.stop()
if preds and all(p["auroc"] is None for p in preds.values()):  # e.g. a fine-tune that changed nothing
    st.info(md_escape(f"{label_of(target)}: {next(iter(preds.values()))['note']}"))
elif preds:
    best = max(preds.values(), key=lambda p: p["auroc"] or 0)
    st.success(f"Best predictor of {md_escape(label_of(target))}'s changed elements: "
               f"**{SELECTORS[best['selector']].label}** "
               f"(AUROC {best['auroc']:.3f}, precision@k {best['precision_at_k']:.3f} against a chance of "
               f"{best['base_rate']:.3f}, k = {best['k']:,} changed of {best['n']:,}).")
    left, right = st.columns(2)
    left.plotly_chart(plots.selector_bars(list(preds.values())), key="imp_bars")
    right.plotly_chart(plots.roc_curves({SELECTORS[n].label: {**p["roc"], "auroc": p["auroc"]}
                                         for n, p in preds.items()}), key="imp_roc")
    table = pd.DataFrame([{k: v for k, v in p.items() if k != "roc"} for p in preds.values()])
    tables.show(st, table.sort_values("auroc", ascending=False))
    buf = io.StringIO()
    table.to_csv(buf, index=False)
    st.download_button("Download (CSV)", buf.getvalue(), "selector-prediction.csv", "text/csv")

# ------------------------------------------------------------------ does importance find what matters?
st.subheader("Does importance find what matters?")
st.caption(f"Predicting the update is correlation; this is the causal test. Each selector's top-k of "
           f"{md_escape(label_of(parent))} gets only its part of the update {md_escape(label_of(parent))} → "
           f"{md_escape(label_of(target))} (weight patching, Behaviour page), beside a random mask of the same "
           "density, and each layer is patched alone to see where the change lives.")
# the KL on the demo's held-out prompts for a model of the demo family, else the LM loss on the calibration data
matters_eval = "kl:demo" if is_demo_tokenizer(open_checkpoint(parent, local_only=True).path) else \
    f"lm:{data}"
matters = [n for n in chosen if SELECTORS[n].granularities[0] == "element" and n not in ("random", "diff", "lrp")] \
    or ["magnitude"]
try:
    # two background jobs (a button each): dozens of patched evaluations never run inside the page's rerun
    curve = work.job("patch", PatchParams(parent, target, eval=(matters_eval,), sweep="density",
                                          selector=tuple(matters), data=data, samples=int(samples)),
                     key="imp_matters_density", label="the selectors' top-k patches")
    by_layer = work.job("patch", PatchParams(parent, target, eval=(matters_eval,), sweep="layers",
                                             selector=tuple(matters), attribute=True, data=data,
                                             samples=int(samples)),
                        key="imp_matters_layers", label="the per-layer patches")
except SubnetscopeError as e:
    st.error(md_escape(str(e)))
    st.stop()
left, right = st.columns(2)
if curve is not None:
    rows = [r for r in curve["rows"] if r["recovered"] is not None]
    if rows:
        left.plotly_chart(plots.recovered_curve(rows, "density", "Recovered gain of each selector's top-k and random",
                                                "density (share of the block matrices)"), key="imp_matters_curve")
    else:
        left.info(f"{md_escape(label_of(target))} did not move the metric: no recovered gain to show.")
if by_layer is not None and by_layer.get("layer_agreement"):
    agreement = by_layer["layer_agreement"]
    right.plotly_chart(plots.estimated_vs_measured(agreement[0], [r for r in by_layer["attribution"]["by_layer"]
                                                                  if r["layer"] != "other"]), key="imp_matters_layers")
    a = by_layer["attribution"]
    if a["conservation_error"] is not None:
        right.caption(f"The estimate's parts sum to the measured difference within {a['conservation_error']:.1e} "
                      f"(relative; {a['nodes']} Gauss–Legendre nodes).")
    table = pd.DataFrame([{"selector": SELECTORS[r["selector"]].label if r["selector"] in SELECTORS else r["selector"],
                           "Spearman ρ with the measured per-layer effects": r["spearman"]} for r in agreement])
    tables.show(st, table)
