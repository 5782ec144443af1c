"""``inspect``: what a checkpoint holds — architecture, exact parameter counts, dtypes, files and every
tensor — from its headers (no weights read; docs/design.md §2)."""

from __future__ import annotations

from dataclasses import dataclass, field

from analysis.specs.base import Spec
from analysis.specs.common import fmt_int, human_bytes
from analysis.specs.results import InspectResult


@dataclass(frozen=True)
class InspectParams:
    checkpoint: str = field(metadata={"positional": True,
                                      "help": "model dir, .safetensors, .bin/.pt state dict, or hub id"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow configs that need remote code"})


def run(p: InspectParams, progress) -> dict:
    from analysis.checkpoints import open_checkpoint, summarize
    from analysis.families.lineage import declared_parent

    ckpt = open_checkpoint(p.checkpoint, trust_remote_code=p.trust_remote_code)
    # the checkpoint it was trained from, as its files say (docs/design.md §14); outside a family,
    # config.json's _name_or_path counts when it names another local checkpoint
    return summarize(ckpt) | declared_parent(str(ckpt.path)).to_dict()


def report(p: InspectParams, s: dict) -> None:
    print(f"{s['ref']}  [{s['source']}]  {s['path']}")
    if s.get("parent"):
        print(f"  {'parent':<20} {s['parent']}  (from the {s['parent_source']}: {s['parent_file']})")
    for k in ("model_type", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
              "intermediate_size", "vocab_size", "tie_word_embeddings", "config_dtype"):
        print(f"  {k:<20} {s[k]}")
    print(f"  {'total_params':<20} {fmt_int(s['total_params'])}")
    print(f"  {'tensors':<20} {len(s['tensors'])}")
    print(f"  {'dtypes':<20} " + ", ".join(f"{d}: {fmt_int(n)}" for d, n in s["dtypes"].items()))
    print(f"  {'files':<20} {len(s['files'])} ({human_bytes(s['size_bytes'])})")
    print("  params by kind:")
    for k, n in s["params_by_kind"].items():
        print(f"    {k:<12} {n:>14,}")


SPEC = Spec("inspect", "architecture, exact parameter counts and tensors of a checkpoint", InspectParams, run, report,
            refs=lambda p: [p.checkpoint], cost=lambda p: 0, json_required=False, result=InspectResult)
