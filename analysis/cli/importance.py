"""``selectors``, ``importance`` and ``evaluate-selectors``: the importance selectors, one
selector's scores and mask, and how several agree and predict a real update."""

from __future__ import annotations

from analysis.cli.common import (add_data_args, add_run_args, check_outputs, density, inputs_of, options, plain,
                                 quiet_transformers, ratio, tolerance)
from analysis.jobs.progress import Progress


def _calibration(args, tokenizer, offset: int = 0):
    from analysis.calibration import calibration_batches

    return calibration_batches(args.data, tokenizer, samples=args.samples, seq_len=args.seq_len,
                               batch_size=args.batch_size, offset=offset, seed=args.seed)


def cmd_selectors(args) -> int:
    from analysis.selectors import SELECTORS

    for name, e in SELECTORS.items():
        print(f"{name:<18} {e.label}")
        print(f"{'':<18} {e.description}")
        print(f"{'':<18} granularity: {', '.join(e.granularities)}; data: {'yes' if e.needs_data else 'no'}; "
              f"cost: {e.cost}")
        print(f"{'':<18} paper: {e.paper}")
        for opt, help_ in e.options.items():
            print(f"{'':<18} --option {opt}=…  {help_}")
    return 0


def cmd_importance(args) -> int:
    from analysis.importance import compute_scores, scores_to_mask, summarize
    from analysis.io import write_atomic, write_json_atomic
    from analysis.masks import count, save_mask
    from analysis.models import load_model
    from analysis.selectors import get_selector

    entry = get_selector(args.selector)
    opts = options(args.option)
    check_outputs(args, inputs_of([args.checkpoint], args.data), "json", "mask_out", "scores_out")
    quiet_transformers(args.quiet)
    model, tokenizer = load_model(args.checkpoint, device=args.device)
    batches = _calibration(args, tokenizer) if entry.needs_data else None
    prog = Progress(args.selector, not args.quiet, args.progress_file)
    try:
        scores = compute_scores(model, args.selector, batches, granularity=args.granularity, seed=args.seed,
                                progress=prog, **opts)
    finally:
        prog.close()
    out = {"checkpoint": args.checkpoint, **summarize(scores, scope=args.scope),
           "data": args.data if batches else None, "samples": args.samples if batches else None,
           "seq_len": args.seq_len if batches else None, "options": opts, "info": plain(scores.info)}
    if args.density is not None:
        mask = scores_to_mask(scores, args.density, budget=args.budget, scope=args.scope)
        k, n = count(mask)
        out["mask"] = {"density": args.density, "budget": args.budget or "default", "selected": k,
                       "elements": n, "file": args.mask_out}
        if args.mask_out:
            save_mask(args.mask_out, mask, source=f"{args.selector} {scores.granularity} density={args.density} "
                                                  f"scope={args.scope} of {args.checkpoint}")
    if args.scores_out:
        from safetensors.torch import save

        values = scores.values if isinstance(scores.values, dict) else {scores.granularity: scores.values}
        write_atomic(args.scores_out, save({k: v.contiguous() for k, v in values.items()},
                                           metadata={"selector": args.selector, "granularity": scores.granularity}))
    write_json_atomic(args.json, out)
    print(f"{args.selector} on {args.checkpoint}: {scores.granularity} scores, scope {args.scope}")
    for row in out.get("layers") or []:
        if isinstance(row, dict):
            print(f"  layer {row['layer']:>3}  mean {row['mean']:.4g}  sum {row['sum']:.4g}")
    if "mask" in out:
        print(f"  mask: {out['mask']['selected']:,} of {out['mask']['elements']:,} elements selected")
    print(f"wrote {args.json}")
    return 0


def cmd_evaluate_selectors(args) -> int:
    from analysis.io import write_json_atomic
    from analysis.models import load_model
    from analysis.selector_eval import check_selectors, evaluate_selectors

    names = [n.strip() for n in args.selectors.split(",") if n.strip()]
    entries = check_selectors(names, args.against_diff)
    check_outputs(args, inputs_of([args.checkpoint, *(args.against_diff or [])], args.data), "json")
    quiet_transformers(args.quiet)
    model, tokenizer = load_model(args.checkpoint, device=args.device)
    needs_data = any(e.needs_data for e in entries.values())
    batches = _calibration(args, tokenizer) if needs_data else None
    held_out = _calibration(args, tokenizer, offset=args.samples) if needs_data and args.stability else None
    res = evaluate_selectors(model, names, batches=batches, held_out=held_out, density=args.density,
                             scope=args.scope, seed=args.seed, against_diff=args.against_diff, tol=args.tol,
                             progress_for=lambda n: Progress(n, not args.quiet, args.progress_file))
    out = {"checkpoint": args.checkpoint, "selectors": names, "density": args.density, "scope": args.scope,
           "data": args.data if needs_data else None, "samples": args.samples if needs_data else None, **res}
    write_json_atomic(args.json, out)
    if out["agreement"]:
        print("Spearman / top-k Jaccard:")
        for i, a in enumerate(names):
            print("  " + a.ljust(18) + "  ".join(f"{out['agreement']['spearman'][i][j] or 0:+.2f}/"
                                                 f"{out['agreement']['jaccard'][i][j] or 0:.2f}"
                                                 for j in range(len(names))))
    for p in out.get("prediction") or []:
        print(f"  {p['selector']:<18} precision@k {ratio(p['precision_at_k'])} (chance {p['base_rate']:.3f})  "
              f"AUROC {ratio(p['auroc'])}" + (f"  ({p['note']})" if p.get("note") else ""))
    for n, j in (out["stability"] or {}).items():
        print(f"  {n:<18} stability (top-k Jaccard across disjoint data) {j:.3f}")
    print(f"wrote {args.json}")
    return 0


def _mask_out_needs_density(args) -> str | None:
    return "--mask-out needs --density" if args.mask_out and args.density is None else None


def register(sub) -> None:
    s = sub.add_parser("selectors", help="list the importance selectors")
    s.set_defaults(func=cmd_selectors)

    s = sub.add_parser("importance", help="importance scores of a checkpoint's parameters by one selector")
    s.add_argument("checkpoint")
    s.add_argument("--selector", required=True)
    s.add_argument("--granularity", choices=("element", "row", "head", "channel", "layer"))
    add_data_args(s)
    s.add_argument("--option", action="append", metavar="KEY=VALUE", help="a selector option (see `selectors`)")
    s.add_argument("--density", type=density, help="select this fraction of the scope as a mask")
    s.add_argument("--budget", choices=("global", "per_layer", "structured"),
                   help="global top-k, per-layer uniform top-k, or whole heads/channels/layers")
    s.add_argument("--mask-out", metavar="M", help="write the selected elements as a mask file (needs --density)")
    s.add_argument("--scores-out", metavar="S", help="write the raw scores as safetensors")
    add_run_args(s)
    s.set_defaults(func=cmd_importance, usage_check=_mask_out_needs_density)

    s = sub.add_parser("evaluate-selectors", help="agreement of selectors, and how well they predict a real update")
    s.add_argument("checkpoint")
    s.add_argument("--selectors", required=True, help="comma-separated names, e.g. magnitude,wanda,fisher")
    s.add_argument("--against-diff", nargs=2, metavar=("BASE", "TUNED"), help="the fine-tune whose changes to predict")
    s.add_argument("--tol", type=tolerance, default=1e-5)
    s.add_argument("--density", type=density, required=True, help="top-k density of the Jaccard")
    s.add_argument("--stability", action="store_true", help="also rescore on a disjoint calibration set")
    add_data_args(s)
    add_run_args(s)
    s.set_defaults(func=cmd_evaluate_selectors)
