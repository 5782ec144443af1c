"""``align``: how the tensors of two or more checkpoints pair by name — missing and extra tensors,
shape mismatches, a resized vocabulary (docs/design.md §2)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from analysis.errors import SubnetscopeError
from analysis.specs.base import Spec
from analysis.specs.common import fmt_int
from analysis.specs.results import AlignResult


@dataclass(frozen=True)
class AlignParams:
    checkpoints: tuple[str, ...] = field(metadata={"positional": True, "nargs": "+", "metavar": "CKPT", "pair": True,
                                                   "help": "two or more checkpoints"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow configs that need remote code"})

    def __post_init__(self):
        object.__setattr__(self, "checkpoints", tuple(self.checkpoints))
        if len(self.checkpoints) < 2:
            raise SubnetscopeError("align needs at least two checkpoints")


def run(p: AlignParams, progress) -> dict:
    from analysis.checkpoints import align, open_checkpoint

    return align([open_checkpoint(r, trust_remote_code=p.trust_remote_code) for r in p.checkpoints]).to_dict()


def report(p: AlignParams, d: dict) -> None:
    print(f"aligned tensors: {d['aligned']}  compared params: {fmt_int(d['compared_params'])}")
    for label, rows in (("missing", d["missing"]), ("shape mismatches", d["shape_mismatches"]),
                        ("resized (compared on shared rows)", d["resized"])):
        print(f"{label}: {len(rows)}")
        for r in rows[:20]:
            extra = {k: v for k, v in r.items() if k != "key"}
            print(f"  {r['key']}  {json.dumps(extra)}")
        if len(rows) > 20:
            print(f"  ... {len(rows) - 20} more (see --json)")


SPEC = Spec("align", "pair the tensors of two or more checkpoints", AlignParams, run, report,
            refs=lambda p: list(p.checkpoints), cost=lambda p: 0, json_required=False, result=AlignResult)
