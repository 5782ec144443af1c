"""``geometry``: how a fine-tune moved each block matrix — spectral drift, rotation of the principal
subspaces, alignment of the update with them, overlap with the principal weights, and the
heavy-tail exponent α of base and tuned (analysis.sparsity.geometry)."""

from __future__ import annotations

from analysis.cli.common import add_run_args, check_outputs, inputs_of, ratio, tolerance
from analysis.definitions import PAPER_TOL


def k_value(s: str | None) -> float | int | None:
    """``--k`` as given: a count (``8``), a fraction of the rank (``0.05``) or a percentage (``1%``);
    parsed by the command, not by argparse, so that a bad value is one line (``error: --k: …``).

    Raises:
        SubnetscopeError: anything :func:`analysis.sparsity.geometry.parse_k` refuses, naming ``--k``.
    """
    from analysis.errors import SubnetscopeError
    from analysis.sparsity.geometry import parse_k

    if s is None:
        return None
    try:
        return parse_k(s)
    except SubnetscopeError as e:
        raise SubnetscopeError(f"--k: {e}") from None


def _num(x, fmt: str = ".3f") -> str:
    return "—" if x is None else format(x, fmt)


def cmd_geometry(args) -> int:
    from analysis.sparsity.geometry import geometry
    from analysis.io import write_json_atomic
    from analysis.jobs.progress import Progress

    k = k_value(args.k)
    check_outputs(args, inputs_of([args.base, args.tuned]), "json")
    prog = Progress("geometry", not args.quiet, args.progress_file)
    try:
        res = geometry(args.base, args.tuned, k=k, tol=args.tol, device=args.device, dtype=args.dtype,
                       spectra=args.spectra, progress=prog, ray=args.ray)
    finally:
        prog.close()
    d = res.to_json()
    write_json_atomic(args.json, d)
    left_out = res.skipped_matrices()
    print(f"{res.base} -> {res.tuned}; k {d['k']}; tolerance {res.tol:g}; {len(res.matrices)} block matrices"
          + (f" ({len(left_out)} skipped, left out of every mean)" if left_out else ""))
    print("  kind   drift  top-k drift  angle U (mean/max)  alignment (random)   principal o1 (smallest, random)"
          "  α base → tuned")
    for r in d["kinds"]:
        print(f"  {r['kind']:<5} {_num(r['spectral_drift'], '.4f'):>6}  {_num(r['top_k_drift'], '.4f'):>11}"
              f"  {_num(r['angle_u_mean'], '.1f'):>8}°/{_num(r['angle_u_max'], '.1f'):>5}°"
              f"  {_num(r['alignment'], '.2e'):>9} ({_num(r['alignment_random'], '.1e')})"
              f"  {ratio(r['principal_o1']):>12} ({ratio(r['smallest_o1'])}, {ratio(r['random_o1'])})"
              f"  {_num(r['alpha_base'], '.2f')} → {_num(r['alpha_tuned'], '.2f')}")
    worst = max((g.svd_error for g in res.matrices), default=0.0)
    if worst:
        print(f"  randomized top-k: largest σ error {worst:.2e} of σ₁")
    for x in left_out[:5]:
        print(f"  skipped {x['name']}: {x['reason']}")
    others = len(d["skipped"]) - len(left_out)
    if len(left_out) > 5 or others:
        print(f"  skipped {len(left_out) - min(5, len(left_out)) + others} more tensors (see JSON)")
    print(f"wrote {args.json}")
    return 0


def register(sub) -> None:
    from analysis.cli.sparsity import add_ray_arg

    s = sub.add_parser("geometry", help="spectra, principal subspaces and principal weights of BASE vs TUNED")
    s.add_argument("base")
    s.add_argument("tuned")
    s.add_argument("--k", default=None,
                   help="principal subspace size: a count (8), a fraction of the rank (0.05) or 1%% (the default)")
    s.add_argument("--tol", type=tolerance, default=PAPER_TOL,
                   help=f"tolerance τ of the changed sets (default {PAPER_TOL:g})")
    s.add_argument("--device", default="cpu", help="where the SVDs run: cpu or cuda")
    s.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="SVD precision")
    s.add_argument("--spectra", action="store_true", help="keep every matrix's full spectra in the JSON")
    add_ray_arg(s)
    add_run_args(s)
    s.set_defaults(func=cmd_geometry)
