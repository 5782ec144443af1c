"""``attribute``: relevance of a prompt's tokens, layers and heads for a target continuation, on one
checkpoint or, with ``--compare``, on two side by side."""

from __future__ import annotations

import argparse

from analysis.cli.common import add_run_args, check_outputs, inputs_of, quiet_transformers
from analysis.jobs.progress import Progress


def steps(s: str) -> int:
    """argparse type: IG's integration steps, a whole number ≥ 1."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"steps must be at least 1, got {s}")
    return v


def _print(label: str, r) -> None:
    print(f"{label}: {r.method} ({r.explains}) of {r.target!r}: logit {r.target_logit:.4g}, "
          f"log p {r.target_logprob:.4g}, {r.seconds:.3f} s on {r.device}")
    if r.completeness_error is not None:
        print(f"  completeness error {r.completeness_error:.3g} (delta {r.convergence_delta:.3g} of "
              f"f(x) - f(x') = {r.baseline_difference:.4g}, {r.steps} steps)")
    if r.conservation_error is not None:
        print(f"  conservation error {r.conservation_error:.3g} (sum of relevance {r.relevance_sum:.4g})")
    width = max(len(repr(t)) for t in r.tokens)
    for t, s in zip(r.tokens, r.scores):
        print(f"  {t!r:<{width}}  {s:+.4g}")
    if r.faithfulness:
        print(f"  faithfulness: ABPC {r.faithfulness['abpc']:+.4g}")


def cmd_attribute(args) -> int:
    from analysis.attribution import attribute, compare
    from analysis.io import write_json_atomic
    from analysis.models import load_model

    refs = [args.checkpoint] + ([args.compare] if args.compare else [])
    check_outputs(args, inputs_of(refs), "json")
    quiet_transformers(args.quiet)
    results = []
    target = args.target
    for i, ref in enumerate(refs):
        model, tokenizer = load_model(ref, device=args.device, masked_lm=True)
        prog = Progress(f"{args.method} {i + 1}/{len(refs)}", not args.quiet, args.progress_file)
        try:
            r = attribute(model, tokenizer, args.prompt, target, args.method, steps=args.steps,
                          batch=args.batch, with_faithfulness=not args.no_faithfulness, progress=prog)
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
    print(f"wrote {args.json}")
    return 0


def register(sub) -> None:
    from analysis.attribution import DEFAULT_STEPS, METHODS

    s = sub.add_parser("attribute", help="relevance of prompt tokens, layers and heads for a target continuation")
    s.add_argument("checkpoint")
    s.add_argument("--prompt", required=True)
    s.add_argument("--target", help="the continuation to explain (default: the model's greedy continuation)")
    s.add_argument("--method", required=True, choices=tuple(METHODS),
                   help="ig, saliency, ixg (input x gradient), ablation, lrp-cp (CP-LRP), lrp-attn (AttnLRP)")
    s.add_argument("--steps", type=steps, default=DEFAULT_STEPS, help=f"IG steps (default {DEFAULT_STEPS})")
    s.add_argument("--batch", type=steps, help="IG steps / ablations per forward (default: as many as fit 4,096 tokens on CPU, 16,384 on CUDA)")
    s.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    s.add_argument("--compare", metavar="CKPT2", help="the same prompt, target and method on a second checkpoint")
    s.add_argument("--no-faithfulness", action="store_true", help="skip the perturbation curves")
    add_run_args(s)
    s.set_defaults(func=cmd_attribute)
