"""The end of a run: the weights cast back to the dtypes the checkpoint stores, and the check that
nothing outside the mask moved."""

from __future__ import annotations

from pathlib import Path

import torch


def stored_dtypes(ref) -> dict[str, torch.dtype]:
    """Tensor name -> the dtype the checkpoint (a reference or an open Checkpoint) stores it in."""
    from analysis.checkpoints import Checkpoint, open_checkpoint

    ck = ref if isinstance(ref, Checkpoint) else open_checkpoint(ref)
    return {name: getattr(torch, t.dtype) for name, t in ck.tensors.items() if hasattr(torch, t.dtype)}


def to_stored_dtypes(model, stored: dict[str, torch.dtype]) -> None:
    """Casts each parameter back to its own stored dtype (mixed-dtype checkpoints stay mixed, so an
    untrained element round-trips bit for bit); names the checkpoint lacks take its commonest
    floating dtype."""
    floats = [d for d in stored.values() if d.is_floating_point]
    default = max(set(floats), key=floats.count) if floats else torch.float32
    with torch.no_grad():
        for name, p in model.named_parameters():
            dt = stored.get(name, default)
            if p.dtype != dt:
                p.data = p.data.to(dt)


def outside_mask_changed(start: str | Path, final: str | Path, mask) -> int | None:
    """Elements that differ (not bit-identical) between start and final weights outside the mask
    (must be 0); None for a full fine-tune."""
    if mask is None:
        return None
    from analysis.sparsity.diff import diff_checkpoints

    outside = 0

    def check(name, changed):
        nonlocal outside
        m = mask.get(name)
        outside += int(changed.sum()) if m is None else int((changed & ~m).sum())

    diff_checkpoints(start, final, tol=0.0, on_mask=check)
    return outside
