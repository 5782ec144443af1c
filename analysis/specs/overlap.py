"""``overlap``: the subnetworks changed by two or more fine-tunes of one base, against chance
(docs/design.md §4)."""

from __future__ import annotations

from dataclasses import dataclass, field

from analysis.specs.common import ratio, tolerance
from analysis.definitions import PAPER_TOL
from analysis.errors import SubnetscopeError
from analysis.specs.base import Spec
from analysis.specs.results import OverlapResult
from analysis.specs.common import RAY_HELP, parameters_of


@dataclass(frozen=True)
class OverlapParams:
    base: str = field(metadata={"positional": True, "help": "the base every fine-tune started from"})
    tuned: tuple[str, ...] = field(metadata={"positional": True, "nargs": "+", "pair": True,
                                             "help": "two or more fine-tunes of the base"})
    tol: float = field(default=PAPER_TOL, metadata={"type": tolerance, "help": f"tolerance τ (default {PAPER_TOL:g})"})
    ray: str | None = field(default=None, metadata={"nargs": "?", "const": "", "metavar": "ADDRESS", "help": RAY_HELP})

    def __post_init__(self):
        object.__setattr__(self, "tuned", tuple(self.tuned))
        if len(self.tuned) < 2:
            raise SubnetscopeError("overlap needs at least two fine-tunes of the base")


def run(p: OverlapParams, progress) -> dict:
    from analysis.sparsity.overlap import overlap

    return overlap(p.base, list(p.tuned), tol=p.tol, progress=progress, ray=p.ray).to_json()


def report(p: OverlapParams, d: dict) -> None:
    print(f"base {d['base']}; tolerance {d['tolerance']:g}; {d['total_params']:,} elements")
    for q in d["pairs"]:
        print(f"  {q['a']}-{q['b']}: o1 {ratio(q['o1'])} (random {ratio(q['o1_random'])}, "
              f"matched {ratio(q['o1_matched'])})  o2 {ratio(q['o2'])} (random {ratio(q['o2_random'])}, "
              f"matched {ratio(q['o2_matched'])})  jaccard {ratio(q['jaccard'])} "
              f"(random {ratio(q['jaccard_random'])})")
        if q.get("note"):
            print(f"    note: {q['note']}")
    print("  consensus (changed by exactly k runs): "
          + ", ".join(f"k={k}: {c:,}" for k, c in enumerate(d["consensus"])))


SPEC = Spec("overlap", "overlap of the subnetworks changed by 2+ fine-tunes of BASE", OverlapParams, run, report,
            refs=lambda p: [p.base, *p.tuned], cost=lambda p: parameters_of(p.base),
            result=OverlapResult)
