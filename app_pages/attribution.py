"""Attribution: which prompt tokens, layers and heads carry the relevance for a target continuation,
by captum's methods and transformer LRP, on one checkpoint or a base and its fine-tune side by side.

Small work (LRP, Input × Gradient and Saliency on any model here; every method on the demo) runs
inside the page, cached per (checkpoint, prompt, target, method, steps, device); IG with many steps
or ablation of a long prompt on a large model runs as a background ``attribute`` job with a progress
bar and cancel.
"""

import pandas as pd
import streamlit as st

from ui import plots
from analysis.attribution.options import CONSERVATION_FLAG
from analysis.attribution.methods import (COMPLETENESS_TARGET, DEFAULT_BUDGET, DEFAULT_STEPS, MAX_BUDGET, MAX_STEPS,
                                          METHODS, MIN_BUDGET, Attribution, compare, head_weight_change)
from analysis.errors import SubnetscopeError
from analysis.attribution.lrp import VARIANTS
from analysis.checkpoints.models import available_devices
from analysis.specs.attribute import AttributeParams
from analysis.definitions import PAPER_TOL
from ui import tables, work
from ui.state import chosen_refs, label_of, parent_of
from ui.text import md_escape, md_html, fmt_tau

st.header("Attribution")
st.caption("Relevance of each prompt token for the target continuation, and of each layer and head. "
           "captum explains log p(target); Input × Gradient and LRP explain the target logit. "
           "LRP is patented (Fraunhofer HHI) and free for research and personal use.")
refs = chosen_refs()



@st.cache_data(max_entries=32, show_spinner=False)
def _fitting_prompt(ref: str, fp: tuple):
    from analysis.attribution.prompts import default_prompt
    from analysis.checkpoints import open_checkpoint

    return default_prompt(open_checkpoint(ref, local_only=True).path)


def _default_prompt(ref: str):
    from analysis.attribution.prompts import FACTUAL, DefaultPrompt
    from analysis.checkpoints import fingerprint

    try:
        return _fitting_prompt(ref, fingerprint(ref))
    except SubnetscopeError:  # the checkpoint's own error is shown below, when it is opened
        return DefaultPrompt(*FACTUAL, "a factual completion")


c1, c2 = st.columns(2)
ref = c1.selectbox("Checkpoint", refs, format_func=label_of)
others = [None] + [r for r in refs if r != ref]
default_other = next((r for r in others if r and (parent_of(r) == ref or parent_of(ref) == r)), None)
other = c2.selectbox("Compare with (same prompt and target)", others, index=others.index(default_other),
                     format_func=lambda r: "—" if r is None else label_of(r))
c3, c4 = st.columns(2)
fits = _default_prompt(ref)  # one the model can answer: the demo task for a demo model, a chat turn for an instruct one
prompt = c3.text_area("Prompt", fits.prompt, height=80,
                      help=f"Default: {fits.why}. The tokenizer adds its special tokens (e.g. <bos>).")
target = c4.text_input("Target continuation", fits.target,
                       help="The continuation whose log-probability / logit is explained (teacher-forced).")
c5, c6, c7 = st.columns(3)
method = c5.selectbox("Method", list(METHODS), format_func=METHODS.get, index=list(METHODS).index("lrp-attn"))
adaptive = c6.checkbox("Adaptive IG steps", True, disabled=method != "ig", key="ig_auto",
                       help=f"Steps added where the path needs them until the completeness error is below "
                            f"{COMPLETENESS_TARGET:.0%}, within a budget; off: one Gauss-Legendre rule of N steps.")
if adaptive:
    budget = c6.number_input("IG step budget", MIN_BUDGET, MAX_BUDGET,
                             st.session_state.get("ig_budget", DEFAULT_BUDGET), step=256,
                             disabled=method != "ig", key="ig_budget_input")
    steps = "auto"
else:
    budget = DEFAULT_BUDGET
    steps = int(c6.number_input("IG steps", 1, MAX_STEPS, st.session_state.get("ig_steps", DEFAULT_STEPS), step=25,
                                disabled=method != "ig", key="ig_steps_input"))
devices = available_devices()
device = c7.selectbox("Device", devices, index=len(devices) - 1,
                      help="cuda when this machine has a GPU; every method runs on it, IG's steps batched.")

if not prompt or not target:
    st.info("Give a prompt and a target continuation.")
    st.stop()


try:  # inline when small (every method on the demo), else one job for both checkpoints
    params = AttributeParams(ref, prompt=prompt, target=target, method=method, steps=str(steps),
                             step_budget=str(int(budget) if steps == "auto" else DEFAULT_BUDGET), device=device,
                             compare=other)
    res = work.analysis("attribute", params, key="attr", label=f"{method} attribution")
    if res is None:
        st.stop()
    results = [res] + ([res["compare"]] if other else [])
except SubnetscopeError as e:
    st.error(md_escape(str(e)))
    st.stop()

fields = set(Attribution.__dataclass_fields__)
att = [Attribution(**{k: v for k, v in r.items() if k in fields}) for r in results]
labels = [label_of(ref)] + ([label_of(other)] if other else [])


def colored(tokens: list[str], scores: list[float]) -> str:
    """The prompt as coloured tokens: red carries positive relevance, blue negative."""
    m = max((abs(s) for s in scores), default=0.0) or 1.0
    spans = []
    for t, s in zip(tokens, scores):
        a = min(abs(s) / m, 1.0)
        rgb = "214,39,40" if s >= 0 else "31,119,180"
        text = md_html(t.replace("\n", "⏎")).replace(" ", "&nbsp;")
        spans.append(f'<span title="{s:+.4g}" style="background: rgba({rgb},{a:.2f}); padding: 2px 1px; '
                     f'border-radius: 3px; font-family: monospace">{text}</span>')
    return "".join(spans)


cols = st.columns(len(att))
for col, a, label in zip(cols, att, labels):
    with col:
        st.subheader(md_escape(label))
        st.markdown(colored(a.tokens, a.scores) + f' &nbsp;→ <b>{md_html(a.target)}</b>', unsafe_allow_html=True)
        m1, m2, m3 = st.columns(3)
        m1.metric("target logit", f"{a.target_logit:.4g}")
        m2.metric("log p(target)", f"{a.target_logprob:.4g}")
        m3.metric("time", f"{a.seconds:.2f} s", help=f"on {a.device}")
        if a.method == "ig":
            err = "undefined (f(x) = f(x′))" if a.completeness_error is None else f"{a.completeness_error:.3g}"
            rule = (f"{a.steps} steps, {a.steps_used} evaluated of a budget of {a.step_budget} "
                    f"({a.info.get('ig', {}).get('segments')} segments of the path)" if a.step_budget
                    else f"{a.steps} steps (one Gauss-Legendre rule)")
            st.caption(f"IG completeness error {err} — |Σ scores − (f(x) − f(x′))| / |f(x) − f(x′)| "
                       f"with {rule}; "
                       f"f(x) − f(x′) = {a.baseline_difference:.4g}; "
                       f"{'converged' if a.converged else 'not converged'} at {COMPLETENESS_TARGET:.0%}.")
            converged = a.converged if a.converged is not None else (a.completeness_error or 0) <= COMPLETENESS_TARGET
            if not converged and a.step_budget:
                score = a.info.get("ig", {}).get("score_error")
                st.warning(f"IG did not converge within its budget of {a.step_budget} steps: completeness error {err}, "
                           f"scores error {'unknown' if score is None else f'{score:.3g}'} (target "
                           f"{COMPLETENESS_TARGET:.0%}). The scores are not yet the integral; a larger budget "
                           "closes it.")
                more = min(4 * a.step_budget, MAX_BUDGET)
                if more > a.step_budget and st.button(f"Run with a budget of {more} steps", key=f"more_{label}"):
                    st.session_state["ig_budget"] = more
                    st.session_state.pop("ig_budget_input", None)
                    st.rerun()
            elif not converged:
                miss = "" if a.completeness_error is None else f" the scores miss {a.completeness_error:.0%} of the " \
                    "difference they should add up to."
                st.warning(f"IG's integral is not converged:{miss} More steps (or adaptive steps) close it.")
                more = min(4 * a.steps, MAX_STEPS)
                if more > a.steps and st.button(f"Run with {more} steps", key=f"more_{label}"):
                    st.session_state["ig_steps"] = more
                    st.session_state.pop("ig_steps_input", None)
                    st.rerun()
        if a.info.get("unknown"):
            st.warning("The prompt holds characters the tokenizer does not know ("
                       + md_escape(", ".join(repr(c) for c in a.info["unknown"]))
                       + "): they are read as its unknown token.")
        if a.conservation_error is not None and a.conservation_error > CONSERVATION_FLAG:
            st.warning(f"Conservation error {a.conservation_error:.1%} is above {CONSERVATION_FLAG:.0%}: the "
                       f"relevances sum to {a.relevance_sum:.4g}, not the target logit — read them as a ranking, not "
                       "as shares of the logit.")
        if a.conservation_error is not None:
            st.caption(f"Conservation error {a.conservation_error:.3g} — |Σ relevance − target logit| / |target logit| "
                       f"(Σ relevance {a.relevance_sum:.4g}). CP-LRP conserves on bias-free Llama-family models; "
                       "AttnLRP loses part of the logit through the softmax; Input × Gradient does not conserve.")

st.plotly_chart(plots.token_scores(att[0].tokens, {lb: a.scores for lb, a in zip(labels, att)},
                                   f"{METHODS[method]}: relevance per prompt token"), key="tokens")
diff = None
if len(att) == 2:
    try:
        diff = compare(att[0], att[1])
    except SubnetscopeError as e:
        st.warning(md_escape(str(e)))
if diff:
    st.plotly_chart(plots.token_scores(att[0].tokens, {f"{labels[1]} − {labels[0]}": diff["scores"]},
                                       "Difference map: fine-tune minus base, per token"), key="token_diff")

if att[0].layers is not None:
    st.subheader("Layers and heads")
    st.plotly_chart(plots.layer_relevance({lb: a.layers for lb, a in zip(labels, att)},
                                          "Relevance of the residual stream after each block"), key="layers")
    figs = [(plots.relevance_heatmap(a.heads, list(range(len(a.heads[0]) if a.heads else 0)), list(range(len(a.heads))),
                                     f"{lb}: relevance per head (o_proj input)", "head"), f"heads{i}")
            for i, (a, lb) in enumerate(zip(att, labels))]
    if diff and "heads" in diff:
        figs.append((plots.relevance_heatmap(diff["heads"], list(range(len(diff["heads"][0]))),
                                             list(range(len(diff["heads"]))), f"{labels[1]} − {labels[0]}", "head"),
                     "heads_diff"))
    for row in range(0, len(figs), 2):  # two a row: three heatmaps side by side lost half their plot area
        for col, (fig, key) in zip(st.columns(2), figs[row:row + 2]):
            col.plotly_chart(fig, key=key)
    a0 = att[0]
    st.plotly_chart(plots.relevance_heatmap(a0.layer_tokens, plots.token_label(a0.tokens),
                                            list(range(len(a0.layer_tokens))),
                                            f"{labels[0]}: relevance per layer and token", "prompt token"),
                    key="layer_tokens")
elif method not in ("lrp-cp", "lrp-attn", "ixg"):
    st.caption("Layer and head relevance come with Input × Gradient and the LRP methods.")

if diff and diff.get("heads_moved"):
    st.subheader("Heads whose relevance moved most, and how much of their weights changed")
    pair = (ref, other) if parent_of(other) == ref else (other, ref) if parent_of(ref) == other else (ref, other)
    try:
        change = {(r["layer"], r["head"]): r for r in head_weight_change(*pair)}
        ranks = {k: i + 1 for i, k in enumerate(change)}
    except SubnetscopeError as e:
        change, ranks = {}, {}
        st.caption(f"Weight change per head unavailable: {md_escape(e)}")
    rows = [{"layer": m["layer"], "head": m["head"], "Δ relevance": m["delta"],
             "weights changed": change.get((m["layer"], m["head"]), {}).get("fraction"),
             "rank by weight change": ranks.get((m["layer"], m["head"]))} for m in diff["heads_moved"]]
    tables.show(st, pd.DataFrame(rows))
    st.caption(f"Weights changed: the fraction of the head's q/k/v/o weights that differ between "
               f"{md_escape(label_of(pair[0]))} and {md_escape(label_of(pair[1]))} at τ = {fmt_tau(PAPER_TOL)} "
               "(as on the Update "
               "sparsity page; GQA: a kv head's k/v count for each query head it serves). Rank 1 is the head whose "
               "weights changed most.")

curves = {lb: a.faithfulness for lb, a in zip(labels, att) if a.faithfulness}
if curves:
    st.subheader("Faithfulness")
    abpc = st.columns(len(curves))
    for col, (lb, c) in zip(abpc, curves.items()):  # the number itself, not only in a legend
        col.metric(f"ABPC, {md_escape(lb)}", f"{c['abpc']:+.3g}",
                   help="Area between the perturbation curves: the mean over the steps of (most relevant "
                        "first − least relevant first), in the explained quantity's units.")
    st.plotly_chart(plots.faithfulness_curves(curves), key="faith")
    st.caption("Prompt tokens are replaced by the baseline token most relevant first and least relevant first; "
               "the area between the curves (ABPC) is larger when the method ranks tokens well. "
               f"LRP variants: {', '.join(VARIANTS.values())}.")
