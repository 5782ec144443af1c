"""``selectors``, ``importance`` and ``evaluate-selectors``: the importance selectors, one
selector's scores and mask, and how several agree and predict a real update.

Bad input is one line: before the model is loaded, a density outside (0, 1], a count below its
minimum, an ``--option`` the selector does not declare, of the wrong type, given twice or set by a
flag of the command (``seed`` -> ``--seed``), an empty, unknown or repeated name in ``--selectors``;
before any scoring, a ``--seq-len`` beyond the model's positions (not given, it is 64 or the
model's positions when fewer) or calibration data the chosen selectors cannot use.
"""

from __future__ import annotations

import math

from analysis.cli.common import (add_data_args, add_run_args, check_outputs, inputs_of, options, plain,
                                 quiet_transformers, ratio, tolerance)
from analysis.errors import SubnetscopeError
from analysis.jobs.progress import Progress
from analysis.definitions import BUDGETS, GRANULARITIES, PAPER_TOL

# What `importance` sets by a flag of its own: as an --option it is refused, never passed twice.
FLAGS = {"seed": "--seed", "granularity": "--granularity", "samples": "--samples", "seq_len": "--seq-len",
         "batch_size": "--batch-size", "data": "--data", "device": "--device", "scope": "--scope",
         "density": "--density", "budget": "--budget"}
_FIXED = {**FLAGS, **{k.replace("_", "-"): v for k, v in FLAGS.items()}}
_MINIMUM = (("samples", 1), ("seq_len", 2), ("batch_size", 1))  # calibration_batches' minimums
_VALUE_WORDS = {bool: "true|false", int: "INT", float: "NUMBER", str: "TEXT"}  # declared types, in `selectors`


class ImportanceArgsError(SubnetscopeError):
    """A flag of ``importance`` or ``evaluate-selectors`` out of its range, in one line."""


def _check_numbers(args) -> None:
    """Before any work: the density and the calibration sizes are in range (argparse has read
    their type only)."""
    d = args.density
    if d is not None and not (math.isfinite(d) and 0 < d <= 1):
        raise ImportanceArgsError(f"--density must be a fraction in (0, 1], got {d:g}")
    for name, low in _MINIMUM:
        value = getattr(args, name)
        if value is not None and value < low:
            raise ImportanceArgsError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")


def _calibration(args, tokenizer, who: list[str], offset: int = 0):
    """The calibration batches of ``--data`` for the selectors ``who``; data that cannot be used
    is one line naming them and the problem."""
    from analysis.importance.calibration import CalibrationError, calibration_batches

    what = f"{', '.join(who)} {'needs' if len(who) == 1 else 'need'} calibration data (--data {args.data})"
    if tokenizer is None:
        raise ImportanceArgsError(f"{what}, and {args.checkpoint} has no tokenizer")
    try:
        return calibration_batches(args.data, tokenizer, samples=args.samples, seq_len=args.seq_len,
                                   batch_size=args.batch_size, offset=offset, seed=args.seed)
    except CalibrationError as e:
        raise ImportanceArgsError(f"{what}: {e}") from None


def cmd_selectors(args) -> int:
    from analysis.importance.selectors import SELECTORS

    for name, e in SELECTORS.items():
        print(f"{name:<18} {e.label}")
        print(f"{'':<18} {e.description}")
        print(f"{'':<18} granularity: {', '.join(e.granularities)}; data: {'yes' if e.needs_data else 'no'}; "
              f"cost: {e.cost}")
        print(f"{'':<18} paper: {e.paper}")
        kinds = e.option_types()
        for opt, help_ in e.options.items():
            value = "|".join(_VALUE_WORDS[t] for t in kinds[opt])
            print(f"{'':<18} {FLAGS[opt] + ' …' if opt in FLAGS else f'--option {opt}={value}'}  {help_}")
    return 0


def cmd_importance(args) -> int:
    from analysis.importance.scores import calibration_length, compute_scores, scores_to_mask, summarize
    from analysis.io import write_atomic, write_json_atomic
    from analysis.sparsity.masks import count, save_mask
    from analysis.checkpoints.models import load_model
    from analysis.importance.selectors import get_selector, parse_options

    entry = get_selector(args.selector)
    _check_numbers(args)
    opts = parse_options(args.selector, options(args.option), fixed=_FIXED)
    inputs = inputs_of([args.checkpoint, opts.get("base"), opts.get("tuned")], args.data)  # diff's checkpoints
    inputs.add(opts.get("mask"))  # and its mask file: no output may touch them
    check_outputs(args, inputs, "json", "mask_out", "scores_out")
    quiet_transformers(args.quiet)
    model, tokenizer = load_model(args.checkpoint, device=args.device)
    args.seq_len = calibration_length(model.config, args.seq_len, where=args.checkpoint)
    batches = _calibration(args, tokenizer, [args.selector]) if entry.needs_data else None
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
    from analysis.importance.scores import calibration_length
    from analysis.io import write_json_atomic
    from analysis.checkpoints.models import load_model
    from analysis.importance.evaluation import check_selectors, evaluate_selectors

    names = [n.strip() for n in args.selectors.split(",")]
    entries = check_selectors(names, args.against_diff)
    _check_numbers(args)
    check_outputs(args, inputs_of([args.checkpoint, *(args.against_diff or [])], args.data), "json")
    quiet_transformers(args.quiet)
    model, tokenizer = load_model(args.checkpoint, device=args.device)
    args.seq_len = calibration_length(model.config, args.seq_len, where=args.checkpoint)
    who = [n for n, e in entries.items() if e.needs_data]
    needs_data = bool(who)
    batches = _calibration(args, tokenizer, who) if needs_data else None
    held_out = _calibration(args, tokenizer, who, offset=args.samples) if needs_data and args.stability else None
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
    s.add_argument("--granularity", choices=GRANULARITIES)
    add_data_args(s)
    s.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="a selector option (see `selectors`), each at most once, its value of the type the selector "
                        "declares; what a flag of this command sets (seed, granularity, samples ...) is refused here")
    s.add_argument("--density", type=float, help="select this fraction of the scope, in (0, 1], as a mask")
    s.add_argument("--budget", choices=BUDGETS,
                   help="global top-k, per-layer uniform top-k, or whole heads/channels/layers")
    s.add_argument("--mask-out", metavar="M", help="write the selected elements as a mask file (needs --density)")
    s.add_argument("--scores-out", metavar="S", help="write the raw scores as safetensors")
    add_run_args(s)
    s.set_defaults(func=cmd_importance, usage_check=_mask_out_needs_density)

    s = sub.add_parser("evaluate-selectors", help="agreement of selectors, and how well they predict a real update")
    s.add_argument("checkpoint")
    s.add_argument("--selectors", required=True,
                   help="comma-separated names, e.g. magnitude,wanda,fisher; an empty, unknown or repeated name is "
                        "refused (each selector once)")
    s.add_argument("--against-diff", nargs=2, metavar=("BASE", "TUNED"), help="the fine-tune whose changes to predict")
    s.add_argument("--tol", type=tolerance, default=PAPER_TOL)
    s.add_argument("--density", type=float, required=True, help="top-k density of the Jaccard, in (0, 1]")
    s.add_argument("--stability", action="store_true", help="also rescore on a disjoint calibration set")
    add_data_args(s)
    add_run_args(s)
    s.set_defaults(func=cmd_evaluate_selectors)
