"""``patch``: apply part of a fine-tune's update — θ = θ⁰ + α·P(M ⊙ Δ) on a subset, θ⁰ elsewhere — and
measure how much of the tune's behaviour comes back, for one patch or a sweep of them; ``--out``
writes the hybrid as a checkpoint (docs/design.md §15)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from analysis.definitions import PAPER_TOL
from analysis.specs.base import Spec
from analysis.specs.common import DEVICE_HELP, parameters_of, tolerance
from analysis.specs.results import PatchResult

SWEEPS = ("layers", "kinds", "cells", "heads", "rank", "alpha", "density")


@dataclass(frozen=True)
class PatchParams:
    base: str = field(metadata={"positional": True, "help": "θ⁰: the checkpoint fine-tuned from"})
    tuned: str = field(metadata={"positional": True, "help": "θ¹: the fine-tune"})
    subset: str = field(default="all", metadata={
        "metavar": "SPEC", "help": "all, none, layers:0,2-3, kinds:q,k,v,o,gate,up,down,attn,mlp, heads:L.H,..., "
                                   "changed (at --tol), mask:FILE, selector:NAME:DENSITY (default all)"})
    alpha: float = field(default=1.0, metadata={"metavar": "A", "help": "scale of the update (default 1)"})
    rank: int | None = field(default=None, metadata={
        "metavar": "K", "help": "each 2-D block matrix's update at its best rank K (1-D tensors keep theirs)"})
    tol: float = field(default=PAPER_TOL, metadata={"type": tolerance,
                                                    "help": f"τ of the changed subset (default {PAPER_TOL:g})"})
    out: str | None = field(default=None, metadata={
        "metavar": "DIR", "help": "write the patched checkpoint here (a Hugging Face directory; never an input)"})
    eval: tuple[str, ...] | None = field(default=None, metadata={
        "action": "append", "metavar": "E", "pair": True,
        "help": "demo (held-out accuracy), reward (the demo's sampled reward), kl:FILE (mean KL to the tune and "
                "the base on prompts), lm:FILE (loss, perplexity); repeat for more; the first's metric is the "
                "recovered gain's"})
    sweep: str | None = field(default=None, metadata={"choices": SWEEPS, "help": "a row per patch along this axis"})
    selector: tuple[str, ...] | None = field(default=None, metadata={
        "action": "append", "metavar": "NAME", "pair": True,
        "help": "selectors of --sweep density (default magnitude; a random mask is always beside them)"})
    attribute: bool = field(default=False, metadata={
        "help": "also estimate each part's share by integrated gradients in weight space along θ⁰ → θ¹ (needs a "
                "first --eval kl:FILE or lm:FILE); with --sweep layers, beside the measured per-layer effects"})
    data: str = field(default="demo", metadata={"help": "calibration data of selectors that need it (default demo)"})
    samples: int = field(default=32, metadata={"help": "calibration sequences (default 32)"})
    device: str = field(default="cpu", metadata={"help": DEVICE_HELP})
    seed: int = field(default=0, metadata={"help": "seed of random masks"})

    def __post_init__(self):
        from analysis.behaviour.evals import parse_eval
        from analysis.behaviour.patch import PatchError, check_alpha, check_rank, parse_subset

        for name in ("eval", "selector"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        parse_subset(self.subset)
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        check_rank(self.rank)
        kinds = [parse_eval(e).what for e in self.eval or ()]
        for k in set(kinds):
            if kinds.count(k) > 1:
                raise PatchError(f"--eval {k}: given {kinds.count(k)} times; each kind of evaluation once (their "
                                 "metrics share names)")
        if self.sweep and not self.eval:
            raise PatchError(f"--sweep {self.sweep} needs an --eval to score each row")
        if self.attribute and not (self.eval and parse_eval(self.eval[0]).what in ("kl", "lm")):
            raise PatchError("--attribute needs a differentiable first --eval: kl:FILE or lm:FILE")
        if self.sweep and self.out:
            raise PatchError("--out writes one patched checkpoint; a --sweep writes none")
        if self.samples < 1:
            raise PatchError(f"--samples must be at least 1, got {self.samples}")
        from analysis.importance.selectors import SELECTORS

        usable = [n for n, e in SELECTORS.items() if e.granularities[0] == "element" and n != "diff"]
        for s in self.selector or ():
            if s not in usable:
                raise PatchError(f"--selector {s!r}: a sweep needs a selector of element scores; one of "
                                 f"{', '.join(usable)}")

    @property
    def files(self) -> list[str]:
        """The data files it reads (no output may be one of them)."""
        from analysis.behaviour.evals import parse_eval
        from analysis.behaviour.patch import parse_subset

        out = []
        s = parse_subset(self.subset)
        if s.path:
            out.append(s.path)
        for e in self.eval or ():
            p = parse_eval(e).path
            if p and p != "demo":
                out.append(p)
        return out


def _calibration(p: PatchParams, tokenizer, who: list[str]):
    from analysis.behaviour.patch import PatchError
    from analysis.importance.calibration import CalibrationError, calibration_batches
    from analysis.importance.selectors import get_selector

    if not any(get_selector(w).needs_data for w in who):
        return None
    try:
        return calibration_batches(p.data, tokenizer, samples=p.samples, seq_len=64, batch_size=8, seed=p.seed)
    except CalibrationError as e:
        raise PatchError(f"{', '.join(who)}: calibration data --data {p.data}: {e}") from None


def run(p: PatchParams, progress) -> dict:
    from analysis.behaviour.evals import Evaluator, parse_eval
    from analysis.behaviour.patch import (Pair, Patcher, is_patch_dir, parse_subset, select, selected_count,
                                          write_patched)
    from analysis.behaviour.sweeps import density_masks, rows_of, run_rows

    t0 = time.perf_counter()
    if p.out:
        from analysis.io import check_output_dir
        from analysis.specs.common import inputs_of

        inputs = inputs_of([p.base, p.tuned])
        for f in p.files:
            inputs.add(f)
        check_output_dir(p.out, inputs, ours=is_patch_dir)
    subset = parse_subset(p.subset)
    pair = Pair.open(p.base, p.tuned)
    specs = [parse_eval(e) for e in p.eval or ()]
    model = tokenizer = patcher = evaluator = None
    if specs or subset.needs_model or p.sweep:
        import torch

        from analysis.checkpoints.models import load_model, resolve_device

        # on a GPU, bf16 weights when the tune stores bf16 (each patched tensor is computed in its stored dtype,
        # so nothing is rounded twice); float32 otherwise and on the CPU
        stored = {t.dtype for t in pair.tuned.tensors.values()}
        bf16 = resolve_device(p.device).type == "cuda" and stored == {"bfloat16"} and not p.attribute
        model, tokenizer = load_model(p.base, device=p.device, dtype=torch.bfloat16 if bf16 else torch.float32)
        patcher = Patcher(model, pair)
    batches = _calibration(p, tokenizer, [subset.selector]) if subset.needs_model else None
    sel = select(pair, subset, tol=p.tol, model=model, batches=batches)
    out: dict = {"schema": "subnetscope.patch/1", "base": p.base, "tuned": p.tuned, "subset": p.subset,
                 "alpha": p.alpha, "rank": p.rank, "tolerance": p.tol, "selected": selected_count(pair, sel),
                 "total": sum(math.prod(s) for s in pair.shapes.values()), "evaluations": list(p.eval or ()),
                 "tuned_metrics": {}, "base_metrics": {}, "patched_metrics": None, "recovered": None,
                 "recovered_by_metric": None, "sweep": p.sweep, "rows": [], "out": None,
                 "not_in_model": patcher.not_in_model if patcher else []}
    if specs:
        evaluator = Evaluator(patcher, tokenizer, specs)
        out["tuned_metrics"], out["base_metrics"] = evaluator.references()
    if p.attribute:
        from analysis.behaviour.weight_ig import weight_ig

        out["attribution"] = weight_ig(patcher, evaluator, progress=progress)
    if p.sweep:
        masks = None
        if p.sweep == "density":
            names = list(p.selector or ("magnitude",))
            masks = density_masks(pair, model, names, _calibration(p, tokenizer, names), seed=p.seed)
        rows = rows_of(p.sweep, pair, sel, masks=masks)
        out["rows"] = run_rows(patcher, evaluator, rows, progress=progress)
        if p.sweep == "layers" and (p.selector or p.attribute):
            from analysis.behaviour.sweeps import layer_agreement

            names = list(p.selector or ())
            measured = {r["layer"]: r["recovered"] for r in out["rows"] if r["group"] == "alone"}
            est = {r["layer"]: r["share"] for r in out["attribution"]["by_layer"] if r["layer"] != "other"} \
                if p.attribute else None
            out["layer_agreement"] = layer_agreement(model, names, _calibration(p, tokenizer, names) if names else None,
                                                     measured, estimated=est, seed=p.seed)
    elif specs:
        patcher.apply(sel, alpha=p.alpha, rank=p.rank)
        metrics = evaluator.score()
        patcher.undo()
        rec = evaluator.recovered(metrics)
        out.update(patched_metrics=metrics, recovered=rec.get(evaluator.primary), recovered_by_metric=rec, **metrics)
    if p.out:
        recipe = {"subset": p.subset, "alpha": p.alpha, "rank": p.rank, "tolerance": p.tol}
        out["out"] = write_patched(pair, sel, p.out, alpha=p.alpha, rank=p.rank, recipe=recipe,
                                   progress=None if p.sweep else progress)
    out["seconds"] = time.perf_counter() - t0
    return out


def _fmt(x) -> str:
    return "undefined" if x is None else f"{x + 0.0:.4g}"  # + 0.0: no "-0"


def report(p: PatchParams, d: dict) -> None:
    print(f"{d['tuned']} on {d['base']}: subset {d['subset']} ({d['selected']:,} of {d['total']:,} elements), "
          f"α {d['alpha']:g}" + (f", rank {d['rank']}" if d["rank"] else ""))
    for k, v in d["tuned_metrics"].items():
        print(f"  {k}: base {_fmt(d['base_metrics'].get(k))}, tune {_fmt(v)}"
              + (f", patched {_fmt(d['patched_metrics'].get(k))} (recovered {_fmt(d['recovered_by_metric'].get(k))})"
                 if d["patched_metrics"] else ""))
    for r in d["rows"]:
        print(f"  {r['label']:<24} {r['selected']:>12,}  recovered {_fmt(r['recovered'])}  "
              + "  ".join(f"{k} {_fmt(v)}" for k, v in r["metrics"].items()))
    a = d.get("attribution")
    if a:
        print(f"  weight IG of {a['metric']}: parts sum to {a['total']:.4g} of the measured {a['measured']:.4g} "
              f"(conservation error {_fmt(a['conservation_error'])}, {a['nodes']} Gauss–Legendre nodes)")
        print("  by layer: " + ", ".join(f"{r['layer']}: {_fmt(r['share'])}" for r in a["by_layer"]))
        print("  by kind: " + ", ".join(f"{r['kind']}: {_fmt(r['share'])}" for r in a["by_kind"]))
    for r in d.get("layer_agreement", []):
        print(f"  {r['selector']} per-layer scores vs the measured per-layer effects: Spearman {_fmt(r['spearman'])}")
    if d["out"]:
        print(f"wrote {d['out']['path']} ({d['out']['tensors']} tensors)")


def _cost(p: PatchParams) -> int:
    """Parameters passed through: one forward per row and evaluation (a layers sweep of a 30-layer model
    has 60 rows; density 7 per selector and random); weight IG about 8 forward-and-backward passes."""
    selectors = len(p.selector or ("magnitude",))
    rows = {None: 3, "layers": 60, "kinds": 20, "cells": 200, "heads": 300, "rank": 12, "alpha": 11,
            "density": 7 * (selectors + 1) + 2}
    passes = rows.get(p.sweep, 10) * len(p.eval or ()) + (24 if p.attribute else 0) + \
        (selectors if p.sweep in ("layers", "density") and p.selector else 0)
    return parameters_of(p.base) * max(1, passes)


SPEC = Spec("patch", "apply part of TUNED's update to BASE and measure how much of its behaviour comes back",
            PatchParams, run, report, refs=lambda p: [p.base, p.tuned], cost=_cost, data=lambda p: p.files,
            loads_model=True, result=PatchResult)  # data: the files it reads, besides p.data (a dataset name)
