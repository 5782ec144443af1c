"""``diff``: update sparsity of a fine-tune against its base in one streaming pass (docs/design.md §3)."""

from __future__ import annotations

from dataclasses import dataclass, field

from analysis.specs.common import tolerance
from analysis.definitions import DECADE_TOLS, PAPER_TOL
from analysis.specs.base import Spec
from analysis.specs.results import DiffResult
from analysis.specs.common import RAY_HELP, parameters_of


@dataclass(frozen=True)
class DiffParams:
    base: str = field(metadata={"positional": True, "help": "the checkpoint fine-tuned from"})
    tuned: str = field(metadata={"positional": True, "help": "the fine-tune"})
    tol: float = field(default=PAPER_TOL, metadata={"type": tolerance,
                                                    "help": f"tolerance τ (default {PAPER_TOL:g}, the paper's)"})
    rank: bool = field(default=False, metadata={"help": "also the rank of every 2-D update (costly)"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    mask_out: str | None = field(default=None, metadata={"metavar": "M",
                                                         "help": "write the changed elements as a mask file"})
    ray: str | None = field(default=None, metadata={"nargs": "?", "const": "", "metavar": "ADDRESS", "help": RAY_HELP})


def run(p: DiffParams, progress) -> dict:
    from analysis.sparsity.diff import diff_checkpoints

    masks = {}
    res = diff_checkpoints(p.base, p.tuned, tol=p.tol, rank=p.rank, device=p.device, progress=progress,
                           on_mask=masks.__setitem__ if p.mask_out else None, ray=p.ray)
    if p.mask_out:
        from analysis.sparsity.masks import save_mask

        save_mask(p.mask_out, masks, source=f"diff {res.base} -> {res.tuned} tol={res.tol:g}")
    return res.to_json()


def report(p: DiffParams, d: dict) -> None:
    print(f"{d['base']} -> {d['tuned']}")
    print(f"  tolerance {d['tolerance']:g}: {d['changed_params']:,} of {d['total_params']:,} changed; "
          f"update sparsity {d['update_sparsity']:.4%}")
    exact = d["by_compare"]["exact_bits"]
    if exact["numel"]:
        print(f"  of which {exact['numel']:,} elements in {exact['tensors']} integer/bool tensors compared by exact "
              f"bits (τ does not apply): {exact['changed']:,} changed")
    for r in d["tolerance_sweep"]:
        if r["tolerance"] in DECADE_TOLS:
            print(f"  sparsity at {r['tolerance']:<7g} {r['update_sparsity']:.4%}")
    if d["skipped"]:
        print(f"  skipped {len(d['skipped'])} tensors (see JSON): " + ", ".join(s["name"] for s in d["skipped"][:5]))
    if p.mask_out:
        print(f"wrote mask {p.mask_out}")


SPEC = Spec("diff", "update sparsity of TUNED against BASE (one streaming pass)", DiffParams, run, report,
            refs=lambda p: [p.base, p.tuned], cost=lambda p: parameters_of(p.base),
            outputs=("mask_out",),
            result=DiffResult)
