"""PyTorch ``.bin`` / ``.pt`` state dicts, read with ``torch.load(weights_only=True)`` only: a file that
holds anything but tensors is refused, never unpickled."""

from __future__ import annotations

from pathlib import Path

from analysis.checkpoints.files import CheckpointError, open_regular, os_reason
from analysis.errors import one_line, quoted


def torch_load(path: Path) -> dict:
    """``torch.load(weights_only=True)``, memory-mapped when the file is a zip archive.

    weights_only refuses any pickled object other than tensors and plain containers, so a
    payload that would run code is rejected before anything executes. The file is first
    opened here (a regular file only, non-blocking), so that a FIFO or an unreadable file is
    a one-line error rather than a hang or a traceback from inside torch.
    """
    import pickle

    import torch

    f, _ = open_regular(path)
    with f:
        try:
            is_zip = f.read(4) == b"PK\x03\x04"  # the test torch.load itself applies
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read: {os_reason(e)}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        refused = next((ln for ln in lines if "GLOBAL" in ln), None)
        if refused is not None:  # a real pickle naming a callable: never run
            what = refused.split("WeightsUnpickler error:")[-1].split(". Please")[0]
            raise CheckpointError(f"{path}: refused to unpickle: the file holds objects other than "
                                  f"tensors (torch.load weights_only=True): {one_line(what)}") from None
        problem = next((ln for ln in lines if ln.startswith("Unsupported")), lines[-1] if lines else "")
        raise CheckpointError(f"{path}: not a readable PyTorch state dict (not a pickle torch reads: "
                              f"{one_line(problem)})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {os_reason(e)}") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch state dict ({one_line(e)})") from None
    for key in ("state_dict", "model"):  # common training-checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict (expected a dict of tensors)")
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{path}: not a state dict (key {quoted(bad[0])} is a {type(bad[0]).__name__}, "
                              f"not a name)")
    return obj


def torch_tensors(path: Path) -> dict[str, tuple]:
    sd = torch_load(path)
    return {n: (tuple(t.shape), str(t.dtype).replace("torch.", ""), str(path)) for n, t in sd.items()}

