"""Update sparsity along one training run: N checkpoints against the base and against each other.

For checkpoints θ¹ … θᴺ of one run from θ⁰ (docs/design.md §11), with I_k the elements θᵏ
changed from θ⁰ at τ (docs/design.md §3):

- against the base and against the previous checkpoint (θᵏ⁻¹, θ⁰ for the first): every
  statistic of :mod:`analysis.sparsity.diff` (the same per-tensor kernel, so the numbers are those of the
  pairwise ``diff`` commands), the sweep included;
- the cumulative changed set |I_1 ∪ … ∪ I_k|, the elements first changed at checkpoint k (a
  histogram over steps; the rest never changed), and the elements changed at some earlier
  checkpoint that are back within τ of the base at k ("returned");
- the overlap of I_k with the final I_N: o1 = |I_k ∩ I_N| / |I_k|, o2 = |I_k ∩ I_N| / |I_N|, Jaccard.

Each aligned tensor is read once from every checkpoint (N + 1 reads, not 2N); the per-element state
is the N changed masks of one tensor at a time.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

import numpy as np

from analysis.checkpoints import Checkpoint, align, open_checkpoint
from analysis.sparsity.diff import PAPER_TOL, DiffResult, TensorDiff, grid_position, tensor_diff
from analysis.errors import SubnetscopeError
from analysis.checkpoints.tensor_map import map_aligned
from kernels.diff_stats import Incomparable, comparison

SCHEMA = "subnetscope.trajectory/1"


@dataclass
class TrajectoryResult:
    base: str
    checkpoints: list[str]
    steps: list[int]
    tol: float
    vs_base: list[DiffResult]
    vs_previous: list[DiffResult]
    cumulative: list[int]  # |I_1 ∪ … ∪ I_k|
    first_changed: list[int]  # elements whose first change is at checkpoint k
    returned: list[int]  # changed at some j < k, unchanged at k
    with_final: list[int]  # |I_k ∩ I_N|
    skipped: list[dict] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return self.vs_base[0].total_params

    def overlap_with_final(self, k: int) -> dict:
        a, b, i = self.vs_base[k].changed_params, self.vs_base[-1].changed_params, self.with_final[k]
        return {"o1": i / a if a else None, "o2": i / b if b else None,
                "jaccard": i / (a + b - i) if a + b - i else None, "intersection": i}

    def layers(self) -> list[dict]:
        """Per block, update sparsity against the base at each checkpoint (the layer × step heatmap)."""
        rows: dict[int, list] = {}
        for k, r in enumerate(self.vs_base):
            for row in r.by_layer():
                rows.setdefault(row["layer"], [None] * len(self.vs_base))[k] = row["update_sparsity"]
        return [{"layer": L, "update_sparsity": v} for L, v in sorted(rows.items())]

    def to_json(self) -> dict:
        def pair(r: DiffResult) -> dict:
            return {"changed": r.changed_params, "update_sparsity": r.update_sparsity, "tolerance_sweep": r.sweep()}

        n = self.numel
        return {
            "schema": SCHEMA,
            "base": self.base,
            "tolerance": self.tol,
            "total_params": n,
            "checkpoints": [{"index": k, "checkpoint": c, "step": s, "vs_base": pair(self.vs_base[k]),
                             "vs_previous": pair(self.vs_previous[k]), "cumulative_changed": self.cumulative[k],
                             "first_changed": self.first_changed[k], "returned_to_base": self.returned[k],
                             "overlap_with_final": self.overlap_with_final(k)}
                            for k, (c, s) in enumerate(zip(self.checkpoints, self.steps))],
            "first_changed_histogram": {"steps": self.steps, "counts": self.first_changed,
                                        "never": n - self.cumulative[-1]},
            "layers": self.layers(),
            "by_tolerance": self.by_tolerance(),
            "skipped": self.skipped,
            "resized": self.vs_base[0].resized,  # a resized vocabulary: compared on the shared rows
        }

    def by_tolerance(self) -> dict:
        """Changed counts against the base per layer at every grid τ (``[checkpoint][τ]``), from the
        per-tensor |Δ| histograms of the one pass: with the sweeps of ``vs_base`` / ``vs_previous``
        what :func:`at_tolerance` needs to answer any grid τ without reading the weights again."""
        per = [r.by_tolerance() for r in self.vs_base]
        rows: dict[int, dict] = {}
        for k, bt in enumerate(per):
            for row in bt["layers"]:
                r = rows.setdefault(row["key"], {"layer": row["key"], "numel": row["numel"],
                                                 "changed": [None] * len(per)})
                r["changed"][k] = row["changed"]
        return {"tolerances": per[0]["tolerances"], "layers": [rows[L] for L in sorted(rows)]}


def at_tolerance(d: dict, tol: float) -> dict:
    """The trajectory JSON ``d`` re-aggregated at another grid τ: each checkpoint's ``vs_base`` and
    ``vs_previous`` (changed, update sparsity) from their sweeps and ``layers`` from
    ``by_tolerance`` — equal to a fresh ``trajectory --tol τ``. The counts that need the changed
    sets themselves (ever changed, first changed, back at the base, overlap with the final set)
    keep the pass's τ, which ``detail_tolerance`` names.

    Raises:
        ValueError: τ not on the grid, or a JSON without ``by_tolerance``.
    """
    bt, i = grid_position(d, tol, "trajectory")
    n = d["total_params"]

    def pair(p: dict) -> dict:
        row = next(r for r in p["tolerance_sweep"] if r["tolerance"] == tol)
        return {**p, "changed": n - row["unchanged"], "update_sparsity": row["update_sparsity"]}

    cks = [{**c, "vs_base": pair(c["vs_base"]), "vs_previous": pair(c["vs_previous"])} for c in d["checkpoints"]]
    layers = [{"layer": r["layer"], "update_sparsity": [None if ch is None else (r["numel"] - ch[i]) / r["numel"]
                                                        if r["numel"] else None for ch in r["changed"]]}
              for r in bt["layers"]]
    return {**d, "tolerance": float(tol), "detail_tolerance": d.get("detail_tolerance", d["tolerance"]),
            "checkpoints": cks, "layers": layers}


# A checkpoint's step in its name: Hugging Face Trainer's checkpoint-500, DeepSpeed's global_step500,
# Megatron's iter_0000500, step-20 / step_20 / ckpt20 (a weight file's suffix aside).
STEP_NAME = re.compile(r"(?:^|[^A-Za-z])(?:checkpoint|ckpt|step|iteration|iter)[-_]?(\d+)$", re.IGNORECASE)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def name_step(ref: str) -> int | None:
    """The training step a checkpoint's name carries (:data:`STEP_NAME`), from its last path part or,
    for a weight file (``step-20/model.safetensors``), the folder holding it; None when neither does."""
    parts = [p for p in re.split(r"[/\\]", str(ref)) if p]
    if not parts:
        return None
    last = parts[-1]
    stem = last[: -len(sfx)] if (sfx := next((x for x in WEIGHT_SUFFIXES if last.lower().endswith(x)), "")) else last
    for name in [stem] + ([parts[-2]] if sfx and len(parts) > 1 else []):
        m = STEP_NAME.search(name)
        if m:
            return int(m.group(1))
    return None


def run_checkpoints(folder: str | Path) -> list[str]:
    """A run's saved checkpoints: the sub-folders of ``folder`` whose names carry a step
    (``step-20``, ``checkpoint-500``, :data:`STEP_NAME`) and that hold a model (a ``config.json`` or a
    weights file), sorted by step.

    Raises:
        SubnetscopeError: ``folder`` is not a folder, or holds no such checkpoint.
    """
    from analysis.errors import quoted

    d = Path(folder).expanduser()
    if not d.is_dir():
        raise SubnetscopeError(f"{quoted(d)}: not a folder of checkpoints")
    found = []
    for sub in d.iterdir():
        step = name_step(sub.name)
        if step is None or not sub.is_dir():
            continue
        if (sub / "config.json").is_file() or any(f.suffix in WEIGHT_SUFFIXES for f in sub.iterdir()):
            found.append((step, str(sub)))
    if not found:
        raise SubnetscopeError(f"{quoted(d)}: no step-N or checkpoint-N folder holding a model")
    return [ref for _, ref in sorted(found)]


def infer_steps(refs: list[str]) -> list[int]:
    """Training steps from the checkpoints' names, in the order given.

    When every name carries a step (:func:`name_step`: ``checkpoint-500``, ``step-20.safetensors``,
    ``global_step500``), those are the steps, and they must increase as given: a run given out of
    order is refused (as ``--steps`` that do not increase), never renumbered. Otherwise names that
    all end in increasing numbers give them; else 1 … N.

    Raises:
        SubnetscopeError: step names out of training order or naming one step twice.
    """
    named = [name_step(r) for r in refs]
    if refs and all(x is not None for x in named):
        first: dict[int, int] = {}
        for i, a in enumerate(named):
            j = first.setdefault(a, i)
            if j != i:
                raise SubnetscopeError(f"{refs[j]} and {refs[i]} both name step {a}: a run has one checkpoint per step")
        if any(a > b for a, b in zip(named, named[1:])):
            raise SubnetscopeError(f"checkpoints not in training order: their names give steps "
                                   f"{', '.join(map(str, named))}; list them as {', '.join(map(str, sorted(named)))}")
        return named
    nums = [re.search(r"(\d+)(\.[A-Za-z]+)?$", str(r).rstrip("/\\")) for r in refs]  # a file's suffix aside
    if all(nums):
        steps = [int(m.group(1)) for m in nums]
        if all(a < b for a, b in zip(steps, steps[1:])):
            return steps
    return list(range(1, len(refs) + 1))


def trajectory(base: str | Checkpoint, checkpoints: list[str | Checkpoint], *, steps: list[int] | None = None,
               tol: float = PAPER_TOL, progress: Callable[[int, int, str], None] | None = None,
               should_stop: Callable[[], bool] | None = None, ray: str | None = None) -> TrajectoryResult:
    """Measures how the changed subnetwork of one run grows and settles over its checkpoints.

    Args:
        base: θ⁰ (path, hub id or Checkpoint).
        checkpoints: θ¹ … θᴺ in training order (N ≥ 1), each once, none of them the base.
        steps (list[int], optional): the training step of each checkpoint, increasing; when the
            names carry steps, the same ones. Default: from the names (:func:`infer_steps`).
        tol (float): τ ≥ 0. Default: ``PAPER_TOL``.
        progress (callable, optional): progress(done_elements, total_elements, name).
        should_stop (callable, optional): polled between tensors; True cancels.
        ray (str, optional): run as Ray tasks, one per shard file of the base (``""``: RAY_ADDRESS or
            a local Ray; else a cluster's address). Default: None (here).
    Returns:
        TrajectoryResult
    Raises:
        SubnetscopeError: no checkpoints, a checkpoint given twice or also as the base, steps
            that do not match, do not increase or disagree with the names, checkpoints whose names
            are out of training order, a bad tolerance, unreadable checkpoints, or nothing to compare.
    """
    if not checkpoints:
        raise SubnetscopeError("a trajectory needs at least one checkpoint after the base")
    if not (tol >= 0 and math.isfinite(tol)):
        raise SubnetscopeError(f"tolerance must be a finite number ≥ 0, got {tol}")
    cks = [c if isinstance(c, Checkpoint) else open_checkpoint(c) for c in [base, *checkpoints]]
    refs = [str(c.ref) for c in cks]
    N = len(checkpoints)
    seen: dict = {}
    for i, c in enumerate(cks):
        where = seen.setdefault(c.path.resolve(), i)
        if where != i:
            first = "the base" if where == 0 else f"checkpoint {where}"
            raise SubnetscopeError(f"{refs[i]}: given twice, as {first} and as checkpoint {i}; a trajectory lists "
                                   f"each checkpoint once, after its base")
    named = infer_steps(refs[1:])  # refuses step names out of order
    from_names = all(name_step(r) is not None for r in refs[1:])
    if steps is None:
        steps = named
    if len(steps) != N:
        raise SubnetscopeError(f"{len(steps)} steps given for {N} checkpoints")
    if any(a >= b for a, b in zip(steps, steps[1:])):
        raise SubnetscopeError(f"steps must increase along the run, got {','.join(map(str, steps))}")
    if from_names and list(steps) != named:
        raise SubnetscopeError(f"steps {','.join(map(str, steps))} given, but the checkpoints' names say "
                               f"{','.join(map(str, named))}")
    al = align(cks)
    skipped = [{"name": m["key"], "reason": "missing in " + ", ".join(refs[i] for i in m["missing_in"])}
               for m in al.missing]
    skipped += [{"name": m["key"], "reason": "shapes " + str(m["shapes"])} for m in al.mismatched]
    vs_base: list[list[TensorDiff]] = [[] for _ in range(N)]
    vs_prev: list[list[TensorDiff]] = [[] for _ in range(N)]
    cumulative, first, returned, with_final = (np.zeros(N, np.int64) for _ in range(4))
    done = 0
    for at, res in map_aligned(cks, al, _trajectory_tensor, float(tol), cks[0].arch, ray=ray,
                               should_stop=should_stop, what="trajectory"):
        if isinstance(res, str):  # incomparable dtypes: the reason
            skipped.append({"name": at.key, "reason": res})
            continue
        base_diffs, prev_diffs, counts = res
        for k in range(N):
            vs_base[k].append(base_diffs[k])
            vs_prev[k].append(prev_diffs[k])
        cumulative += counts[0]
        first += counts[1]
        returned += counts[2]
        with_final += counts[3]
        done += at.numel
        if progress is not None:
            progress(done, al.compared_params, at.key)
    arch = cks[0].arch
    res = TrajectoryResult(
        refs[0], refs[1:], [int(s) for s in steps], float(tol),
        [DiffResult(refs[0], refs[k + 1], float(tol), arch, vs_base[k], skipped, al.resized) for k in range(N)],
        [DiffResult(refs[k], refs[k + 1], float(tol), arch, vs_prev[k], skipped, al.resized) for k in range(N)],
        cumulative.tolist(), first.tolist(), returned.tolist(), with_final.tolist(), skipped)
    if res.numel == 0:
        raise SubnetscopeError(f"nothing to compare: of {len(al.tensors)} tensor(s) aligned across {refs[0]} and "
                               f"{N} checkpoints, none has elements of a comparable dtype")
    return res


def _trajectory_tensor(at, values, tol: float, arch):
    """One aligned tensor along the run: the TensorDiffs against the base and the previous
    checkpoint, and its [cumulative, first changed, returned, with final] counts per checkpoint —
    or the reason it cannot be compared (module level: Ray tasks run it where the files are)."""
    try:
        for a, b in zip(values, values[1:]):
            comparison(a.dtype, b.dtype)
        for v in values[2:]:
            comparison(values[0].dtype, v.dtype)
    except Incomparable as e:
        return str(e)
    x, N = values[0], len(values) - 1
    masks, base_diffs, prev_diffs = [], [], []
    for k in range(N):
        td, mask = tensor_diff(at, x, values[k + 1], tol, arch, name=at.names[k + 1], with_mask=True)
        masks.append(mask.reshape(-1))
        base_diffs.append(td)
        prev_diffs.append(tensor_diff(at, values[k], values[k + 1], tol, arch, name=at.names[k + 1])[0])
    counts = np.zeros((4, N), np.int64)  # cumulative, first changed, returned, with final
    ever = masks[0].clone()
    for k, m in enumerate(masks):
        if k:
            counts[2, k] = int((ever & ~m).sum())
            counts[1, k] = int((m & ~ever).sum())
            ever |= m
        else:
            counts[1, k] = int(m.sum())
        counts[0, k] = int(ever.sum())
        counts[3, k] = int((m & masks[-1]).sum())
    return base_diffs, prev_diffs, counts
