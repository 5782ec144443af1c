"""Several processes for one run: ``torchrun --standalone --nproc_per_node N`` or
``accelerate launch --multi_gpu --num_processes N`` start the same command N times with
``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` set; this module joins them
(gloo on CPU, nccl on CUDA) and averages what the run needs averaged.

Data parallel by hand rather than through DDP or accelerate's ``prepare``: the gradients are
averaged *after* backward, from the compact vectors the sparse optimizer gathers (communication
∝ density, not model size). A gradient hook (DDP's reducer, or a hook masking gradients) sees the
local, pre-averaging gradient; gathering after backward is what keeps every rank's update
identical. Every rank applies the same averaged update, so the weights stay bit-identical;
:func:`Distributed.digest` lets the run check that at the end.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where collective tensors live (the rank's GPU with nccl)
    owned: bool = False  # this module created the process group (and so destroys it)

    @classmethod
    def from_env(cls, device: torch.device) -> Distributed:
        """Joins the process group when launched with ``WORLD_SIZE`` > 1, else a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        owned = not dist.is_initialized()
        if owned:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), device=device, owned=owned)

    @staticmethod
    def local_device(device: torch.device) -> torch.device:
        """With several processes on CUDA, each rank uses the GPU of its ``LOCAL_RANK``."""
        if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
            return dev
        return device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def average(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The mean over ranks of each tensor (one flat all-reduce), as new float32 tensors."""
        if self.world == 1 or not tensors:
            return tensors
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1).float().to(self.device) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world
        out, at = [], 0
        for t in tensors:
            out.append(flat[at:at + t.numel()].view(t.shape).to(t.device))
            at += t.numel()
        return out

    def average_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Replaces each ``.grad`` by its mean over ranks (dense: full, reference and LoRA runs)."""
        have = [p for p in params if p.grad is not None]
        for p, g in zip(have, self.average([p.grad for p in have])):
            p.grad.copy_(g)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any (a cancel on one rank stops all)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable by torch.distributed; our own values only)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        """Destroys the process group if this module created it (a launcher's own group stays)."""
        if self.world > 1 and self.owned:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    @staticmethod
    def digest(model) -> str:
        """SHA-256 of every parameter's bytes, in name order (equal on every rank after a run)."""
        h = hashlib.sha256()
        for name, p in sorted(model.named_parameters()):
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
