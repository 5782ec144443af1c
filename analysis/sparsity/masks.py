"""Masks: one bool tensor per parameter, saved as packed bits in safetensors.

On disk (docs/design.md §5): per parameter a uint8 tensor of ``numpy.packbits`` of the
row-major flattened mask (big-endian bit order), and ``__metadata__`` =
``{"format": "subnetscope.mask/1", "shapes": "<json {name: shape}>", "source": "..."}``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from analysis.checkpoints import read_safetensors_header
from analysis.errors import LINE_BREAKS, SubnetscopeError, one_line, quoted
from analysis.io import write_atomic

FORMAT = "subnetscope.mask/1"
Mask = dict[str, torch.Tensor]  # name -> BoolTensor shaped like the parameter


class MaskError(SubnetscopeError):
    """A mask file or mask operation that cannot be used, in one line."""

    def __init__(self, message: str):
        super().__init__(str(message).translate(LINE_BREAKS))


def save_mask(path: str | Path, mask: Mask, source: str = "") -> Path:
    """Writes a mask atomically in the packed-bits safetensors format.

    Args:
        path: output ``.safetensors`` file.
        mask (dict[str, BoolTensor]): the mask.
        source (str): where it came from (e.g. "diff base→rl-seed1 tol=…").
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
    """Reads a mask file written by :func:`save_mask`.

    Everything the file declares is checked against the file before a bit is unpacked: a
    valid safetensors file (``read_safetensors_header``), the mask format tag, ``shapes`` a
    JSON object of tensor name -> list of non-negative integers naming exactly the stored
    tensors, and each tensor a 1-D uint8 array of exactly ⌈numel / 8⌉ bytes (packed bits;
    a bool or float mask stored unpacked is refused, not reinterpreted).

    Args:
        path: a ``.safetensors`` mask file.
    Returns:
        dict[str, BoolTensor]: name -> mask shaped as recorded.
    Raises:
        MaskError (or CheckpointError for a file that is not valid safetensors): one line
        naming the file and the problem.
    """
    from safetensors import safe_open

    path = Path(path)
    if not os.path.lexists(path):
        raise MaskError(f"{path}: no such mask file")
    header, meta = read_safetensors_header(path)  # regular file, complete, consistent offsets
    if meta.get("format") != FORMAT:
        raise MaskError(f"{path}: not a Subnetscope mask (format {quoted(meta.get('format'))}, expected {FORMAT})")
    shapes = _recorded_shapes(path, meta)
    for name in shapes:
        if name not in header:
            raise MaskError(f"{path}: the metadata gives a shape for {quoted(name)}, but the file holds no such tensor")
    sizes = {}
    for name, t in header.items():
        if name not in shapes:
            raise MaskError(f"{path}: tensor {quoted(name)} has no shape in the metadata")
        shape = shapes[name]
        if t["dtype"] != "U8" or len(t["shape"]) != 1:
            raise MaskError(f"{path}: tensor {quoted(name)} is stored unpacked or reshaped ({t['dtype']} of shape "
                            f"{t['shape']}); a mask stores a 1-D uint8 tensor of packed bits (numpy.packbits)")
        n = _numel(path, name, shape)
        need, have = (n + 7) // 8, t["shape"][0]
        if have != need:
            what = "short of" if have < need else "more than"
            raise MaskError(f"{path}: tensor {quoted(name)} holds {have} bytes of packed bits, {what} the {need} "
                            f"that its shape {shape} ({n} elements) needs")
        sizes[name] = n
    out: Mask = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name, n in sizes.items():
                bits = np.unpackbits(f.get_tensor(name).numpy(), count=n, bitorder="big")
                out[name] = torch.from_numpy(bits.astype(bool)).reshape(shapes[name])
    except Exception as e:  # the file changed since its header was checked
        raise MaskError(f"{path}: cannot read the mask: {one_line(e)}") from None
    return out


def _recorded_shapes(path: Path, meta: dict) -> dict[str, list[int]]:
    """The ``shapes`` metadata entry: a JSON object of name -> list of non-negative integers."""
    if "shapes" not in meta:
        raise MaskError(f"{path}: mask metadata has no 'shapes'")

    def no_duplicates(pairs):
        d = dict(pairs)
        if len(d) != len(pairs):
            raise ValueError("a name appears twice")
        return d

    try:
        shapes = json.loads(meta["shapes"], object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as e:
        raise MaskError(f"{path}: mask metadata 'shapes' is not valid JSON "
                        f"({one_line(e) or 'nested too deeply'})") from None
    if not isinstance(shapes, dict):
        raise MaskError(f"{path}: mask metadata 'shapes' is a JSON {type(shapes).__name__}, "
                        f"expected an object of tensor name -> shape")
    for name, shape in shapes.items():
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise MaskError(f"{path}: mask metadata gives {quoted(name)} the shape {quoted(shape)}, "
                            f"not a list of non-negative integers")
    return shapes


def _numel(path: Path, name: str, shape: list[int]) -> int:
    """Element count, refused as soon as it exceeds 2⁶⁴ (no bignum products from a hostile file)."""
    n = 1
    for d in shape:
        n *= d
        if n >= 2**64:
            raise MaskError(f"{path}: mask metadata gives {quoted(name)} the shape {quoted(shape)}, "
                            f"which overflows 64 bits")
    return n


def count(mask: Mask) -> tuple[int, int]:
    """(selected elements, total elements)."""
    return sum(int(m.sum()) for m in mask.values()), sum(m.numel() for m in mask.values())


def per_tensor(mask: Mask) -> list[dict]:
    """Each tensor with a selected element: ``{tensor, selected, numel, fraction selected}``, in the
    mask's order (a page's "where the top-k lands" table)."""
    rows = []
    for n, m in mask.items():
        k = int(m.sum())
        if k:
            rows.append({"tensor": n, "selected": k, "numel": m.numel(), "fraction selected": k / m.numel()})
    return rows


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
