"""``geometry``: how a fine-tune moved each block matrix — spectral drift, rotation of the principal
subspaces, alignment of the update with them, overlap with the principal weights, and the heavy-tail
exponent α of base and tuned (docs/design.md §10)."""

from __future__ import annotations

from dataclasses import dataclass, field

from analysis.specs.common import ratio, tolerance
from analysis.definitions import PAPER_TOL
from analysis.specs.base import Spec
from analysis.specs.results import GeometryResult
from analysis.specs.common import RAY_HELP, parameters_of

def k_value(s: str | None) -> float | int | None:
    """``--k`` as given: a count (``8``), a fraction of the rank (``0.05``) or a percentage (``1%``).

    Raises:
        SubnetscopeError: anything :func:`analysis.sparsity.geometry.parse_k` refuses, naming ``--k``.
    """
    from analysis.errors import SubnetscopeError
    from analysis.sparsity.geometry import parse_k

    if s is None:
        return None
    try:
        return parse_k(str(s))
    except SubnetscopeError as e:
        raise SubnetscopeError(f"--k: {e}") from None


@dataclass(frozen=True)
class GeometryParams:
    base: str = field(metadata={"positional": True, "help": "the checkpoint fine-tuned from"})
    tuned: str = field(metadata={"positional": True, "help": "the fine-tune"})
    k: str | None = field(default=None, metadata={
        "help": "principal subspace size: a count (8), a fraction of the rank (0.05) or 1%% (the default)"})
    tol: float = field(default=PAPER_TOL, metadata={"type": tolerance,
                                                    "help": f"tolerance τ of the changed sets (default {PAPER_TOL:g})"})
    device: str = field(default="cpu", metadata={"help": "where the SVDs run: cpu or cuda"})
    dtype: str = field(default="float32", metadata={"choices": ("float32", "float64"), "help": "SVD precision"})
    spectra: bool = field(default=False, metadata={"help": "keep every matrix's full spectra in the JSON"})
    ray: str | None = field(default=None, metadata={"nargs": "?", "const": "", "metavar": "ADDRESS", "help": RAY_HELP})

    def __post_init__(self):
        if self.k is not None:
            object.__setattr__(self, "k", str(self.k))
        k_value(self.k)


def _num(x, fmt: str = ".3f") -> str:
    return "—" if x is None else format(x, fmt)


def run(p: GeometryParams, progress) -> dict:
    from analysis.sparsity.geometry import geometry

    return geometry(p.base, p.tuned, k=k_value(p.k), tol=p.tol, device=p.device, dtype=p.dtype, spectra=p.spectra,
                    progress=progress, ray=p.ray).to_json()


def report(p: GeometryParams, d: dict) -> None:
    from analysis.sparsity.geometry import MATRIX_KINDS

    left_out = [x for x in d["skipped"] if x.get("kind") in MATRIX_KINDS and x.get("layer") is not None]
    print(f"{d['base']} -> {d['tuned']}; k {d['k']}; tolerance {d['tolerance']:g}; {len(d['tensors'])} block matrices"
          + (f" ({len(left_out)} skipped, left out of every mean)" if left_out else ""))
    print("  kind   drift  top-k drift  angle U (mean/max)  alignment (random)   principal o1 (smallest, random)"
          "  α base → tuned")
    for r in d["kinds"]:
        print(f"  {r['kind']:<5} {_num(r['spectral_drift'], '.4f'):>6}  {_num(r['top_k_drift'], '.4f'):>11}"
              f"  {_num(r['angle_u_mean'], '.1f'):>8}°/{_num(r['angle_u_max'], '.1f'):>5}°"
              f"  {_num(r['alignment'], '.2e'):>9} ({_num(r['alignment_random'], '.1e')})"
              f"  {ratio(r['principal_o1']):>12} ({ratio(r['smallest_o1'])}, {ratio(r['random_o1'])})"
              f"  {_num(r['alpha_base'], '.2f')} → {_num(r['alpha_tuned'], '.2f')}")
    worst = max((t["svd_error"] or 0.0 for t in d["tensors"]), default=0.0)
    if worst:
        print(f"  randomized top-k: largest σ error {worst:.2e} of σ₁")
    for x in left_out[:5]:
        print(f"  skipped {x['name']}: {x['reason']}")
    others = len(d["skipped"]) - len(left_out)
    if len(left_out) > 5 or others:
        print(f"  skipped {len(left_out) - min(5, len(left_out)) + others} more tensors (see JSON)")


SPEC = Spec("geometry", "spectra, principal subspaces and principal weights of BASE vs TUNED", GeometryParams, run,
            report, refs=lambda p: [p.base, p.tuned], cost=lambda p: parameters_of(p.base),
            result=GeometryResult)
