"""``diff``, ``overlap`` and ``trajectory``: update sparsity of a fine-tune, the overlap of several,
and the changed subnetwork along one run's checkpoints."""

from __future__ import annotations

from analysis.cli.common import add_run_args, check_outputs, inputs_of, ratio, tolerance
from analysis.jobs.progress import Progress
from analysis.definitions import DECADE_TOLS, PAPER_TOL


def cmd_diff(args) -> int:
    from analysis.sparsity.diff import diff_checkpoints
    from analysis.io import write_json_atomic

    check_outputs(args, inputs_of([args.base, args.tuned]), "json", "mask_out")
    masks = {}
    prog = Progress("diff", not args.quiet, args.progress_file)
    try:
        res = diff_checkpoints(args.base, args.tuned, tol=args.tol, rank=args.rank, device=args.device,
                               progress=prog, on_mask=masks.__setitem__ if args.mask_out else None, ray=args.ray)
    finally:
        prog.close()
    d = res.to_json()
    if args.mask_out:
        from analysis.sparsity.masks import save_mask

        save_mask(args.mask_out, masks, source=f"diff {res.base} -> {res.tuned} tol={res.tol:g}")
    write_json_atomic(args.json, d)
    print(f"{res.base} -> {res.tuned}")
    print(f"  tolerance {res.tol:g}: {res.changed_params:,} of {res.total_params:,} changed; "
          f"update sparsity {res.update_sparsity:.4%}")
    exact = d["by_compare"]["exact_bits"]
    if exact["numel"]:
        print(f"  of which {exact['numel']:,} elements in {exact['tensors']} integer/bool tensors compared by exact "
              f"bits (τ does not apply): {exact['changed']:,} changed")
    for r in d["tolerance_sweep"]:
        if r["tolerance"] in DECADE_TOLS:
            print(f"  sparsity at {r['tolerance']:<7g} {r['update_sparsity']:.4%}")
    if d["skipped"]:
        print(f"  skipped {len(d['skipped'])} tensors (see JSON): " + ", ".join(s["name"] for s in d["skipped"][:5]))
    if args.mask_out:
        print(f"wrote mask {args.mask_out}")
    print(f"wrote {args.json}")
    return 0


def cmd_overlap(args) -> int:
    from analysis.io import write_json_atomic
    from analysis.sparsity.overlap import overlap

    check_outputs(args, inputs_of([args.base, *args.tuned]), "json")
    prog = Progress("overlap", not args.quiet, args.progress_file)
    try:
        res = overlap(args.base, args.tuned, tol=args.tol, progress=prog, ray=args.ray)
    finally:
        prog.close()
    d = res.to_json()
    write_json_atomic(args.json, d)
    print(f"base {res.base}; tolerance {res.tol:g}; {res.total.numel:,} elements")
    for p in d["pairs"]:
        print(f"  {p['a']}-{p['b']}: o1 {ratio(p['o1'])} (random {ratio(p['o1_random'])}, "
              f"matched {ratio(p['o1_matched'])})  o2 {ratio(p['o2'])} (random {ratio(p['o2_random'])}, "
              f"matched {ratio(p['o2_matched'])})  jaccard {ratio(p['jaccard'])} "
              f"(random {ratio(p['jaccard_random'])})")
        if p.get("note"):
            print(f"    note: {p['note']}")
    print("  consensus (changed by exactly k runs): "
          + ", ".join(f"k={k}: {c:,}" for k, c in enumerate(d["consensus"])))
    print(f"wrote {args.json}")
    return 0


def step_list(s: str | None) -> list[int] | None:
    """``--steps`` as given: comma-separated training steps, e.g. ``10,20,30``; parsed by the command,
    not by argparse, so that a bad value is one line.

    Raises:
        SubnetscopeError: anything but whole numbers separated by commas.
    """
    from analysis.errors import SubnetscopeError, quoted

    if s is None:
        return None
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise SubnetscopeError(f"--steps: whole numbers separated by commas, got {quoted(s)}") from None


def cmd_trajectory(args) -> int:
    from analysis.io import write_json_atomic
    from analysis.sparsity.trajectory import trajectory

    steps = step_list(args.steps)
    check_outputs(args, inputs_of([args.base, *args.checkpoints]), "json")
    prog = Progress("trajectory", not args.quiet, args.progress_file)
    try:
        res = trajectory(args.base, args.checkpoints, steps=steps, tol=args.tol, progress=prog, ray=args.ray)
    finally:
        prog.close()
    d = res.to_json()
    write_json_atomic(args.json, d)
    print(f"base {res.base}; tolerance {res.tol:g}; {res.numel:,} elements; {len(res.checkpoints)} checkpoints")
    print("  step      vs base   vs previous   cumulative changed   first changed   returned   o1 with final")
    for c in d["checkpoints"]:
        print(f"  {c['step']:>6}  {c['vs_base']['update_sparsity']:>10.4%}"
              f"  {c['vs_previous']['update_sparsity']:>11.4%}"
              f"  {c['cumulative_changed']:>19,}  {c['first_changed']:>14,}  {c['returned_to_base']:>9,}"
              f"  {ratio(c['overlap_with_final']['o1']):>14}")
    print(f"  never changed: {d['first_changed_histogram']['never']:,}")
    for r in d["resized"]:
        print(f"  resized {r['key']} {' / '.join('×'.join(map(str, s)) for s in r['shapes'])}: "
              f"compared on the {r['compared_rows']:,} shared rows")
    if d["skipped"]:
        print(f"  skipped {len(d['skipped'])} tensors (see JSON): "
              + "; ".join(f"{x['name']} ({x['reason']})" for x in d["skipped"][:5]))
    print(f"wrote {args.json}")
    return 0


def add_ray_arg(s) -> None:
    s.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run as Ray tasks, one per shard file: alone, RAY_ADDRESS or a local Ray started for the "
                        "command; with an address (host:port, ray://host:port), that cluster (the checkpoints must be "
                        "readable at the same paths on every node)")


def register(sub) -> None:
    s = sub.add_parser("diff", help="update sparsity of TUNED against BASE (one streaming pass)")
    s.add_argument("base")
    s.add_argument("tuned")
    s.add_argument("--tol", type=tolerance, default=PAPER_TOL, help=f"tolerance τ (default {PAPER_TOL:g}, the paper's)")
    s.add_argument("--rank", action="store_true", help="also the rank of every 2-D update (costly)")
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--mask-out", metavar="M", help="write the changed elements as a mask file")
    add_ray_arg(s)
    add_run_args(s)
    s.set_defaults(func=cmd_diff)

    s = sub.add_parser("overlap", help="overlap of the subnetworks changed by 2+ fine-tunes of BASE")
    s.add_argument("base")
    s.add_argument("tuned", nargs="+")
    s.add_argument("--tol", type=tolerance, default=PAPER_TOL)
    add_ray_arg(s)
    add_run_args(s)
    s.set_defaults(func=cmd_overlap, min_args=("tuned", 2, "overlap needs at least two fine-tunes of the base"))

    s = sub.add_parser("trajectory", help="update sparsity along one run: checkpoints against the base and each other")
    s.add_argument("base")
    s.add_argument("checkpoints", nargs="*", metavar="CKPT",
                   help="the run's checkpoints in training order, each once; names that carry a step (checkpoint-500, "
                        "step-20, global_step500, iter_0000500) give the steps and must come in increasing order: "
                        "checkpoints given out of order are refused, not sorted")
    s.add_argument("--steps",
                   help="their training steps, increasing, e.g. 10,20,30 (default: from the names, else 1..N); "
                        "where the names carry steps, the same ones")
    s.add_argument("--tol", type=tolerance, default=PAPER_TOL)
    add_ray_arg(s)
    add_run_args(s)
    s.set_defaults(func=cmd_trajectory,
                   min_args=("checkpoints", 1, "trajectory needs at least one checkpoint after the base"))
