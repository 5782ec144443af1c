"""Compare run directories: metrics and curves, inside-mask counts, and how close each run's
weights end up to a reference run (the paper's §4: the subnetwork run was 94% identical to the
full fine-tune at the paper's τ)."""

from __future__ import annotations

import math
from pathlib import Path

from analysis.finetune.config import FinetuneConfig
from analysis.jobs import RunDir, RunError
from analysis.definitions import PAPER_TOL


def read_run(run_dir: str | Path) -> dict:
    """config, summary, the metric rows and the warnings of one run directory, every file checked
    (see :meth:`RunDir.read`).

    Raises:
        RunError: not a run directory, or a damaged file (one line naming it)."""
    return RunDir(run_dir).read(FinetuneConfig.from_dict)


def update_distance(start: str | Path, a: str | Path, b: str | Path, tol: float = PAPER_TOL) -> dict:
    """How close two runs from the same start ended up: the fraction of elements whose final
    values are unchanged at τ between the runs, and the cosine between their update vectors
    (θ_a − θ_start and θ_b − θ_start), in one streaming pass."""
    from analysis.checkpoints import align, iter_aligned, open_checkpoint
    from analysis.sparsity.diff import changed_mask

    cks = [open_checkpoint(p) for p in (start, a, b)]
    al = align(cks)
    n = same = 0
    dot = na = nb = 0.0
    for _, (s, x, y) in iter_aligned(al, cks):
        if not s.is_floating_point():
            continue
        same += int((~changed_mask(x, y, tol)).sum())
        n += s.numel()
        da, db = (x.double() - s.double()).reshape(-1), (y.double() - s.double()).reshape(-1)
        dot += float(da @ db)
        na += float(da @ da)
        nb += float(db @ db)
    cosine = dot / math.sqrt(na * nb) if na > 0 and nb > 0 else None
    return {"identical_fraction": same / n if n else None, "cosine": cosine, "elements": n, "tol": tol}


Z95 = 1.959963984540054  # two-sided 95% normal quantile


def mean_ci(values: list[float]) -> dict:
    """Mean and 95% normal-approximation confidence interval of per-problem values (a problem's
    sampled rewards are averaged first, so the interval accounts for the problems drawn, not
    only the samples)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "ci": None, "n": 0}
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = Z95 * sd / math.sqrt(n)
    return {"mean": m, "ci": [m - half, m + half], "n": n}


def read_eval(run_dir: str | Path) -> dict | None:
    """``eval.json`` of a finished demo-task run (per-problem accuracy and sampled reward), or None
    (see :meth:`RunDir.read_eval`)."""
    return RunDir(run_dir).read_eval()


def eval_intervals(ev: dict, ref: dict | None = None) -> dict:
    """Accuracy and sampled reward of a run with 95% intervals, and — against a reference run
    evaluated on the same problems — the paired per-problem gaps with theirs."""
    out = {}
    for key, name in (("per_problem_accuracy", "accuracy"), ("per_problem_reward", "reward_sampled")):
        if key not in ev:
            continue
        out[f"{name}_ci"] = mean_ci(ev[key])["ci"]
        out[name] = mean_ci(ev[key])["mean"]
        if ref is not None and key in ref and len(ref[key]) == len(ev[key]):
            gap = mean_ci([a - b for a, b in zip(ev[key], ref[key])])
            out[f"{name}_gap"], out[f"{name}_gap_ci"] = gap["mean"], gap["ci"]
    return out


def compare_runs(run_dirs: list[str | Path], *, reference: str | Path | None = None,
                 tol: float = PAPER_TOL) -> dict:
    """Metrics table, curves and, with a reference run, each run's distance to it; ``warnings``: the
    damaged metric lines skipped (a NaN loss of a diverged run is written as null).

    Raises:
        RunError: a run (or the reference) that is not a run directory or has a damaged file."""
    from analysis.finetune.run import finite

    runs = [read_run(r) for r in run_dirs]
    ref = read_run(reference) if reference is not None else None
    table = []
    for r in runs:
        s, final = r["summary"], r["summary"].get("final", {})
        row = {"run": r["run"], "mask_source": s.get("mask_source"), "status": s.get("status"),
               "steps": s.get("steps_done"), "trainable": s.get("trainable"), "loss": final.get("loss"),
               "accuracy": final.get("accuracy"), "perplexity": final.get("perplexity"),
               "outside_mask_changed": s.get("outside_mask_changed"),
               "wall_s": s.get("wall_s"), "peak_rss_bytes": s.get("peak_rss_bytes"),
               "optimizer_state_bytes": s.get("optimizer_state_bytes")}
        if ref is not None and Path(r["run"]).resolve() != Path(ref["run"]).resolve():
            if r["config"].get("checkpoint") != ref["config"].get("checkpoint"):
                raise RunError(f"{r['run']}: started from {r['config'].get('checkpoint')}, the reference from "
                               f"{ref['config'].get('checkpoint')}")
            dist = update_distance(r["config"]["checkpoint"], Path(r["run"]) / "model", Path(ref["run"]) / "model", tol)
            row.update({f"to_reference_{k}": v for k, v in dist.items() if k in ("identical_fraction", "cosine")})
            ref_acc = ref["summary"].get("final", {}).get("accuracy")
            if ref_acc is not None and row["accuracy"] is not None:
                row["accuracy_gap"] = row["accuracy"] - ref_acc
        ev = read_eval(r["run"])
        if ev is not None:
            ref_ev = (read_eval(ref["run"])
                      if ref is not None and Path(r["run"]).resolve() != Path(ref["run"]).resolve() else None)
            row.update(eval_intervals(ev, ref_ev))
        table.append(row)
    warnings = list(dict.fromkeys(w for r in [*runs, *([ref] if ref else [])] for w in r["warnings"]))
    everyone = runs + ([ref] if ref is not None and all(r["run"] != ref["run"] for r in runs) else [])
    return finite({"reference": str(reference) if reference is not None else None, "tol": tol, "runs": table,
                   "curves": {r["run"]: r["metrics"] for r in runs}, "warnings": warnings,
                   "verdicts": verdicts(everyone, {row["run"]: row for row in table})})


BUDGET_SLACK = 0.01  # two runs train "the same budget" when their trainable counts differ by at most 1%


def same_budget(a: dict, b: dict) -> bool:
    """Two runs (:func:`read_run` dicts) at equal budget: the same start, task, steps and batch size,
    and trainable element counts within :data:`BUDGET_SLACK` of each other."""
    ca, cb = a["config"], b["config"]
    if any(ca.get(k) != cb.get(k) for k in ("checkpoint", "task", "steps", "batch_size")):
        return False
    ta, tb = a["summary"].get("trainable"), b["summary"].get("trainable")
    return bool(ta and tb) and abs(ta - tb) <= BUDGET_SLACK * max(ta, tb)


def _words(ci: list[float] | None, what: str) -> str:
    if not ci:
        return "no paired evaluation to compare"
    if ci[0] > 0:
        return f"beat {what}"
    if ci[1] < 0:
        return f"did worse than {what}"
    return f"no detectable difference from {what} (the 95% interval contains 0)"


def verdicts(runs: list[dict], rows: dict[str, dict] | None = None) -> list[dict]:
    """The core loop's answer: for every masked run (a selector's, a diff's, mask files, ID3) and every
    random-mask run at the same budget (:func:`same_budget`), the paired per-problem accuracy gap
    masked − random on the held-out problems, its 95% interval and its sign in words; with ``rows``
    (compare_runs' table, against a full fine-tune) both runs' "identical to the reference" beside
    each other — the random one is the chance value of the masked one's."""
    rows = rows or {}
    randoms = [r for r in runs if r["config"].get("random") is not None]
    masked = [r for r in runs if r["config"].get("random") is None and not r["config"].get("full")
              and r["config"].get("lora") is None]
    out = []
    for m in masked:
        ev_m = read_eval(m["run"])
        for rnd in randoms:
            if not same_budget(m, rnd):
                continue
            ev_r = read_eval(rnd["run"])
            gap = None
            if ev_m and ev_r and len(ev_m.get("per_problem_accuracy", [])) == len(ev_r.get("per_problem_accuracy", [])):
                gap = mean_ci([a - b for a, b in zip(ev_m["per_problem_accuracy"], ev_r["per_problem_accuracy"])])
            out.append({"run": m["run"], "random": rnd["run"], "mask_source": m["summary"].get("mask_source"),
                        "trainable": m["summary"].get("trainable"), "random_trainable": rnd["summary"].get("trainable"),
                        "accuracy_gap": gap["mean"] if gap else None, "accuracy_gap_ci": gap["ci"] if gap else None,
                        "problems": gap["n"] if gap else 0,
                        "verdict": _words(gap["ci"] if gap else None, "the random mask"),
                        "identical_to_reference": rows.get(m["run"], {}).get("to_reference_identical_fraction"),
                        "random_identical_to_reference":
                            rows.get(rnd["run"], {}).get("to_reference_identical_fraction")})
    return out
