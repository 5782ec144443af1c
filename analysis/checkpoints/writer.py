"""Writing a safetensors file tensor by tensor (and a sharded directory's index).

safetensors' own writers (``save_file``, ``save``) take every tensor of a file at once, so a shard
of a large checkpoint would be held in memory whole; this writer lays out the header from the
tensors' names, dtypes and shapes first (the format: an 8-byte little-endian header length, the
JSON header padded with spaces to a multiple of 8, then the tensors' bytes in header order), then
appends each tensor's bytes as it comes. The file is written to a temporary name and renamed when
the last tensor is in; anything short of that removes it. A file it writes is read back by
``safetensors.safe_open`` (tested).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from analysis.checkpoints.safetensors_header import ST_NAME

DTYPES = {torch_name: st for st, torch_name in ST_NAME.items()}  # torch dtype name -> safetensors dtype


class SafetensorsWriter:
    """``with SafetensorsWriter(path, [(name, dtype name, shape), ...]) as w: w.write(name, tensor)``,
    the tensors in the order declared."""

    def __init__(self, path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None):
        self.path = Path(path)
        self.entries = list(entries)
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        off = 0
        for name, dtype, shape in self.entries:
            if dtype not in DTYPES:
                raise ValueError(f"{self.path}: {name} is {dtype}, which safetensors does not store")
            size = math.prod(shape) * torch.empty((), dtype=getattr(torch, dtype)).element_size()
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [off, off + size]}
            off += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._head = struct.pack("<Q", len(raw)) + raw
        self._next = 0
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._f = None

    def __enter__(self):
        self._f = open(self._tmp, "wb")
        self._f.write(self._head)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, dtype, shape = self.entries[self._next]
        if name != want or str(tensor.dtype).removeprefix("torch.") != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{self.path}: expected {want} {dtype} {tuple(shape)}, got {name} {tensor.dtype} "
                             f"{tuple(tensor.shape)}")
        t = tensor.detach().to("cpu").contiguous()
        self._f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        self._next += 1

    def __exit__(self, kind, exc, tb):
        self._f.close()
        if kind is not None:
            self._tmp.unlink(missing_ok=True)
            return False
        if self._next != len(self.entries):
            self._tmp.unlink(missing_ok=True)
            raise ValueError(f"{self.path}: {len(self.entries) - self._next} tensor(s) never written")
        os.replace(self._tmp, self.path)
        return False


def shard_index(folder: Path, weight_map: dict[str, str], total_bytes: int) -> Path:
    """``model.safetensors.index.json`` of a sharded directory (the transformers convention; ``total_bytes``
    counts the tensors' bytes)."""
    p = Path(folder) / "model.safetensors.index.json"
    p.write_text(json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=1))
    return p
