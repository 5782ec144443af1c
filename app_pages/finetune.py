"""Masked fine-tune: train only a subnetwork, next to full fine-tuning, a random mask and LoRA.

Runs are queued and trained one at a time by a background worker (analysis/jobs/queue.py);
they live on disk, so they survive a reload or an app restart, and runs started from the CLI show
up here too. The curves update while runs train.
"""

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from ui import plots, tables
from analysis.errors import SubnetscopeError
from analysis.jobs import queue
from analysis.finetune.compare import compare_runs, read_run
from analysis.finetune.config import (BUDGETS, COMBINE, DEMO_RL_RECIPE, GRANULARITIES, LORA_LR_FACTOR, OPTIMIZERS,
                                      TASKS, FinetuneConfig, eval_every_for)
from analysis.finetune.experiments import matched_random, paper_experiment
from analysis.importance.selectors import SELECTORS
from analysis.definitions import DECADE_TOLS, PAPER_TOL
from ui.state import chosen_refs, demo_refs, label_of, mirror_to_url, parent_of
from ui.text import md_escape, fmt_tau

HELP = FinetuneConfig.help()
DEFAULTS = FinetuneConfig.defaults()  # the form's defaults are the CLI's: one declaration
SOURCE_LABELS = {"diff": "Diff mask (what a fine-tune changed)", "selector": "Importance selector",
                 "random": "Random mask", "full": "Full fine-tune", "lora": "LoRA",
                 "mask": "Mask file(s)", "id3": "ID3 incremental unmasking"}

st.header("Masked fine-tune")
st.caption("Train only a subnetwork — the elements an RL run changed, the top of a selector, whole heads, a random "
           "mask — and compare it with full fine-tuning and LoRA at the same budget (arXiv 2505.11711 §4; "
           "docs/design.md §8). Only masked elements can change: every run checks it.")

refs = chosen_refs(None)
demo = demo_refs()
ss = st.session_state
# a hand-off from another page ("Train this mask" on Importance, "Train the changed subnetwork" on Update
# sparsity) fills the form in: its widgets are keyed by the hand-off's number, so they start from it
handoff = ss.pop("ft_handoff", None)
if handoff is not None:
    ss["ft_form"] = {"n": ss.get("ft_form", {}).get("n", 0) + 1, **handoff}
form = ss.get("ft_form", {"n": 0})
for r in [form.get("checkpoint"), *(form.get("diff") or [])]:  # a hand-off's checkpoints are offered too
    if r and r not in refs:
        refs = [*refs, r]
n = form["n"]
if handoff is not None:
    st.info("Filled in from " + md_escape(handoff.get("from", "another page")) + ": " +
            md_escape(handoff.get("summary", "")) + ". Check the recipe and add it to the queue.")


with st.expander("New run", expanded=True):
    if not refs:
        st.info("Choose a checkpoint in the sidebar.")
    else:
        c1, c2, c3 = st.columns(3)
        default = (form.get("checkpoint") if form.get("checkpoint") in refs else
                   demo.get("demo/sft") if demo.get("demo/sft") in refs else refs[0])
        checkpoint = c1.selectbox("Start from", refs, index=refs.index(default), format_func=label_of,
                                  help=HELP["checkpoint"], key=f"ft_start_{n}")
        task = c2.selectbox("Task", TASKS, index=1 if checkpoint == demo.get("demo/sft") else 0, help=HELP["task"])
        data = c3.text_input("Data file", "", help=HELP["data"], disabled=task != "lm", placeholder="a .txt or .jsonl")
        sources = list(SOURCE_LABELS)
        source = st.radio("Train", sources, format_func=SOURCE_LABELS.get, horizontal=True, key=f"ft_source_{n}",
                          index=sources.index(form.get("source", "diff")))
        src: dict = {}
        s1, s2, s3, s4 = st.columns(4)
        if source == "diff":
            pairs = [t for t in refs if t != checkpoint]
            handed = (form.get("diff") or [None, None])[1]
            default_tuned = handed if handed in pairs else next((t for t in pairs if parent_of(t) == checkpoint),
                                                                pairs[0] if pairs else None)
            tuned_ref = s1.selectbox("Changed by", pairs, index=pairs.index(default_tuned) if default_tuned else None,
                                     format_func=label_of, help="The fine-tune whose changed elements form the mask.",
                                     key=f"ft_diff_tuned_{n}")
            diff_base = s2.selectbox("…relative to", refs, index=refs.index(parent_of(tuned_ref) or checkpoint)
                                     if tuned_ref and (parent_of(tuned_ref) or checkpoint) in refs else 0,
                                     format_func=label_of, key=f"ft_diff_base_{n}")
            taus = sorted({*(t for t in DECADE_TOLS if t == 0 or t >= 1e-7),
                           *([form["diff_tol"]] if isinstance(form.get("diff_tol"), float) else [])})
            tol = s3.select_slider("τ", taus, value=form.get("diff_tol") if form.get("diff_tol") in taus
                                   else DEFAULTS["diff_tol"], help=HELP["diff_tol"], format_func=fmt_tau,
                                   key=f"ft_tol_{n}")
            src = {"diff": [diff_base, tuned_ref] if tuned_ref else None, "diff_tol": tol}
        elif source == "selector":
            names = [n for n in SELECTORS if n != "diff"]
            # the selector last studied on Importance (or handed over), else Fisher
            last = form.get("selector") or ss.get("last_selector")
            sel = s1.selectbox("Selector", names, index=names.index(last if last in names else "fisher"),
                               format_func=lambda x: SELECTORS[x].label, key=f"ft_sel_{n}")
            gran = s2.selectbox("Granularity", GRANULARITIES, help=HELP["granularity"], key=f"ft_gran_{n}",
                                index=GRANULARITIES.index(form["granularity"])
                                if form.get("granularity") in GRANULARITIES else 0)
            dens = s3.number_input("Density", 0.001, 1.0, float(form.get("density", 0.05)), format="%.3f",
                                   help=HELP["density"], key=f"ft_dens_{n}")
            budget = s4.selectbox("Budget", ["auto", *BUDGETS], help=HELP["budget"])
            src = {"selector": sel, "granularity": gran, "density": dens,
                   "budget": None if budget == "auto" else budget}
        elif source == "random":
            src = {"random": s1.number_input("Density", 0.001, 1.0, 0.05, format="%.3f", help=HELP["random"])}
        elif source == "lora":
            src = {"lora": int(s1.number_input("Rank r", 1, 256, 8, help=HELP["lora"]))}
        elif source == "full":
            src = {"full": True}
        elif source == "mask":
            files = s1.text_area("Mask files (one path a line)", help=HELP["mask"])
            combine = s2.selectbox("Combine", [*COMBINE, "consensus:2"], index=COMBINE.index(DEFAULTS["mask_combine"]),
                                   help=HELP["mask_combine"])
            src = {"mask": [f.strip() for f in files.splitlines() if f.strip()] or None, "mask_combine": combine}
        else:
            src = {"id3": s1.number_input("Final density", 0.001, 1.0, 0.05, format="%.3f", help=HELP["id3"]),
                   "id3_exp": s2.number_input("exp", 0.0, 4.0, DEFAULTS["id3_exp"], help=HELP["id3_exp"])}
        o1, o2, o3, o4, o5, o6 = st.columns(6)
        d = {**DEFAULTS, **(DEMO_RL_RECIPE if task == "demo-rl" else {})}  # demo-rl: the demo's own RL recipe
        steps = int(o1.number_input("Steps", 1, 100_000, d["steps"], help=HELP["steps"]))
        # each control its own recipe: LoRA at its usual tenfold learning rate (the widget is keyed by the source,
        # so switching to LoRA and back gives each its default)
        lr_default = d["lr"] * (LORA_LR_FACTOR if source == "lora" else 1)
        lr = o2.number_input("Learning rate", 1e-7, 1.0, lr_default, format="%.0e", key=f"ft_lr_{n}_{source}_{task}",
                             help=HELP["lr"] + (f" LoRA: {LORA_LR_FACTOR}× the recipe's, its usual rate."
                                                if source == "lora" else ""))
        batch = int(o3.number_input("Batch size", 1, 4096, d["batch_size"], help=HELP["batch_size"]))
        seed = int(o4.number_input("Seed", 0, 2**31 - 1, d["seed"], help=HELP["seed"]))
        # often enough to draw a curve: about ten evaluations over the run (and the start, step 0)
        eval_every = int(o5.number_input("Evaluate every", 1, 100_000, eval_every_for(steps), key=f"ft_eval_{steps}",
                                         help=HELP["eval_every"] + " Default: about ten evaluations per run."))
        optimizer = o6.selectbox("Optimizer", OPTIMIZERS, index=OPTIMIZERS.index(d["optimizer"]),
                                 help=HELP["optimizer"], disabled=source in ("full", "lora", "id3"))
        optimizer = "sparse" if source in ("full", "lora", "id3") else optimizer
        lisa = st.toggle("LISA layer sampling", help=HELP["schedule"], disabled=source in ("lora", "id3"))
        lisa = lisa and source not in ("lora", "id3")  # a disabled toggle keeps its value
        sched = {}
        if lisa:
            l1, l2 = st.columns(2)
            sched = {"schedule": "lisa",
                     "lisa_layers": int(l1.number_input("Blocks at a time", 1, 256, d["lisa_layers"],
                                                        help=HELP["lisa_layers"])),
                     "lisa_interval": int(l2.number_input("Resample every", 1, 10_000, d["lisa_interval"],
                                                          help=HELP["lisa_interval"]))}
        def _config():
            return FinetuneConfig(checkpoint=checkpoint, task=task, data=data or None, steps=steps, lr=lr,
                                  batch_size=batch, seed=seed, eval_every=eval_every, optimizer=optimizer,
                                  **sched, **src)

        try:
            suggested = queue.default_title(_config(), demo)
        except SubnetscopeError:
            suggested = "run"
        title = st.text_input("Name", "", placeholder=suggested, key="ft_title",
                              help="How the run is listed; empty: the mask source, start checkpoint and time.")
        b1, b2 = st.columns([1, 3])
        if b1.button("Add to queue", type="primary", icon=":material/playlist_add:"):
            try:
                cfg = _config()
                d = queue.enqueue(cfg, title=title.strip() or queue.default_title(cfg, demo))
                queue.ensure_worker()
                st.toast(f"Queued: {md_escape(queue.title_of(d))}")
            except SubnetscopeError as e:
                st.error(md_escape(str(e)))
        if "demo/sft" in demo and "demo/rl-seed1" in demo and b2.button(
                "Queue the paper's experiment on the demo", icon=":material/science:",
                help=f"From demo/sft, the demo's RL training ({DEMO_RL_RECIPE['steps']} steps, "
                     f"lr {DEMO_RL_RECIPE['lr']:g}, "
                     f"{DEMO_RL_RECIPE['batch_size']} prompts × 8 samples, seed {DEMO_RL_RECIPE['seed']}) "
                     "four ways: the SFT → rl-seed1 diff mask, a random mask of the same density, full, and "
                     f"LoRA r=4 (lr {DEMO_RL_RECIPE['lr'] * LORA_LR_FACTOR:g}, its own tenfold rate)."):
            try:
                for cfg in paper_experiment(demo["demo/sft"], demo["demo/rl-seed1"]):
                    queue.enqueue(cfg, title=queue.default_title(cfg, demo))
                queue.ensure_worker()
                st.toast("Queued four runs")
            except SubnetscopeError as e:
                st.error(md_escape(str(e)))


def _short(text: str | None) -> str | None:
    """A mask source with the demo's paths as their labels (demo/sft rather than the full path)."""
    for label, path in demo.items():
        text = text.replace(path, label) if text else text
    return text


def _run_names(dirs: list[Path]) -> dict[Path, str]:
    """Each run's display name: the title it was queued under (a run from the CLI: its directory's
    name), with the directory's name added where two titles are the same."""
    titles = {d: queue.title_of(d) for d in dirs}
    counts = {t: list(titles.values()).count(t) for t in titles.values()}
    return {d: t if counts[t] == 1 else f"{t} ({d.parent.name}/{d.name})" for d, t in titles.items()}


def _load(d: Path) -> tuple[dict | None, str | None]:
    """A run's files, each checked (see ``RunDir.read``), and the one line the page shows about
    them: a damaged config or summary (the run is left out), or the damaged metric lines skipped."""
    try:
        r = read_run(d)
    except SubnetscopeError as e:
        return None, str(e)
    return r, "; ".join(r["warnings"]) or None


def _table(runs: dict[str, dict]) -> pd.DataFrame:
    rows = []
    for name, r in runs.items():
        s, m, cfg = r["summary"], r["metrics"], r["config"]
        final = s.get("final") or (m[-1] if m else {})
        metric = "perplexity" if cfg.get("task") == "lm" else "accuracy"
        evals = [x[metric] for x in m if x.get(metric) is not None]
        step_s = sorted(x["step_s"] for x in m if "step_s" in x)
        rows.append({"run": name, f"final {metric}": evals[-1] if evals else None,
                     f"start {metric}": (s.get("initial") or {}).get(metric),
                     "steps": f"{m[-1]['step'] if m else 0}/{cfg.get('steps')}",
                     "trainable": (final or {}).get("trainable", s.get("trainable")),
                     "outside mask": s.get("outside_mask_changed"),
                     "step time (s)": step_s[len(step_s) // 2] if step_s else None,
                     "peak memory (MB)": s["peak_rss_bytes"] / 2**20 if s.get("peak_rss_bytes") else None,
                     "status": r["status"], "task": cfg.get("task"), "mask source": _short(s.get("mask_source")),
                     "error": s.get("error", "")})
    return pd.DataFrame(rows)  # the numbers first, newest run first (the caller's order)


active_any = any(queue.status(d) in queue.ACTIVE for d in queue.list_runs())
if queue.index_problem():
    st.warning(md_escape(queue.index_problem()))
if queue.queued():
    queue.ensure_worker()  # e.g. after an app restart with runs still waiting


@st.fragment(run_every=2.0 if active_any else None)
def live():
    dirs = queue.list_runs()
    if not dirs:
        st.info("No runs yet. Add one above; runs started with `python -m analysis finetune … --out DIR` show up "
                "here too.")
        return
    runs, problems = {}, []
    names = _run_names(dirs)
    for d in reversed(dirs):  # newest first
        r, problem = _load(d)
        if problem:
            problems.append((r is None, problem))
        if r is not None:
            r["status"] = queue.status(d)
            runs[names[d]] = r | {"dir": d}
    if any(r["status"] in queue.ACTIVE for r in runs.values()) != active_any:
        st.rerun()  # start or stop the live refresh
    st.subheader("Runs")
    for left_out, problem in problems:  # a damaged run file: named, the rest of the page keeps working
        if left_out:
            st.error(f"{md_escape(problem)}; the run is not listed")
        else:
            st.warning(md_escape(problem))
    if not runs:
        return
    f1, f2, f3 = st.columns(3)
    statuses = sorted({r["status"] for r in runs.values()})
    tasks = sorted({str(r["config"].get("task")) for r in runs.values()})
    starts = sorted({str(r["config"].get("checkpoint")) for r in runs.values()})
    want_status = f1.multiselect("Status", statuses, key="ft_f_status", placeholder="any status")
    want_task = f2.multiselect("Task", tasks, key="ft_f_task", placeholder="any task")
    want_start = f3.multiselect("Start checkpoint", starts, key="ft_f_start", format_func=label_of,
                                placeholder="any start")
    shown = {n: r for n, r in runs.items()
             if (not want_status or r["status"] in want_status)
             and (not want_task or str(r["config"].get("task")) in want_task)
             and (not want_start or str(r["config"].get("checkpoint")) in want_start)}
    tables.show(st, _table(shown), width="stretch")
    finished = [n for n, r in shown.items() if r["status"] not in queue.ACTIVE]
    if finished:
        d1, d2 = st.columns([4, 1])
        doomed = d1.selectbox("Delete a finished run", finished, index=None, key="ft_delete",
                              placeholder="choose a run to move to the trash",
                              help="The run's folder moves to $SUBNETSCOPE_HOME/trash: nothing is lost.")
        if d2.button("Move to trash", icon=":material/delete:", disabled=doomed is None, key="ft_delete_go"):
            try:
                where = queue.trash(runs[doomed]["dir"])
                st.toast(f"Moved {md_escape(doomed)} to {md_escape(where)}")
                st.rerun()
            except SubnetscopeError as e:
                st.error(md_escape(str(e)))
    for name, r in runs.items():
        if r["status"] not in queue.ACTIVE:
            continue
        c1, c2 = st.columns([5, 1])
        done = r["metrics"][-1]["step"] if r["metrics"] else 0
        total = r["config"].get("steps") or 1
        c1.progress(done / total, text=f"{md_escape(name)}: {r['status']}, step {done} of {total}")
        if c2.button("Cancel", key=f"cancel_{r['dir'].name}", icon=":material/stop:"):
            queue.cancel(r["dir"])
            st.toast(f"Cancelling {md_escape(name)}")
    names = list(runs)  # newest first
    # the overlay starts from the latest runs of the current comparison (started from a checkpoint
    # chosen in the sidebar), at most four; new runs join as they appear, removed ones stay removed
    seen = st.session_state.get("ft_seen")
    pick = [n for n in st.session_state.get("ft_pick", []) if n in names]
    if seen is None or "ft_pick" not in st.session_state:
        linked = [n for n in st.query_params.get_all("runs") if n in names]  # a reload or a shared link
        current = [n for n in names if runs[n]["config"].get("checkpoint") in refs] or names
        st.session_state["ft_pick"] = linked or current[:4]
    else:
        new = [n for n in names if n not in seen]
        if new:
            st.session_state["ft_pick"] = (new + pick)[:4]
    st.session_state["ft_seen"] = names
    chosen = st.multiselect("Overlay", names, key="ft_pick")
    mirror_to_url({"runs": list(chosen)})
    # every curve starts at step 0 with the start checkpoint's metric (measured before the first step)
    curves = {n: ([{"step": 0, **runs[n]["summary"]["initial"]}] if runs[n]["summary"].get("initial") else [])
              + runs[n]["metrics"] for n in chosen}
    left, right = st.columns(2)
    smooth = left.slider("Smoothing (steps)", 1, 25, 5, key="ft_smooth")
    left.plotly_chart(plots.training_curves(curves, "loss", "Training loss", smooth=smooth), key="ft_loss")
    metrics = [m for m in ("accuracy", "reward", "eval_loss", "perplexity")
               if any(m in row for rows in curves.values() for row in rows)]
    if metrics:
        metric = right.selectbox("Metric", metrics, key="ft_metric")
        right.plotly_chart(plots.training_curves(curves, metric, metric, smooth=smooth if metric == "reward" else 1),
                           key="ft_metric_chart")


live()

# ---------------------------------------------------------------- inside-mask and distance to full
st.subheader("Against a reference run")
finished = [d for d in queue.list_runs() if queue.status(d) in ("finished", "cancelled") and (d / "model").is_dir()]
if len(finished) < 2:  # (re-checked below once unreadable runs are dropped)
    st.caption("When two runs from the same checkpoint have finished, compare them here: elements changed "
               "outside each mask (must be 0), the fraction of elements identical to the reference at τ, the "
               "cosine of the two updates, and the metric gaps with 95% intervals.")
    st.stop()
run_names = _run_names(finished)
loaded = {run_names[d]: (d, _load(d)[0]) for d in reversed(finished)}  # newest first (problems: said above)
by_name = {n: d for n, (d, r) in loaded.items() if r is not None}
configs = {n: loaded[n][1]["config"] for n in by_name}
if len(by_name) < 2:
    st.stop()
fulls = [n for n, c in configs.items() if c.get("full")]
c1, c2, c3 = st.columns([2, 3, 1])
# keyed widgets whose state is set here, never re-defaulted: a default given again on every rerun (or a
# selection kept from before the runs finished) left "Runs" empty while eligible runs were listed
ss = st.session_state
if ss.get("ft_cmp_ref") not in by_name:
    ss["ft_cmp_ref"] = fulls[0] if fulls else next(iter(by_name))
ref = c1.selectbox("Reference", list(by_name), key="ft_cmp_ref",
                   help="Usually the full fine-tune of the same task (the paper compares with it).")
same = [n for n in by_name if n != ref and configs[n].get("checkpoint") == configs[ref].get("checkpoint")]
kept = [n for n in ss.get("ft_cmp_runs", []) if n in same]
new_runs = [n for n in same if n not in ss.get("ft_cmp_same", same)]  # finished since (e.g. a queued control)
ss["ft_cmp_runs"] = kept + new_runs if kept else same[:4]
ss["ft_cmp_same"] = same
others = c2.multiselect("Runs", same, key="ft_cmp_runs")
tol = c3.select_slider("τ", [t for t in DECADE_TOLS if t == 0 or 1e-7 <= t <= 1e-4], value=PAPER_TOL,
                      key="ft_cmp_tol")
if not others:
    st.info("No other finished run starts from the reference's checkpoint.")
    st.stop()


@st.cache_data(show_spinner="Comparing runs…", max_entries=16)
def _compare(dirs: tuple[str, ...], reference: str, tol: float, stamp: tuple) -> dict:
    return compare_runs(list(dirs), reference=reference, tol=tol)


dirs = tuple(str(by_name[n]) for n in [ref, *others])
stamp = tuple((Path(d) / "summary.json").stat().st_mtime for d in dirs)
try:
    cmp = _compare(dirs, str(by_name[ref]), tol, stamp)
except SubnetscopeError as e:
    st.error(md_escape(str(e)))
    st.stop()
def _fmt_ci(ci) -> str:
    return "" if not ci else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


rows, intervals = [], []
name_of = {str(d): n for n, d in by_name.items()}
for r in cmp["runs"]:
    name = name_of.get(r["run"], Path(r["run"]).name)
    rows.append({"run": name + (" (reference)" if r["run"] == str(by_name[ref]) else ""),
                 f"identical to reference at τ={fmt_tau(tol)}": r.get("to_reference_identical_fraction"),
                 "update cosine": r.get("to_reference_cosine"),
                 "accuracy": r.get("accuracy"), "accuracy gap (95%)": _fmt_ci(r.get("accuracy_gap_ci")),
                 "sampled reward": r.get("reward_sampled"),
                 "reward gap (95%)": _fmt_ci(r.get("reward_sampled_gap_ci")),
                 "perplexity": r.get("perplexity"), "outside mask": r["outside_mask_changed"],
                 "trainable": r["trainable"], "mask source": _short(r["mask_source"])})  # the numbers first
    intervals.append({"label": name, **{k: r.get(k) for k in ("reward_sampled_gap", "reward_sampled_gap_ci",
                                                               "accuracy_gap", "accuracy_gap_ci")}})
tables.show(st, pd.DataFrame(rows).dropna(axis=1, how="all"), width="stretch")
bad = [x["run"] for x in rows if x["outside mask"]]
if bad:
    st.error(f"Elements changed outside the mask in {md_escape(', '.join(bad))} — this must never happen; "
             "please report it.")
else:
    st.success("Every masked run changed only elements inside its mask.")
# the verdict of the core loop: each masked run against a random mask at the same budget, paired per problem
shown_runs = {r["run"] for r in cmp["runs"]}
verdicts = [v for v in cmp.get("verdicts", []) if v["run"] in shown_runs and v["random"] in shown_runs]
masked_shown = [r for r in cmp["runs"]
                if r["mask_source"] and not str(r["mask_source"]).startswith(("random", "full", "lora"))]
for v in verdicts:
    who, rnd = name_of.get(v["run"], Path(v["run"]).name), name_of.get(v["random"], Path(v["random"]).name)
    ci = v["accuracy_gap_ci"]
    text = (f"**{md_escape(who)}** {md_escape(v['verdict'])} **{md_escape(rnd)}** at the same budget "
            f"({v['trainable']:,} vs {v['random_trainable']:,} trainable elements)")
    if ci is not None:
        text += (f": accuracy gap {v['accuracy_gap']:+.2%}, 95% interval [{ci[0]:+.2%}, {ci[1]:+.2%}] over "
                 f"{v['problems']:,} held-out problems (paired)")
    if v["identical_to_reference"] is not None and v["random_identical_to_reference"] is not None:
        text += (f". Identical to the reference at τ = {fmt_tau(tol)}: {v['identical_to_reference']:.2%}, against "
                 f"{v['random_identical_to_reference']:.2%} for the random mask of the same density (chance)")
    (st.success if v["verdict"].startswith("beat") else st.warning if v["verdict"].startswith("did worse")
     else st.info)(text + ".")
for r in masked_shown:  # a masked run without its control: one click queues it (same recipe, same budget)
    if any(v["run"] == r["run"] for v in verdicts):
        continue
    who = name_of.get(r["run"], Path(r["run"]).name)
    v1, v2 = st.columns([3, 1])
    v1.info(f"No verdict yet for **{md_escape(who)}**: it needs a random mask at the same budget (same start, "
            f"task, steps, batch size and {r['trainable']:,} trainable elements) in the comparison.")
    if v2.button("Queue its random control", key=f"ft_matched_{Path(r['run']).name}", icon=":material/casino:"):
        try:
            cfg = matched_random(configs[who], r["trainable"])
            queue.enqueue(cfg, title=f"random control of {who}")
            queue.ensure_worker()
            st.toast(f"Queued: random density {cfg.random:g}, the budget of {md_escape(who)}")
        except SubnetscopeError as e:
            st.error(md_escape(str(e)))
st.caption("Identical: elements whose final values agree with the reference's within τ (the paper: 94% for the "
           "subnetwork run against full fine-tuning). Gaps are paired per held-out problem, run − reference, with "
           "95% normal intervals; the sampled reward averages each problem's samples first.")
i1, i2 = st, st  # full width, one under the other: run names on the y axis left half a column too little plot
if any(x.get("reward_sampled_gap_ci") for x in intervals):
    i1.plotly_chart(plots.interval_bars(intervals, "reward_sampled_gap", "Sampled reward − reference (paired, 95%)"),
                    key="ft_ci_r")
if any(x.get("accuracy_gap_ci") for x in intervals):
    i2.plotly_chart(plots.interval_bars(intervals, "accuracy_gap", "Greedy accuracy − reference (paired, 95%)"),
                    key="ft_ci_a")
st.download_button("Download comparison JSON", json.dumps(cmp, indent=1), "compare-runs.json", "application/json")
