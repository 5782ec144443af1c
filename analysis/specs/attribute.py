"""``attribute``: relevance of a prompt's tokens, layers and heads for a target continuation, on one
checkpoint or, with ``--compare``, on two side by side (docs/design.md §7)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from analysis.attribution.options import COMPLETENESS_TARGET, DEFAULT_BUDGET, MAX_STEPS, METHODS
from analysis.errors import quoted
from analysis.specs.base import Spec
from analysis.specs.results import AttributeResult
from analysis.specs.common import DEVICE_HELP, parameters_of


def whole(option: str, s):
    """A whole-number option's value (None stays None), or an AttributionError naming the option."""
    from analysis.attribution.methods import AttributionError

    if s is None:
        return None
    try:
        return int(s)
    except ValueError:
        raise AttributionError(f"{option} {quoted(s)}: not a whole number") from None


def ig_steps(s):
    """``--steps``: ``auto`` (the adaptive rule) or a whole number (one Gauss-Legendre rule)."""
    return None if str(s).strip().lower() == "auto" else whole("--steps", str(s))


@dataclass(frozen=True)
class AttributeParams:
    checkpoint: str = field(metadata={"positional": True, "help": "the checkpoint to explain"})
    prompt: str = field(default=None, metadata={"required": True, "help": "the prompt"})
    target: str | None = field(default=None, metadata={
        "help": "the continuation to explain (default: the model's greedy continuation)"})
    method: str = field(default=None, metadata={
        "required": True, "metavar": "|".join(METHODS),
        "help": "ig, saliency, ixg (input x gradient), ablation, lrp-cp (CP-LRP), lrp-attn (AttnLRP)"})
    steps: str = field(default="auto", metadata={
        "help": f"IG steps: auto (default: segments of the path refined until the completeness error is below "
                f"{COMPLETENESS_TARGET:g}, within --step-budget) or 1 to {MAX_STEPS} (one Gauss-Legendre rule)"})
    step_budget: str = field(default=str(DEFAULT_BUDGET), metadata={
        "help": f"gradient evaluations the adaptive IG may spend (default {DEFAULT_BUDGET})"})
    batch: str | None = field(default=None, metadata={
        "help": "IG steps / ablations per forward (default: as many as fit 4,096 tokens on CPU, 16,384 on CUDA)"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    compare: str | None = field(default=None, metadata={
        "metavar": "CKPT2", "help": "the same prompt, target and method on a second checkpoint"})
    no_faithfulness: bool = field(default=False, metadata={"help": "skip the perturbation curves"})

    def __post_init__(self):
        from analysis.attribution.methods import AttributionError, check_ig_options

        for name in ("steps", "step_budget", "batch"):  # a page may give numbers
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                object.__setattr__(self, name, str(v))
        if self.method not in METHODS:  # checked here, not by argparse: one line, before any work
            raise AttributionError(f"--method {quoted(self.method)}: unknown; one of {', '.join(METHODS)}")
        check_ig_options(*self.numbers)

    @property
    def numbers(self) -> tuple:
        return ig_steps(self.steps), whole("--step-budget", self.step_budget), whole("--batch", self.batch)

    @property
    def refs(self) -> list[str]:
        return [self.checkpoint] + ([self.compare] if self.compare else [])


def run(p: AttributeParams, progress) -> dict:
    from analysis.attribution.methods import attribute, compare
    from analysis.checkpoints.models import load_model
    from analysis.jobs.progress import Progress

    steps, budget, batch = p.numbers
    if p.compare:  # a different architecture is refused from the headers, before either model runs
        from analysis.checkpoints import align, open_checkpoint

        align([open_checkpoint(r) for r in p.refs])
    enabled, file = (progress.enabled, progress.file) if isinstance(progress, Progress) else (False, None)
    results, target = [], p.target
    for i, ref in enumerate(p.refs):
        model, tokenizer = load_model(ref, device=p.device, masked_lm=True)
        prog = Progress(f"{p.method} {i + 1}/{len(p.refs)}", enabled, file)
        try:
            r = attribute(model, tokenizer, p.prompt, target, p.method, steps=steps, budget=budget, batch=batch,
                          with_faithfulness=not p.no_faithfulness, progress=prog)
        finally:
            prog.close()
        target = r.target  # the second checkpoint explains the same continuation
        results.append(r)
        del model
    out = {"schema": "subnetscope.attribute/1", "checkpoint": p.checkpoint, "prompt": p.prompt,
           **results[0].to_json()}
    if p.compare:
        out["compare"] = {"checkpoint": p.compare, **results[1].to_json(),
                          "difference": compare(results[0], results[1])}
    return out


def _print(label: str, r: dict) -> None:
    print(f"{label}: {r['method']} ({r['explains']}) of {r['target']!r}: logit {r['target_logit']:.4g}, "
          f"log p {r['target_logprob']:.4g}, {r['seconds']:.3f} s on {r['device']}")
    if r["method"] == "ig":
        err = "undefined (f(x) = f(x'))" if r["completeness_error"] is None else f"{r['completeness_error']:.3g}"
        rule = (f"{r['steps']} steps ({r['steps_used']} evaluated of a budget of {r['step_budget']})"
                if r["step_budget"] else f"{r['steps']} steps")
        print(f"  completeness error {err} (delta {r['convergence_delta']:.3g} of f(x) - f(x') = "
              f"{r['baseline_difference']:.4g}, {rule}; {'converged' if r['converged'] else 'NOT converged'} "
              f"at {r['completeness_target']:g})")
    if r.get("conservation_error") is not None:
        print(f"  conservation error {r['conservation_error']:.3g} (sum of relevance {r['relevance_sum']:.4g})")
    width = max(len(repr(t)) for t in r["tokens"])
    for t, s in zip(r["tokens"], r["scores"]):
        print(f"  {t!r:<{width}}  {s:+.4g}")
    if r.get("faithfulness"):
        print(f"  faithfulness: ABPC {r['faithfulness']['abpc']:+.4g}")


def warnings_of(label: str, r: dict) -> list[str]:
    """What a result's reader must know: IG not converged, prompt characters read as unk."""
    out = []
    if r["method"] == "ig" and not r["converged"]:
        err = "undefined" if r["completeness_error"] is None else f"{r['completeness_error']:.3g}"
        if r["step_budget"]:
            score = r["info"]["ig"]["score_error"]
            out.append(f"{label}: IG did not converge within its budget of {r['step_budget']} steps (completeness "
                       f"error {err}, scores error {'unknown' if score is None else f'{score:.3g}'}, target "
                       f"{r['completeness_target']:g}); raise --step-budget")
        else:
            out.append(f"{label}: IG with {r['steps']} steps is not converged (completeness error {err} > "
                       f"{r['completeness_target']:g}); use more --steps or --steps auto")
    if r["info"].get("unknown"):
        out.append(f"{label}: the prompt holds characters the tokenizer does not know "
                   f"({', '.join(map(quoted, r['info']['unknown']))}); they are read as its unknown token")
    return out


def report(p: AttributeParams, out: dict) -> None:
    results = [out] + ([out["compare"]] if p.compare else [])
    _print(p.checkpoint, results[0])
    if p.compare:
        _print(p.compare, results[1])
        moved = out["compare"]["difference"].get("heads_moved") or []
        if moved:
            print("  heads whose relevance moved most: " + ", ".join(
                f"L{m['layer']}.h{m['head']} {m['delta']:+.3g}" for m in moved[:5]))
    for ref, r in zip(p.refs, results):
        for w in warnings_of(ref, r):
            print(f"warning: {w}", file=sys.stderr)


PASSES_PER_LIMIT = 64  # a method may take 64 passes of a model at the inline limit and still run inline


def passes(p: AttributeParams) -> int:
    """Forward(+backward) passes the method costs at most: what decides inline against a job."""
    steps, budget, _ = p.numbers
    if p.method == "ig":
        return budget if steps is None else steps
    return len(p.prompt.split()) + 5 if p.method == "ablation" else 1


SPEC = Spec("attribute", "relevance of prompt tokens, layers and heads for a target continuation", AttributeParams,
            run, report, refs=lambda p: p.refs,
            cost=lambda p: max(parameters_of(r) for r in p.refs) * passes(p) // PASSES_PER_LIMIT, loads_model=True,
            result=AttributeResult)
