"""Behaviour: does the change matter? How the fine-tune moved the model's outputs (per-token KL against
its parent, the tokens that rose and fell) and which part of the update carries it (weight patching:
each layer, kind, rank, α or a selector's top-k applied alone, and the share of the tune's gain that
comes back); "Save this hybrid" writes a patched checkpoint into the family (docs/design.md §15)."""

import hashlib
import html

import pandas as pd
import streamlit as st

from analysis.definitions import PAPER_TOL
from analysis.errors import SubnetscopeError
from analysis.paths import subnetscope_home
from analysis.specs.behaviour import BehaviourParams
from analysis.specs.patch import PatchParams
from ui import plots, tables, work
from ui.state import add_tuned, formatter, label_of, parent_of, selection, url_bound
from ui.text import fmt_tau, md_escape

st.header("Behaviour")
st.caption("Whether a part of the update matters is measured on what the model does: the per-token "
           "KL(p_tune ‖ p_parent) over the whole vocabulary at every position of a prompt (RL's Razor, arXiv "
           "2509.04259: the KL on the task predicts forgetting where weight-change norms do not), and weight "
           "patching — the parent with only part of the update applied, θ⁰ + α·P(M ⊙ Δ) — scored by the share of "
           "the tune's gain it recovers: (m(patched) − m(parent)) / (m(tune) − m(parent)).")
base, tuned = selection()
candidates = [t for t in tuned if (parent_of(t) or base) not in (None, t)]
if not candidates:
    st.info("Choose a fine-tune (and its base) in the sidebar.")
    st.stop()
url_bound("beh_tune", candidates[0], param="tune", valid=lambda v: v in candidates)
tune = st.selectbox("Fine-tune", candidates, format_func=formatter(candidates), key="beh_tune")
parent = parent_of(tune) or base
st.caption(f"Compared with {'its parent' if parent_of(tune) else 'the sidebar base'} "
           f"**{md_escape(label_of(parent))}**.")


def _is_demo(ref: str) -> bool:
    from analysis.attribution.prompts import is_demo_tokenizer
    from analysis.checkpoints import open_checkpoint

    try:
        return is_demo_tokenizer(open_checkpoint(ref, local_only=True).path)
    except SubnetscopeError:
        return False


def _default_prompt(ref: str) -> str:
    from analysis.attribution.prompts import default_prompt
    from analysis.checkpoints import open_checkpoint

    try:
        return default_prompt(open_checkpoint(ref, local_only=True).path).prompt
    except SubnetscopeError:
        return "The capital of France is"


demo = _is_demo(parent)

# ---------------------------------------------------------------------------- how the outputs moved
st.subheader("How the outputs moved")
sources = (["the demo task's held-out problems"] if demo else []) + ["prompts typed here"]
url_bound("beh_source", sources[0], param="prompts", valid=lambda v: v in sources)
c1, c2 = st.columns([1, 2])
source = c1.radio("Prompts", sources, key="beh_source")
typed: list[str] = []
if source == "prompts typed here":
    text = c2.text_area("One prompt per line", _default_prompt(parent), height=100, key="beh_typed")
    typed = [line for line in text.splitlines() if line.strip()]
    if not typed:
        st.warning("Type at least one prompt.")
        st.stop()
try:
    kl_params = BehaviourParams(parent, tune, prompt=tuple(typed) or None,
                                prompts="demo" if not typed else None, top=10, device="cpu")
except SubnetscopeError as e:
    st.error(md_escape(e))
    st.stop()
try:
    res = work.analysis("behaviour", kl_params, key="beh_kl", label="the per-token KL")
except SubnetscopeError as e:
    st.error(md_escape(e))
    st.stop()


def _coloured(row: dict) -> str:
    """The prompt's tokens, each on a background as dark as its KL (the prompt's largest = darkest)."""
    top = max(row["kl"]) or 1.0
    spans = []
    for tok, kl in zip(row["tokens"], row["kl"]):
        a = kl / top
        text = html.escape(tok.replace("\n", "⏎").replace("Ġ", "·").replace("▁", "·"))
        spans.append(f'<span title="KL {kl:.3g} nats" style="background: rgba(214, 39, 40, {0.08 + 0.8 * a:.2f}); '
                     f'padding: 2px 3px; margin: 1px; border-radius: 3px; font-family: monospace">{text}</span>')
    return "".join(spans)


if res is not None:
    q = res["kl_quantiles"]
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Mean KL per token", f"{res['kl_mean']:.3g} nats",
              help="KL(p_tune ‖ p_parent) at every position of every prompt, averaged.")
    m2.metric("Median prompt", f"{q['median']:.3g} nats")
    m3.metric("Prompts", f"{len(res['prompts']):,}")
    m4.metric("Positions", f"{res['positions']:,}")
    left, right = st.columns(2)
    left.plotly_chart(plots.kl_distribution([r["kl_mean"] for r in res["prompts"]]), width="stretch")
    with right:
        order = sorted(range(len(res["prompts"])), key=lambda i: -res["prompts"][i]["kl_mean"])
        pick = st.selectbox("Prompt (largest mean KL first)", order,
                            format_func=lambda i: f"{res['prompts'][i]['prompt'][:60]!r} — mean KL "
                                                  f"{res['prompts'][i]['kl_mean']:.3g}", key="beh_prompt")
        row = res["prompts"][pick]
        st.markdown(_coloured(row), unsafe_allow_html=True)
        st.caption("Each token shaded by the KL of the next-token distribution after it (hover for the value).")
        moved = pd.DataFrame([{"direction": d, "position": m["position"], "token": m["token"],
                               "p parent": m["p_base"], "p tune": m["p_tuned"], "Δ log p": m["delta_logp"]}
                              for d in ("rose", "fell") for m in row[d][:5]])
        if len(moved):
            tables.show(st, moved, percent=("p parent", "p tune"))
    t1, t2 = st.columns(2)
    for where, key, title in ((t1, "rose", "Rose most often"), (t2, "fell", "Fell most often")):
        where.markdown(f"**{title}** (positions where the token moved most)")
        df = pd.DataFrame([{"token": t["token"], "positions": t["positions"], "mean Δ log p": t["mean_delta_logp"]}
                           for t in res[key]])
        if len(df):
            tables.show(where, df, counts=("positions",))

# ---------------------------------------------------------------------------- which part carries it
st.subheader("Which part of the update carries it")
if demo:
    evals = {"accuracy on the held-out problems": "demo", "KL to the tune on the held-out prompts": "kl:demo"}
else:
    folder = subnetscope_home() / "prompts"
    body = "\n".join(p.replace("\n", "\\n") for p in (typed or [_default_prompt(parent)])) + "\n"
    file = folder / f"{hashlib.sha256(body.encode()).hexdigest()[:12]}.txt"
    if not file.exists():
        from analysis.io import write_atomic

        try:
            write_atomic(file, body)
        except SubnetscopeError as e:
            st.error(md_escape(e))
            st.stop()
    evals = {"KL to the tune on these prompts": f"kl:{file}"}
AXES = {"layers": "each layer alone, and all but it", "kinds": "each module kind alone, and all but it",
        "cells": "each layer × kind alone", "rank": "the update at rank 1, 2, 4, … full",
        "alpha": "the update scaled by α from 0 to 2", "density": "a selector's top-k beside a random mask"}
c1, c2, c3 = st.columns(3)
url_bound("beh_eval", next(iter(evals)), param="eval", valid=lambda v: v in evals)
ev_label = c1.selectbox("Scored on", list(evals), key="beh_eval")
url_bound("beh_axis", "layers", param="sweep", valid=lambda v: v in AXES)
axis = c2.selectbox("Patch", list(AXES), format_func=AXES.get, key="beh_axis")
selector = None
if axis == "density":
    from analysis.importance.selectors import SELECTORS

    names = [n for n, e in SELECTORS.items() if e.granularities[0] == "element" and n not in ("random", "diff", "lrp")]
    url_bound("beh_selector", "magnitude", param="selector", valid=lambda v: v in names)
    selector = c3.selectbox("Selector", names, key="beh_selector")
try:
    sweep_params = PatchParams(parent, tune, eval=(evals[ev_label],), sweep=axis,
                               selector=(selector,) if selector else None)
    sweep = work.analysis("patch", sweep_params, key=f"beh_sweep_{axis}", label=f"the {axis} sweep")
except SubnetscopeError as e:
    st.error(md_escape(e))
    sweep = None
if sweep is not None:
    metric = next(iter(sweep["tuned_metrics"]))
    b, t = sweep["base_metrics"][metric], sweep["tuned_metrics"][metric]
    st.caption(f"{metric.replace('_', ' ')}: parent {b:.4g}, tune {t:.4g}; 100% = the tune's value, 0% = the "
               "parent's." + (" The tune did not move it: the recovered gain is undefined." if b == t else ""))
    rows = [r for r in sweep["rows"] if r["recovered"] is not None]
    if axis in ("layers", "kinds"):
        fig = plots.recovered_bars(rows, f"Recovered gain, {AXES[axis]}")
    elif axis == "cells":
        fig = plots.recovered_cells(rows)
    elif axis == "rank":
        fig = plots.recovered_curve(rows, "rank", "Recovered gain against the rank of the update", "rank k")
    elif axis == "alpha":
        fig = plots.recovered_curve(rows, "alpha", "Recovered gain against the scale α of the update", "α")
    else:
        fig = plots.recovered_curve(rows, "density", f"Recovered gain of {selector}'s top-k and a random mask",
                                    "density (share of the block matrices)")
    if rows:
        st.plotly_chart(fig, width="stretch")
    table = pd.DataFrame([{"patch": r["label"], "elements": r["selected"], "recovered": r["recovered"],
                           **{k.replace("_", " "): v for k, v in r["metrics"].items()}} for r in sweep["rows"]])
    with st.expander("Every row"):
        tables.show(st, table, percent=("recovered",), counts=("elements",))

# ---------------------------------------------------------------------------- save a hybrid
with st.expander("Save this hybrid"):
    st.caption("Writes the parent with part of the update applied as a checkpoint of its own (the tune's tensor "
               "names and dtypes, its config and tokenizer), a child of the parent in the family.")
    h1, h2, h3 = st.columns(3)
    subset = h1.text_input("Subset", "changed", key="beh_subset",
                           help="all, none, layers:0,2-3, kinds:attn or q,k,v,o,gate,up,down,mlp, heads:L.H, changed "
                                f"(at the paper's τ = {fmt_tau(PAPER_TOL)}), mask:FILE, selector:NAME:DENSITY")
    alpha = h2.number_input("α", value=1.0, step=0.25, key="beh_alpha")
    rank = int(h3.number_input("Rank (0 = full)", min_value=0, value=0, step=1, key="beh_rank"))
    recipe = f"{parent}|{tune}|{subset}|{alpha}|{rank}"  # the parent too: another pair never replaces this hybrid
    name = f"{label_of(tune).replace('/', '-')}-{hashlib.sha256(recipe.encode()).hexdigest()[:8]}"
    out = subnetscope_home() / "hybrids" / name
    try:
        hp = PatchParams(parent, tune, subset=subset, alpha=alpha, rank=rank or None, out=str(out))
    except SubnetscopeError as e:
        st.error(md_escape(e))
        hp = None
    if hp is not None:
        done = work.job("patch", hp, key="beh_save", label="Save this hybrid")
        if done is not None and done.get("out"):
            st.success(f"Saved {md_escape(name)}: {done['selected']:,} of {done['total']:,} elements from the tune.")
            if str(out) not in tuned:
                if st.button("Add it to the picker", key="beh_add"):
                    if add_tuned(str(out)):
                        st.rerun()
                    st.info("The picker holds three fine-tunes: remove one to add the hybrid (it is in the recent "
                            "list).")
