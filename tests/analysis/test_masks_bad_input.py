"""Mask files (docs/design.md §5) that load_mask must refuse in one line naming the file,
before a bit is unpacked: short or long packed data, unpacked masks, malformed shapes."""

from __future__ import annotations

import json
import os
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from analysis.errors import SubnetscopeError
from analysis.sparsity.masks import FORMAT, load_mask, save_mask


def _packed(n_bytes: int) -> torch.Tensor:
    return torch.full((n_bytes,), 0xFF, dtype=torch.uint8)


def _mask(tensors: dict, shapes, fmt=FORMAT, drop=()):
    """A builder: a safetensors file holding `tensors` with mask metadata (shapes: an object, or raw text)."""
    def build(tmp_path):
        meta = {"format": fmt, "shapes": shapes if isinstance(shapes, str) else json.dumps(shapes), "source": "test"}
        for k in drop:
            meta.pop(k)
        p = tmp_path / "bad-mask.safetensors"
        save_file(tensors, p, metadata=meta)
        return p
    return build


def _fifo(tmp_path):
    os.mkfifo(tmp_path / "mask.safetensors")
    return tmp_path / "mask.safetensors"


def _directory(tmp_path):
    (tmp_path / "mask.safetensors").mkdir()
    return tmp_path / "mask.safetensors"


def _truncated(tmp_path):
    p = save_mask(tmp_path / "mask.safetensors", {"w": torch.ones(100, dtype=torch.bool)})
    p.write_bytes(p.read_bytes()[:-3])
    return p


W = {"w": _packed(2)}  # 2 bytes: exactly right for 9..16 elements
BAD_MASKS = [
    # packed data that does not match the recorded shape
    ("packed-shorter-than-shape", _mask({"w": _packed(11)}, {"w": [75_558]}),
     "tensor 'w' holds 11 bytes of packed bits, short of the 9445 that its shape [75558] (75558 elements) needs"),
    ("packed-longer-than-padding", _mask({"w": _packed(3)}, {"w": [2, 5]}),
     "tensor 'w' holds 3 bytes of packed bits, more than the 2 that its shape [2, 5] (10 elements) needs"),
    ("packed-for-empty-shape", _mask({"w": _packed(1)}, {"w": [0, 4]}),
     "holds 1 bytes of packed bits, more than the 0 that its shape [0, 4] (0 elements) needs"),
    ("shape-of-quadrillions", _mask(W, {"w": [2**30, 2**30]}),
     "short of the 144115188075855872 that its shape [1073741824, 1073741824] (1152921504606846976 elements) needs"),
    ("shape-overflows-64-bits", _mask(W, {"w": [2**40, 2**40]}),
     "gives 'w' the shape [1099511627776, 1099511627776], which overflows 64 bits"),
    # stored unpacked
    ("stored-as-bool", _mask({"w": torch.ones(3, dtype=torch.bool)}, {"w": [3]}),
     "tensor 'w' is stored unpacked or reshaped (BOOL of shape [3]); a mask stores a 1-D uint8 tensor of packed bits"),
    ("stored-as-float32", _mask({"w": torch.ones(2, 2)}, {"w": [2, 2]}),
     "is stored unpacked or reshaped (F32 of shape [2, 2])"),
    ("stored-as-2d-uint8", _mask({"w": torch.zeros(2, 1, dtype=torch.uint8)}, {"w": [2, 8]}),
     "is stored unpacked or reshaped (U8 of shape [2, 1])"),
    # malformed shapes metadata
    ("shapes-not-json", _mask(W, '{"w": [10]'), "mask metadata 'shapes' is not valid JSON"),
    ("shapes-nested-too-deeply", _mask(W, "[" * 100_000), "mask metadata 'shapes' is not valid JSON"),
    ("shapes-a-list", _mask(W, [[10]]),
     "mask metadata 'shapes' is a JSON list, expected an object of tensor name -> shape"),
    ("shape-a-string", _mask(W, {"w": "10"}), "gives 'w' the shape '10', not a list of non-negative integers"),
    ("shape-negative", _mask(W, {"w": [-10]}), "gives 'w' the shape [-10], not a list of non-negative integers"),
    ("shape-float", _mask(W, {"w": [10.0]}), "gives 'w' the shape [10.0], not a list of non-negative integers"),
    ("shape-bool", _mask(W, {"w": [True, 10]}), "gives 'w' the shape [True, 10], not a list"),
    ("shape-nan", _mask(W, '{"w": [NaN]}'), "gives 'w' the shape [nan], not a list"),
    ("shape-named-twice", _mask(W, '{"w": [10], "w": [12]}'), "'shapes' is not valid JSON (a name appears twice)"),
    ("shape-for-missing-tensor", _mask(W, {"w": [10], "v": [3]}),
     "the metadata gives a shape for 'v', but the file holds no such tensor"),
    ("tensor-without-shape", _mask({"w": _packed(2), "v": _packed(1)}, {"w": [10]}),
     "tensor 'v' has no shape in the metadata"),
    ("no-shapes", _mask(W, {"w": [10]}, drop=("shapes",)), "mask metadata has no 'shapes'"),
    # not a mask file at all
    ("other-format", _mask(W, {"w": [10]}, fmt="pt"),
     "not a Subnetscope mask (format 'pt', expected subnetscope.mask/1)"),
    ("no-format", _mask(W, {"w": [10]}, drop=("format",)), "not a Subnetscope mask (format None"),
    ("fifo", _fifo, "mask.safetensors: not a regular file: it is a FIFO (named pipe)"),
    ("directory", _directory, "mask.safetensors: not a regular file: it is a directory"),
    ("truncated", _truncated, "truncated: the header declares 13 bytes of tensor data but the file holds 10"),
    ("missing", lambda t: t / "nope.safetensors", "nope.safetensors: no such mask file"),
]


def test_bad_mask_table_size():
    assert len(BAD_MASKS) == 26
    assert len({c[0] for c in BAD_MASKS}) == len(BAD_MASKS)


@pytest.mark.parametrize("build,expected", [c[1:] for c in BAD_MASKS], ids=[c[0] for c in BAD_MASKS])
def test_bad_mask(build, expected, tmp_path):
    path = build(tmp_path)
    with pytest.raises(SubnetscopeError) as ei:
        load_mask(path)
    msg = str(ei.value)
    assert msg.splitlines() == [msg]
    assert msg.startswith(f"{path}: "), msg
    assert expected in msg, msg


def test_huge_recorded_shape_allocates_nothing(tmp_path):
    """A shape of 2^60 elements is refused from the numbers alone: no unpacking, no allocation."""
    path = _mask(W, {"w": [2**30, 2**30]})(tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(SubnetscopeError, match="short of the 144115188075855872"):
            load_mask(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak


def test_valid_masks_round_trip_exactly(tmp_path):
    """The checks refuse nothing save_mask writes: odd sizes (padding), scalars, empty tensors."""
    g = torch.Generator().manual_seed(0)
    mask = {"big": torch.rand(75_558, generator=g) < 0.3, "odd": torch.rand(3, 5, generator=g) < 0.5,
            "scalar": torch.tensor(True), "empty": torch.zeros(0, 7, dtype=torch.bool),
            "byte": torch.ones(2, 4, dtype=torch.bool)}
    path = save_mask(tmp_path / "m.safetensors", mask, source="test")
    back = load_mask(path)
    assert set(back) == set(mask)
    for k, m in mask.items():
        assert back[k].dtype == torch.bool and back[k].shape == m.shape
        assert torch.equal(back[k], m), k
    assert int(back["big"].sum()) == int(mask["big"].sum())
    assert sum(int(np.ceil(m.numel() / 8)) for m in mask.values()) == 9445 + 2 + 1 + 0 + 1
