"""``attribute``: relevance of a prompt's tokens, layers and heads for a target continuation, on one
checkpoint or, with ``--compare``, on two side by side."""

from __future__ import annotations

import sys

from analysis.cli.common import add_run_args, check_outputs, inputs_of, quiet_transformers
from analysis.errors import quoted
from analysis.jobs.progress import Progress


def whole(option: str, s):
    """A whole-number option's value (None stays None), or an AttributionError naming the option."""
    from analysis.attribution.methods import AttributionError

    if s is None:
        return None
    try:
        return int(s)
    except ValueError:
        raise AttributionError(f"{option} {quoted(s)}: not a whole number") from None


def ig_steps(s: str):
    """``--steps``: ``auto`` (the adaptive rule) or a whole number (one Gauss-Legendre rule)."""
    return None if s.strip().lower() == "auto" else whole("--steps", s)


def _print(label: str, r) -> None:
    print(f"{label}: {r.method} ({r.explains}) of {r.target!r}: logit {r.target_logit:.4g}, "
          f"log p {r.target_logprob:.4g}, {r.seconds:.3f} s on {r.device}")
    if r.method == "ig":
        err = "undefined (f(x) = f(x'))" if r.completeness_error is None else f"{r.completeness_error:.3g}"
        rule = (f"{r.steps} steps ({r.steps_used} evaluated of a budget of {r.step_budget})" if r.step_budget
                else f"{r.steps} steps")
        print(f"  completeness error {err} (delta {r.convergence_delta:.3g} of f(x) - f(x') = "
              f"{r.baseline_difference:.4g}, {rule}; {'converged' if r.converged else 'NOT converged'} "
              f"at {r.completeness_target:g})")
    if r.conservation_error is not None:
        print(f"  conservation error {r.conservation_error:.3g} (sum of relevance {r.relevance_sum:.4g})")
    width = max(len(repr(t)) for t in r.tokens)
    for t, s in zip(r.tokens, r.scores):
        print(f"  {t!r:<{width}}  {s:+.4g}")
    if r.faithfulness:
        print(f"  faithfulness: ABPC {r.faithfulness['abpc']:+.4g}")


def warnings_of(label: str, r) -> list[str]:
    """What a result's reader must know: IG not converged, prompt characters read as unk."""
    out = []
    if r.method == "ig" and not r.converged:
        err = "undefined" if r.completeness_error is None else f"{r.completeness_error:.3g}"
        if r.step_budget:
            score = r.info["ig"]["score_error"]
            out.append(f"{label}: IG did not converge within its budget of {r.step_budget} steps (completeness "
                       f"error {err}, scores error {'unknown' if score is None else f'{score:.3g}'}, target "
                       f"{r.completeness_target:g}); raise --step-budget")
        else:
            out.append(f"{label}: IG with {r.steps} steps is not converged (completeness error {err} > "
                       f"{r.completeness_target:g}); use more --steps or --steps auto")
    if r.info.get("unknown"):
        out.append(f"{label}: the prompt holds characters the tokenizer does not know "
                   f"({', '.join(map(quoted, r.info['unknown']))}); they are read as its unknown token")
    return out


def cmd_attribute(args) -> int:
    from analysis.attribution.methods import METHODS, AttributionError, attribute, check_ig_options, compare
    from analysis.io import write_json_atomic
    from analysis.checkpoints.models import load_model

    if args.method not in METHODS:  # checked here, not by argparse: one line, before any work
        raise AttributionError(f"--method {quoted(args.method)}: unknown; one of {', '.join(METHODS)}")
    steps, budget, batch = ig_steps(args.steps), whole("--step-budget", args.step_budget), whole("--batch", args.batch)
    check_ig_options(steps, budget, batch)
    refs = [args.checkpoint] + ([args.compare] if args.compare else [])
    check_outputs(args, inputs_of(refs), "json")
    if args.compare:  # a different architecture is refused from the headers, before either model runs
        from analysis.checkpoints import align, open_checkpoint

        align([open_checkpoint(r) for r in refs])
    quiet_transformers(args.quiet)
    results = []
    target = args.target
    for i, ref in enumerate(refs):
        model, tokenizer = load_model(ref, device=args.device, masked_lm=True)
        prog = Progress(f"{args.method} {i + 1}/{len(refs)}", not args.quiet, args.progress_file)
        try:
            r = attribute(model, tokenizer, args.prompt, target, args.method, steps=steps, budget=budget,
                          batch=batch, with_faithfulness=not args.no_faithfulness, progress=prog)
        finally:
            prog.close()
        target = r.target  # the second checkpoint explains the same continuation
        results.append(r)
        del model
    out = {"checkpoint": args.checkpoint, "prompt": args.prompt, **results[0].to_json()}
    if args.compare:
        out["compare"] = {"checkpoint": args.compare, **results[1].to_json(),
                          "difference": compare(results[0], results[1])}
    write_json_atomic(args.json, out)
    _print(args.checkpoint, results[0])
    if args.compare:
        _print(args.compare, results[1])
        moved = out["compare"]["difference"].get("heads_moved") or []
        if moved:
            print("  heads whose relevance moved most: " + ", ".join(
                f"L{m['layer']}.h{m['head']} {m['delta']:+.3g}" for m in moved[:5]))
    for ref, r in zip(refs, results):
        for w in warnings_of(ref, r):
            print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {args.json}")
    return 0


def register(sub) -> None:
    from analysis.attribution.options import COMPLETENESS_TARGET, DEFAULT_BUDGET, MAX_STEPS, METHODS

    s = sub.add_parser("attribute", help="relevance of prompt tokens, layers and heads for a target continuation")
    s.add_argument("checkpoint")
    s.add_argument("--prompt", required=True)
    s.add_argument("--target", help="the continuation to explain (default: the model's greedy continuation)")
    s.add_argument("--method", required=True, metavar="|".join(METHODS),
                   help="ig, saliency, ixg (input x gradient), ablation, lrp-cp (CP-LRP), lrp-attn (AttnLRP)")
    s.add_argument("--steps", default="auto",
                   help=f"IG steps: auto (default: segments of the path refined until the completeness error "
                        f"is below {COMPLETENESS_TARGET:g}, within --step-budget) or 1 to {MAX_STEPS} "
                        "(one Gauss-Legendre rule)")
    s.add_argument("--step-budget", default=str(DEFAULT_BUDGET),
                   help=f"gradient evaluations the adaptive IG may spend (default {DEFAULT_BUDGET})")
    s.add_argument("--batch", help="IG steps / ablations per forward (default: as many as fit 4,096 tokens on CPU, "
                                   "16,384 on CUDA)")
    s.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    s.add_argument("--compare", metavar="CKPT2", help="the same prompt, target and method on a second checkpoint")
    s.add_argument("--no-faithfulness", action="store_true", help="skip the perturbation curves")
    add_run_args(s)
    s.set_defaults(func=cmd_attribute)
