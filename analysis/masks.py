"""Masks: one bool tensor per parameter, saved as packed bits in safetensors.

On disk (shared/DESIGN.md §5): per parameter a uint8 tensor of ``numpy.packbits`` of the
row-major flattened mask (big-endian bit order), and ``__metadata__`` =
``{"format": "subnetscope.mask/1", "shapes": "<json {name: shape}>", "source": "..."}``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from analysis.errors import SubnetscopeError
from analysis.io import write_atomic

FORMAT = "subnetscope.mask/1"
Mask = dict[str, torch.Tensor]  # name -> BoolTensor shaped like the parameter


class MaskError(SubnetscopeError):
    """A mask file or mask operation that cannot be used, in one line."""


def save_mask(path: str | Path, mask: Mask, source: str = "") -> Path:
    """Writes a mask atomically in the packed-bits safetensors format.

    Args:
        path: output ``.safetensors`` file.
        mask (dict[str, BoolTensor]): the mask.
        source (str): where it came from (e.g. "diff base→rl-seed1 tol=1e-05").
    """
    from safetensors.torch import save

    packed, shapes = {}, {}
    for name, m in mask.items():
        if m.dtype != torch.bool:
            raise MaskError(f"{name}: mask tensors must be bool, got {m.dtype}")
        flat = m.detach().cpu().contiguous().reshape(-1).numpy()
        packed[name] = torch.from_numpy(np.packbits(flat, bitorder="big"))
        shapes[name] = list(m.shape)
    meta = {"format": FORMAT, "shapes": json.dumps(shapes), "source": source}
    return write_atomic(path, save(packed, metadata=meta))


def load_mask(path: str | Path) -> Mask:
    """Reads a mask file written by :func:`save_mask`; one-line MaskError otherwise."""
    from safetensors import safe_open

    from analysis.checkpoints import read_safetensors_header

    path = Path(path)
    if not path.is_file():
        raise MaskError(f"{path}: no such mask file")
    _, meta = read_safetensors_header(path)  # clear errors for truncated / foreign files
    if meta.get("format") != FORMAT:
        raise MaskError(f"{path}: not a Subnetscope mask (format {meta.get('format')!r}, expected {FORMAT})")
    try:
        shapes = json.loads(meta["shapes"])
    except (KeyError, ValueError):
        raise MaskError(f"{path}: mask metadata has no valid 'shapes'") from None
    out: Mask = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            if name not in shapes:
                raise MaskError(f"{path}: tensor {name} has no shape in the metadata")
            n = math.prod(shapes[name])
            bits = np.unpackbits(f.get_tensor(name).numpy(), count=n, bitorder="big")
            out[name] = torch.from_numpy(bits.astype(bool)).reshape(shapes[name])
    return out


def mask_source(path: str | Path) -> str:
    from analysis.checkpoints import read_safetensors_header

    return read_safetensors_header(Path(path))[1].get("source", "")


def count(mask: Mask) -> tuple[int, int]:
    """(selected elements, total elements)."""
    return sum(int(m.sum()) for m in mask.values()), sum(m.numel() for m in mask.values())


def density(mask: Mask) -> float:
    k, n = count(mask)
    return k / n if n else float("nan")


def _check_compatible(masks: list[Mask]) -> None:
    if not masks:
        raise MaskError("no masks given")
    ref = masks[0]
    for i, m in enumerate(masks[1:], 1):
        if set(m) != set(ref):
            extra = sorted(set(m) ^ set(ref))[:3]
            raise MaskError(f"mask {i} covers different tensors than mask 0 (e.g. {', '.join(extra)})")
        for k in ref:
            if m[k].shape != ref[k].shape:
                raise MaskError(f"mask {i}: {k} has shape {tuple(m[k].shape)}, mask 0 {tuple(ref[k].shape)}")


def intersect(*masks: Mask) -> Mask:
    """Elements selected by every mask (∩)."""
    _check_compatible(list(masks))
    return {k: torch.stack([m[k] for m in masks]).all(0) for k in masks[0]}


def union(*masks: Mask) -> Mask:
    """Elements selected by any mask (∪)."""
    _check_compatible(list(masks))
    return {k: torch.stack([m[k] for m in masks]).any(0) for k in masks[0]}


def consensus(masks: list[Mask], k: int) -> Mask:
    """Elements selected by at least k of the masks."""
    _check_compatible(masks)
    if not 1 <= k <= len(masks):
        raise MaskError(f"consensus needs 1 ≤ k ≤ {len(masks)}, got {k}")
    return {n: torch.stack([m[n] for m in masks]).sum(0, dtype=torch.int32) >= k for n in masks[0]}
