"""The geometry of an update: how a fine-tune moved each weight matrix, not only where it wrote.

"The Path Not Taken: RLVR Provably Learns Off the Principals" (arXiv 2511.08567) explains the
sparsity of RL updates by their geometry: RL barely moves a matrix's spectrum, rotates its
principal subspaces little and avoids its principal weights; SFT targets them. For every 2-D
weight of the transformer blocks, base W₀ against tuned W₁ (ΔW = W₁ − W₀), with k the size of
the principal subspace (a count, or a fraction of the rank; default 1% of the rank, at least 1):

- **spectral drift** ‖σ(W₁) − σ(W₀)‖₂ / ‖σ(W₀)‖₂, and the same over the top-k σᵢ;
- **principal-subspace rotation**: the principal angles between span(U₀[:, :k]) and
  span(U₁[:, :k]) (cosines = singular values of U₀ₖᵀU₁ₖ), the same for V; mean and largest, in
  degrees;
- **alignment of the update with the principal subspace** ‖U₀ₖᵀ ΔW V₀ₖ‖²_F / ‖ΔW‖²_F, beside its
  value for a random update, k²/(m·n) (its expectation for an isotropic ΔW);
- **principal-weight overlap**: the c elements with the largest |(U₀ₖ Σ₀ₖ V₀ₖᵀ)ᵢⱼ| (the paper's
  principal weights), c the number the update changed at τ, against the changed set: o₁ = |P ∩ C|
  / |C| (= |P ∩ C| / |P|, both have c elements) and Jaccard; the same for the c smallest |W₀| and
  for a random set of c (its expectation, docs/design.md §5);
- **heavy-tail exponent** α of the empirical spectral density (the eigenvalues σᵢ² of WᵀW) of W₀
  and W₁, by WeightWatcher's own fit (``weightwatcher`` 0.7.7, ``WW_powerlaw.WWFit``, the fit its
  ``analyze()`` runs per layer by default: maximum-likelihood α for each candidate xmin, the xmin
  of smallest Kolmogorov–Smirnov distance, no xmax). We call it per matrix on the spectrum we
  already have instead of ``WeightWatcher(model).analyze()``, which would load the model and redo
  every SVD.

SVDs run in float32 (or float64) with torch, on CUDA when asked. The spectra σ(W₀), σ(W₁) are
always full (drift and α need them, ``torch.linalg.svdvals``). The top-k singular vectors come
from a full SVD when min(m, n) ≤ ``FULL_SVD_MAX`` and from ``torch.svd_lowrank`` (randomized,
k + 10 columns, 4 power iterations) beyond; the error is stated per matrix as ``svd_error``, the
largest of |σ̃ᵢ − σᵢ| (against the exact spectrum) and the residual ‖W ṽᵢ − σ̃ᵢ ũᵢ‖ over i < k,
relative to σ₁ (0 for a full SVD); the sine of a top-k vector's angle to the exact one is at most
that residual over the gap σₖ − σₖ₊₁ (Wedin).

No SVD sees a non-finite value: W₀, W₁ (in the SVD dtype) and ΔW are checked first, and a matrix
holding NaN or ±inf is skipped with the reason ("base holds 1 non-finite element (inf)"), its counts
in ``nonfinite`` as the diff's tensor rows count them, and left out of every mean. A quantity whose
definition does not pick one number is None with its reason in ``undefined``: the top-k singular
subspace of a matrix is unique only when σₖ > σₖ₊₁ (σ beyond the rank counted as 0; equal within
max(m, n)·ε·σ₁, ``numpy.linalg.matrix_rank``'s tolerance), so the angles need it for W₀ and W₁ and
the alignment for W₀; the principal weights need a unique, non-zero rank-k approximation of W₀
(σₖ > σₖ₊₁ or σₖ₊₁ = 0, and W₀ ≠ 0), the smallest weights a W₀ that is not all zeros.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from collections.abc import Callable

import numpy as np
import torch

from analysis.checkpoints import Checkpoint, align, open_checkpoint
from analysis.definitions import PAPER_TOL
from analysis.errors import SubnetscopeError
from analysis.checkpoints.tensor_map import map_aligned
from kernels.diff_stats import Incomparable, changed_mask, comparison

SCHEMA = "subnetscope.geometry/1"
DEFAULT_K = 0.01  # 1% of the rank
FULL_SVD_MAX = 1024  # min(m, n) up to which the top-k vectors come from a full SVD
OVERSAMPLE = 10
POWER_ITERS = 4
MATRIX_KINDS = ("q", "k", "v", "qkv", "o", "gate", "up", "down")


class NonFiniteMatrix(SubnetscopeError):
    """A matrix holding NaN or ±inf, whose SVD is undefined; ``reason`` without the name, ``counts``
    the non-finite elements of base, tuned and ΔW."""

    def __init__(self, name: str, reason: str, counts: dict[str, int] | None = None):
        super().__init__(f"{name}: {reason}" if name else reason)
        self.reason, self.counts = reason, counts or {}


def nonfinite_reason(w: torch.Tensor, what: str = "matrix", stored: torch.Tensor | None = None) -> str | None:
    """What is not finite in ``w`` (a float tensor as the SVD sees it), in words: ``base holds 1
    non-finite element (inf)``, ``tuned holds 3 non-finite elements (2 nan, 1 -inf)``; elements
    finite in ``stored`` (the tensor as stored, e.g. float64) but beyond the range of ``w``'s dtype
    are named so. None when every element is finite."""
    n = int((~torch.isfinite(w)).sum())
    if not n:
        return None
    src = stored if stored is not None and stored.dtype != w.dtype and stored.is_floating_point() else w
    kinds = [(int(c), t) for c, t in ((torch.isnan(src).sum(), "nan"), ((src == math.inf).sum(), "inf"),
                                       ((src == -math.inf).sum(), "-inf")) if int(c)]
    own = sum(c for c, _ in kinds)
    parts = []
    if own:
        detail = kinds[0][1] if len(kinds) == 1 else ", ".join(f"{c} {t}" for c, t in kinds)
        parts.append(f"{own} non-finite element{'s' if own > 1 else ''} ({detail})")
    if n > own:
        parts.append(f"{n - own} element{'s' if n - own > 1 else ''} beyond the "
                     f"{str(w.dtype).removeprefix('torch.')} range of the SVDs")
    return f"{what} holds " + " and ".join(parts)


def resolve_k(k: float | int | None, rank: int) -> int:
    """k as a count: an int ≥ 1 (at most the rank), a fraction in (0, 1) of the rank, or None for
    1% of the rank; always ≥ 1."""
    if k is None:
        k = DEFAULT_K
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k <= 0:
        raise SubnetscopeError(f"k must be a count ≥ 1 or a fraction of the rank in (0, 1), got {k!r}")
    if isinstance(k, float) and k < 1:
        return max(1, int(round(k * rank)))
    if float(k) != int(k):
        raise SubnetscopeError(f"k must be a whole count or a fraction below 1, got {k!r}")
    return max(1, min(int(k), rank))


def parse_k(text: str) -> float | int | None:
    """k as typed: a count (``8``), a fraction of the rank (``0.05``), a percentage (``1%``); empty
    or ``1%`` of the default gives None (1% of each matrix's rank).

    Raises:
        SubnetscopeError: anything else, or a value :func:`resolve_k` rejects.
    """
    t = (text or "").strip()
    if t in ("", "1%"):
        return None
    try:
        if t.endswith("%"):
            v: float | int = float(t[:-1]) / 100
        elif any(c in t for c in ".eE"):
            v = float(t)
        else:
            v = int(t)
    except ValueError:
        raise SubnetscopeError(f"k is a count (8), a fraction of the rank (0.05) or a percentage (1%), "
                               f"got {text!r}") from None
    if isinstance(v, float) and v >= 1:
        raise SubnetscopeError(f"k must be a count ≥ 1 or a fraction in (0, 1), got {text!r}")
    resolve_k(v, 100)
    return v


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles in degrees between the column spans of two [m, k] matrices with
    orthonormal columns (the cosines are the singular values of aᵀb), smallest first."""
    cos = torch.linalg.svdvals(a.T @ b).clamp(0.0, 1.0)
    return torch.rad2deg(torch.arccos(cos))


def spectrum_top_k(w: torch.Tensor, k: int):
    """The full spectrum of w, its top-k singular triplets, and the stated error of the top-k.

    Args:
        w (Tensor): ``# [m, n]`` float32 or float64.
        k (int): 1 ≤ k ≤ min(m, n).
    Returns:
        (σ ``# [min(m, n)]``, U ``# [m, k]``, S ``# [k]``, V ``# [n, k]``, error float): one full SVD
        when min(m, n) ≤ FULL_SVD_MAX (error 0); otherwise ``torch.linalg.svdvals`` for σ and
        ``torch.svd_lowrank`` (seeded) for the triplets, error = the largest σ error or residual
        over the top k, relative to σ₁ (module docstring).
    Raises:
        NonFiniteMatrix: w holds NaN or ±inf.
    """
    reason = nonfinite_reason(w)
    if reason:  # LAPACK fails on them, or worse returns a spectrum of garbage
        raise NonFiniteMatrix("", reason + ": no SVD")
    r = min(w.shape)
    if r <= FULL_SVD_MAX:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return s, u[:, :k], s[:k], vh[:k].T, 0.0
    sigma = torch.linalg.svdvals(w)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # svd_lowrank draws its sketch from the global generator: seeded, then restored
    try:
        u, s, v = torch.svd_lowrank(w, q=min(k + OVERSAMPLE, r), niter=POWER_ITERS)
    finally:
        torch.random.set_rng_state(gen_state)
    u, s, v = u[:, :k], s[:k], v[:, :k]
    if float(sigma[0]) > 0:  # σ error and the residual ‖W vᵢ − σᵢ uᵢ‖ (sin of the subspace error ≤ residual / gap)
        resid = torch.linalg.vector_norm(w @ v - u * s, dim=0).max()
        err = float((torch.maximum((s - sigma[:k]).abs().max(), resid) / sigma[0]).item())
    else:
        err = 0.0
    return sigma, u, s, v, err


def power_law_alpha(sigma: np.ndarray) -> float | None:
    """α of the power law WeightWatcher fits to the eigenvalues σᵢ² (its default fit,
    ``weightwatcher.WW_powerlaw.WWFit``: the continuous maximum-likelihood α for every candidate
    xmin, the xmin with the smallest Kolmogorov–Smirnov distance); None for fewer than 4 positive
    eigenvalues or a failed fit."""
    import contextlib
    import io
    import warnings

    ev = np.sort(np.asarray(sigma, np.float64) ** 2)
    ev = ev[ev > 0]
    if len(ev) < 4:
        return None
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings(), np.errstate(all="ignore"):  # the package prints on import and for small N
        warnings.simplefilter("ignore")
        from weightwatcher.WW_powerlaw import WWFit

        a = float(WWFit(ev).alpha)
    return a if math.isfinite(a) else None


def _mask_overlap(sel: torch.Tensor, changed: torch.Tensor) -> tuple[float, float]:
    inter = int((sel & changed).sum())
    c, u = int(changed.sum()), int((sel | changed).sum())
    return (inter / c if c else float("nan")), (inter / u if u else float("nan"))


def _top_mask(score: torch.Tensor, c: int) -> torch.Tensor:
    """The c largest entries of a flat score (ties by index: torch.topk on CPU is deterministic)."""
    m = torch.zeros(score.numel(), dtype=torch.bool)
    if c:
        m[torch.topk(score.reshape(-1).cpu(), c, sorted=False).indices] = True
    return m


@dataclass
class MatrixGeometry:
    """The geometry of one matrix's update (every angle in degrees; None where undefined)."""

    name: str
    layer: int | None
    kind: str
    shape: tuple[int, int]
    k: int
    spectral_drift: float | None
    top_k_drift: float | None
    angle_u_mean: float | None  # None when a top-k subspace is not unique (``undefined`` says why)
    angle_u_max: float | None
    angle_v_mean: float | None
    angle_v_max: float | None
    alignment: float | None  # ‖U₀ₖᵀ ΔW V₀ₖ‖² / ‖ΔW‖², None when ΔW = 0
    alignment_random: float  # k² / (m n)
    changed: int  # elements changed at τ
    principal_o1: float | None
    principal_jaccard: float | None
    smallest_o1: float | None
    smallest_jaccard: float | None
    random_o1: float | None
    random_jaccard: float | None
    alpha_base: float | None
    alpha_tuned: float | None
    svd_error: float
    sigma_base: list[float] | None = None  # the full spectra, only when asked
    sigma_tuned: list[float] | None = None
    angles_u: list[float] | None = None  # every principal angle, with the spectra
    angles_v: list[float] | None = None
    undefined: dict[str, str] = dataclasses.field(default_factory=dict)  # field -> why it is None


def matrix_geometry(w0: torch.Tensor, w1: torch.Tensor, *, k: float | int | None = None, tol: float = PAPER_TOL,
                    device: str = "cpu", dtype: torch.dtype = torch.float32, spectra: bool = False,
                    name: str = "", layer: int | None = None, kind: str = "") -> MatrixGeometry:
    """Every quantity of the module docstring for one stored pair (any float dtype).

    Args:
        w0, w1 (Tensor): ``# [m, n]`` base and tuned, as stored.
        k: the principal subspace's size (:func:`resolve_k`). Default: 1% of the rank.
        tol (float): τ of the changed set. Default: ``PAPER_TOL``.
        device (str): where the SVDs run. Default: cpu.
        dtype: float32 or float64 for the SVDs. Default: float32.
        spectra (bool): keep both full spectra and every principal angle in the result. Default: False.
    Raises:
        NonFiniteMatrix: W₀, W₁ (in ``dtype``) or ΔW holds NaN or ±inf, checked before any SVD.
    """
    if w0.dim() != 2 or w0.shape != w1.shape:
        raise SubnetscopeError(f"{name or 'matrix'}: geometry needs two matrices of one shape, got "
                               f"{tuple(w0.shape)} and {tuple(w1.shape)}")
    m, n = w0.shape
    kk = resolve_k(k, min(m, n))
    a = w0.to(device=device, dtype=dtype)
    b = w1.to(device=device, dtype=dtype)
    reasons = [r for r in (nonfinite_reason(a, "base", w0), nonfinite_reason(b, "tuned", w1)) if r]
    dw = b - a
    bad_dw = int((~torch.isfinite(dw)).sum())
    if bad_dw and not reasons:  # two finite matrices whose difference overflows
        reasons.append(f"ΔW = tuned − base overflows {str(dtype).removeprefix('torch.')} in {bad_dw} "
                       f"element{'s' if bad_dw > 1 else ''}")
    if reasons:  # before any SVD: LAPACK fails on them, or returns a spectrum of garbage
        raise NonFiniteMatrix(name, "; ".join(reasons), {"base": int((~torch.isfinite(a)).sum()),
                                                         "tuned": int((~torch.isfinite(b)).sum()), "delta": bad_dw})
    s0, u0, S0, v0, e0 = spectrum_top_k(a, kk)
    s1, u1, _, v1, e1 = spectrum_top_k(b, kk)
    undefined: dict[str, str] = {}

    def why(fields: tuple[str, ...], *reasons: str | None) -> bool:
        """Records the reasons given (None: none) for every field not already explained; True when
        there is one."""
        reason = "; ".join(r for r in reasons if r)
        for f in fields if reason else ():
            undefined.setdefault(f, reason)
        return bool(reason)

    n0 = float(torch.linalg.vector_norm(s0))
    nk = float(torch.linalg.vector_norm(s0[:kk]))
    zero0 = "the base is all zeros" if not float(s0[0]) > 0 else None
    drift = float(torch.linalg.vector_norm(s1 - s0)) / n0 if n0 > 0 else None
    kdrift = float(torch.linalg.vector_norm(s1[:kk] - s0[:kk])) / nk if nk > 0 else None
    why(("spectral_drift", "top_k_drift"), zero0)
    sub0, sub1 = _subspace_problem(s0, kk, (m, n), "base"), _subspace_problem(s1, kk, (m, n), "tuned")
    angles = ("angle_u_mean", "angle_u_max", "angle_v_mean", "angle_v_max")
    if why(angles, sub0, sub1):
        au = av = None
    else:
        au, av = principal_angles(u0, u1), principal_angles(v0, v1)
    dn = float(torch.linalg.matrix_norm(dw) ** 2)
    proj = float(torch.linalg.matrix_norm(u0.T @ dw @ v0) ** 2)
    alignment = None if why(("alignment",), sub0 or ("ΔW = 0" if not dn > 0 else None)) else proj / dn
    changed = changed_mask(w0, w1, tol).reshape(-1).cpu()
    c = int(changed.sum())
    overlaps = ("principal_o1", "principal_jaccard", "smallest_o1", "smallest_jaccard", "random_o1",
                "random_jaccard")
    why(overlaps, None if c else f"no element changed at τ = {tol:g}")
    principal = (u0 * S0) @ v0.T
    p_o1, p_j = _mask_overlap(_top_mask(principal.abs(), c), changed)
    s_o1, s_j = _mask_overlap(_top_mask(-a.abs(), c), changed)
    if zero0:
        why(overlaps[:4], zero0 + ": every weight ties at 0, principal and smallest alike")
        p_o1 = p_j = s_o1 = s_j = None
    elif why(overlaps[:2], _approximation_problem(s0, kk, (m, n))):
        p_o1 = p_j = None
    d = c / (m * n)
    r_o1, r_j = (d, d * d / (2 * d - d * d)) if c else (float("nan"), float("nan"))
    s0n, s1n = s0.double().cpu().numpy(), s1.double().cpu().numpy()
    nan_none = lambda x: None if x is None or not math.isfinite(x) else float(x)  # noqa: E731
    ang = lambda x, f: None if x is None else float(f(x))  # noqa: E731
    return MatrixGeometry(
        name, layer, kind, (m, n), kk, nan_none(drift), nan_none(kdrift),
        ang(au, torch.mean), ang(au, torch.max), ang(av, torch.mean), ang(av, torch.max),
        nan_none(alignment), kk * kk / (m * n), c,
        nan_none(p_o1), nan_none(p_j), nan_none(s_o1), nan_none(s_j), nan_none(r_o1), nan_none(r_j),
        power_law_alpha(s0n), power_law_alpha(s1n), max(e0, e1),
        s0n.tolist() if spectra else None, s1n.tolist() if spectra else None,
        au.tolist() if spectra and au is not None else None, av.tolist() if spectra and av is not None else None,
        undefined)


def _gap_tol(sigma: torch.Tensor, shape: tuple[int, int]) -> float:
    """σ closer than this are equal: max(m, n)·ε·σ₁ (numpy.linalg.matrix_rank's tolerance)."""
    return max(shape) * torch.finfo(sigma.dtype).eps * float(sigma[0])


def _sigma_after(sigma: torch.Tensor, k: int) -> float:
    """σₖ₊₁ (1-based), 0 beyond the rank."""
    return float(sigma[k]) if k < len(sigma) else 0.0


def _subspace_problem(sigma: torch.Tensor, k: int, shape: tuple[int, int], what: str) -> str | None:
    """Why the top-k singular subspaces of a matrix with spectrum ``sigma`` are not unique (σₖ ≤ σₖ₊₁
    within :func:`_gap_tol`), or None when they are."""
    if not float(sigma[0]) > 0:
        return f"the {what} is all zeros: it has no top-{k} singular subspace"
    sk, after, tol = float(sigma[k - 1]), _sigma_after(sigma, k), _gap_tol(sigma, shape)
    if sk - after > tol:
        return None
    return (f"the {what}'s top-{k} singular subspace is not unique (σ{k} = {_sigma_text(sk, tol)}, "
            f"σ{k + 1} = {_sigma_text(after, tol)})")


def _sigma_text(x: float, tol: float) -> str:
    """A singular value for a message: 0 within the rank tolerance (it is 0 up to rounding)."""
    return "0" if x <= tol else f"{x:.3g}"


def _approximation_problem(sigma: torch.Tensor, k: int, shape: tuple[int, int]) -> str | None:
    """Why the base's best rank-k approximation U_kΣ_kV_kᵀ (its principal weights) is not unique:
    σₖ = σₖ₊₁ > 0 (within :func:`_gap_tol`); None when it is."""
    sk, after, tol = float(sigma[k - 1]), _sigma_after(sigma, k), _gap_tol(sigma, shape)
    if sk - after > tol or after <= tol:
        return None
    return (f"the base's best rank-{k} approximation is not unique (σ{k} = {_sigma_text(sk, tol)}, "
            f"σ{k + 1} = {_sigma_text(after, tol)})")


@dataclass
class GeometryResult:
    """Geometry of every block matrix of one (base, tuned) pair."""

    base: str
    tuned: str
    k: float | int | None
    tol: float
    matrices: list[MatrixGeometry]
    skipped: list[dict]

    def skipped_matrices(self) -> list[dict]:
        """The 2-D block matrices skipped, with their reasons (non-finite values, incomparable dtypes,
        missing in one checkpoint, another shape); ``skipped`` also holds the other tensors the
        alignment left out."""
        return [x for x in self.skipped if x.get("kind") in MATRIX_KINDS and x.get("layer") is not None]

    def _group(self, attr: str) -> list[tuple]:
        """(value of ``attr``, means over the matrices of that value, how many of them were skipped),
        groups in first-seen order; a group of skipped matrices only has None means."""
        fields = ("spectral_drift", "top_k_drift", "angle_u_mean", "angle_u_max", "angle_v_mean", "angle_v_max",
                  "alignment", "alignment_random", "principal_o1", "smallest_o1", "random_o1", "alpha_base",
                  "alpha_tuned")
        groups: dict = {}
        for g in self.matrices:
            groups.setdefault(getattr(g, attr), []).append(g)
        skipped: dict = {}
        for x in self.skipped_matrices():
            groups.setdefault(x[attr], [])
            skipped[x[attr]] = skipped.get(x[attr], 0) + 1
        out = []
        for kv, gs in groups.items():
            row = {"matrices": len(gs), "changed": sum(g.changed for g in gs),
                   "elements": sum(g.shape[0] * g.shape[1] for g in gs), "skipped": skipped.get(kv, 0)}
            for f in fields:
                vals = [getattr(g, f) for g in gs if getattr(g, f) is not None]
                row[f] = float(np.mean(vals)) if vals else None
            out.append((kv, row))
        return out

    def layers(self) -> list[dict]:
        """Means over the matrices of each block (``skipped``: how many of its matrices are left out)."""
        return [{"layer": kv, **row} for kv, row in sorted(self._group("layer"), key=lambda x: x[0])]

    def kinds(self) -> list[dict]:
        """Means over the matrices of each kind (q, k, v, o, gate, up, down …; ``skipped`` as in
        :meth:`layers`)."""
        return [{"kind": kv, **row} for kv, row in sorted(self._group("kind"), key=lambda x: MATRIX_KINDS.index(x[0]))]

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "base": self.base, "tuned": self.tuned,
                "k": "1% of the rank" if self.k is None else self.k, "tolerance": self.tol,
                "tensors": [{**asdict(g), "shape": list(g.shape)} for g in self.matrices],
                "layers": self.layers(), "kinds": self.kinds(), "skipped": self.skipped,
                "skipped_matrices": len(self.skipped_matrices())}


def _geometry_tensor(at, values, k, tol, device, dtype_name, spectra):
    """One aligned block matrix: its MatrixGeometry, or the skipped entry that says why not (module
    level: Ray tasks run it where the files are)."""
    skip = {"name": at.key, "layer": at.layer, "kind": at.kind}
    try:
        comparison(values[0].dtype, values[1].dtype)
    except Incomparable as e:
        return {**skip, "reason": str(e)}
    if not values[0].is_floating_point() or not values[1].is_floating_point():
        return {**skip, "reason": "not a floating-point matrix"}
    w0, w1 = values[0], values[1]
    if w0.shape != tuple(at.compare_shape):  # a resized vocabulary: the shared rows
        w0, w1 = w0[: at.compare_shape[0]], w1[: at.compare_shape[0]]
    try:
        return matrix_geometry(w0, w1, k=k, tol=tol, device=device, dtype=getattr(torch, dtype_name),
                               spectra=spectra, name=at.key, layer=at.layer, kind=at.kind)
    except NonFiniteMatrix as e:
        return {**skip, "reason": e.reason, "nonfinite": e.counts}


def geometry(base: str | Checkpoint, tuned: str | Checkpoint, *, k: float | int | None = None,
             tol: float = PAPER_TOL, device: str = "cpu", dtype: str = "float32", spectra: bool = False,
             progress: Callable[[int, int, str], None] | None = None,
             should_stop: Callable[[], bool] | None = None, ray: str | None = None) -> GeometryResult:
    """The geometry of every 2-D weight of the blocks, base against tuned.

    Args:
        base, tuned: paths, hub ids or Checkpoints.
        k: principal subspace size (:func:`resolve_k`). Default: 1% of each matrix's rank.
        tol (float): τ of the changed sets. Default: ``PAPER_TOL``.
        device (str): cpu or cuda for the SVDs. Default: cpu.
        dtype (str): float32 or float64. Default: float32.
        spectra (bool): keep the full spectra per matrix. Default: False.
        progress (callable, optional): progress(done_matrices, total_matrices, name).
        should_stop (callable, optional): polled between matrices; True cancels.
        ray (str, optional): as :func:`analysis.sparsity.trajectory.trajectory`.
    Returns:
        GeometryResult
    Raises:
        SubnetscopeError: bad k, τ, device or dtype, unreadable checkpoints, no block matrices,
            or none that could be compared (each non-finite, say: the first three reasons).
    """
    if not (tol >= 0 and math.isfinite(tol)):
        raise SubnetscopeError(f"tolerance must be a finite number ≥ 0, got {tol}")
    if dtype not in ("float32", "float64"):
        raise SubnetscopeError(f"dtype must be float32 or float64, got {dtype!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SubnetscopeError(f"device {device!r} asked for, but CUDA is not available here")
    resolve_k(k, 100)  # validates k before any reading
    cks = [c if isinstance(c, Checkpoint) else open_checkpoint(c) for c in (base, tuned)]
    al = align(cks)
    info = {t.key: t for ck in cks[::-1] for t in ck.tensors.values() if len(t.shape) == 2}  # the base's wins
    where = lambda key: {"layer": info[key].layer, "kind": info[key].kind} if key in info else {}  # noqa: E731
    skipped = [{"name": m["key"], **where(m["key"]),
                "reason": "missing in " + ", ".join(str(cks[i].ref) for i in m["missing_in"])} for m in al.missing]
    skipped += [{"name": m["key"], **where(m["key"]), "reason": "shapes " + str(m["shapes"])} for m in al.mismatched]
    keep = [at for at in al.tensors if at.layer is not None and len(at.compare_shape) == 2
            and at.kind in MATRIX_KINDS]
    if not keep:
        raise SubnetscopeError(f"no 2-D weights of transformer blocks to compare in {cks[0].ref} and {cks[1].ref}")
    sub = dataclasses.replace(al, tensors=keep)
    out: list[MatrixGeometry] = []
    for i, (at, res) in enumerate(map_aligned(cks, sub, _geometry_tensor, k, float(tol), device, dtype, spectra,
                                              ray=ray, should_stop=should_stop, what="geometry")):
        if isinstance(res, dict):
            skipped.append(res)
        else:
            out.append(res)
        if progress is not None:
            progress(i + 1, len(keep), at.key)
    if not out:
        said = [s for s in skipped if s.get("kind")] or skipped
        raise SubnetscopeError(f"no block matrix of {cks[0].ref} and {cks[1].ref} could be compared: "
                               + "; ".join(f"{s['name']}: {s['reason']}" for s in said[:3])
                               + (f"; and {len(said) - 3} more" if len(said) > 3 else ""))
    return GeometryResult(str(cks[0].ref), str(cks[1].ref), k, float(tol), out, skipped)


def matrix_detail(base: str | Checkpoint, tuned: str | Checkpoint, key: str, *, k: float | int | None = None,
                  tol: float = PAPER_TOL) -> dict:
    """One block matrix in full: both spectra and every principal angle of U and V (the page's
    detail view; the sweep over every matrix keeps only means and maxima).

    Args:
        base, tuned: the pair.
        key (str): the matrix's normalized name, as in ``GeometryResult`` (``layers.3.mlp.up_proj.weight``).
    Returns:
        dict: ``name``, ``k``, ``sigma_base``, ``sigma_tuned``, ``angles_u``, ``angles_v`` (degrees,
        smallest first) and the matrix's MatrixGeometry fields.
    Raises:
        SubnetscopeError: the key is not a 2-D tensor present in both.
        NonFiniteMatrix: the matrix holds NaN or ±inf (the key and the reason).
    """
    cks = [c if isinstance(c, Checkpoint) else open_checkpoint(c) for c in (base, tuned)]
    al = align(cks)
    at = next((t for t in al.tensors if t.key == key), None)
    if at is None or len(at.compare_shape) != 2:
        raise SubnetscopeError(f"{key}: not a matrix present in both {cks[0].ref} and {cks[1].ref}")
    w0, w1 = (ck.tensor(n) for ck, n in zip(cks, at.names))
    rows = at.compare_shape[0]
    w0, w1 = w0[:rows], w1[:rows]
    return asdict(matrix_geometry(w0, w1, k=k, tol=tol, spectra=True, name=at.key, layer=at.layer, kind=at.kind))
