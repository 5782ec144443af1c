"""``trajectory``: the changed subnetwork along one run's checkpoints, against the base and each
other (docs/design.md §11)."""

from __future__ import annotations

from dataclasses import dataclass, field

from analysis.specs.common import ratio, tolerance
from analysis.definitions import PAPER_TOL
from analysis.errors import SubnetscopeError, quoted
from analysis.specs.base import Spec
from analysis.specs.results import TrajectoryResult
from analysis.specs.common import RAY_HELP, parameters_of


def step_list(s: str | None) -> list[int] | None:
    """``--steps`` as given: comma-separated training steps, e.g. ``10,20,30``; parsed by the params'
    check, not by argparse, so that a bad value is one line.

    Raises:
        SubnetscopeError: anything but whole numbers separated by commas.
    """
    if s is None:
        return None
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise SubnetscopeError(f"--steps: whole numbers separated by commas, got {quoted(s)}") from None


@dataclass(frozen=True)
class TrajectoryParams:
    base: str = field(metadata={"positional": True, "help": "the run's start checkpoint"})
    checkpoints: tuple[str, ...] = field(metadata={
        "positional": True, "nargs": "*", "metavar": "CKPT", "pair": True,
        "help": "the run's checkpoints in training order, each once; names that carry a step (checkpoint-500, "
                "step-20, global_step500, iter_0000500) give the steps and must come in increasing order: "
                "checkpoints given out of order are refused, not sorted"})
    steps: str | None = field(default=None, metadata={
        "help": "their training steps, increasing, e.g. 10,20,30 (default: from the names, else 1..N); "
                "where the names carry steps, the same ones"})
    tol: float = field(default=PAPER_TOL, metadata={"type": tolerance, "help": f"tolerance τ (default {PAPER_TOL:g})"})
    ray: str | None = field(default=None, metadata={"nargs": "?", "const": "", "metavar": "ADDRESS", "help": RAY_HELP})

    def __post_init__(self):
        object.__setattr__(self, "checkpoints", tuple(self.checkpoints))
        if not self.checkpoints:
            raise SubnetscopeError("trajectory needs at least one checkpoint after the base")
        step_list(self.steps)


def run(p: TrajectoryParams, progress) -> dict:
    from analysis.sparsity.trajectory import trajectory

    return trajectory(p.base, list(p.checkpoints), steps=step_list(p.steps), tol=p.tol, progress=progress,
                      ray=p.ray).to_json()


def report(p: TrajectoryParams, d: dict) -> None:
    print(f"base {d['base']}; tolerance {d['tolerance']:g}; {d['total_params']:,} elements; "
          f"{len(d['checkpoints'])} checkpoints")
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


SPEC = Spec("trajectory", "update sparsity along one run: checkpoints against the base and each other",
            TrajectoryParams, run, report, refs=lambda p: [p.base, *p.checkpoints],
            cost=lambda p: parameters_of(p.base) * len(p.checkpoints),
            result=TrajectoryResult)
