"""AdamW on the masked elements of dense weights, with compact fp32 state.

The main path of docs/design.md §8: weights stay dense; after backward, the gradient entries of the
masked elements are gathered by flat index, AdamW runs on compact float32 copies of those
values (master weights and both moments), and the results are written back. Exact by
construction — an element outside the mask is never written — with optimizer memory
∝ density (master + two moments in float32 and an int64 index per masked element), and the
float32 master keeps updates smaller than half a bf16 step that bf16 weights would round away.

The arithmetic is torch's single-tensor AdamW (``torch.optim.AdamW(foreach=False)``) step for
step, so in float32 it gives bit-identical weights to the reference mode,
:func:`masked_reference_step`: full AdamW (weight decay 0, fresh state) on gradients zeroed
outside the mask with ``masked_fill_`` (``grad.mul_(mask)`` would let NaN·0 = NaN through).

Written here rather than taken from a library: PEFT's SHiRA needs exactly r·(m+n) ones per
Linear (arbitrary masks do not fit), and torch's sparse-gradient optimizers (SparseAdam) need
sparse embedding gradients, not a gather from dense ones.
"""

from __future__ import annotations

import torch
from torch import nn

from analysis.errors import SubnetscopeError


class MaskedOptimizerError(SubnetscopeError):
    """A mask that does not fit the parameters it should train, in one line."""


class SparseMaskedAdamW:
    """AdamW over the masked elements only.

    The state is kept in *segments*: one per parameter at construction, and one more each time
    :meth:`add` unmasks new elements of a parameter (ID3's incremental unmasking). A segment has
    its own step count, so elements unmasked late start with Adam's bias correction of a fresh
    state, as if their optimizer had been created then. :meth:`set_active` restricts the next
    steps to some parameters (LISA's layer sampling); inactive segments keep their state.

    Args:
        params (dict[str, nn.Parameter]): name -> parameter (e.g. ``dict(model.named_parameters())``).
        mask (dict[str, BoolTensor]): name -> elements to train, shaped like the parameter;
            parameters absent from the mask, or with no element selected, are not trained.
        lr (float): learning rate. Default: 1e-3.
        betas (tuple[float, float]): Default: (0.9, 0.999).
        eps (float): Default: 1e-8.
        weight_decay (float): decoupled weight decay, applied to masked elements only.
            Default: 0 (AdamW's decay would otherwise move every element it touches).
    """

    def __init__(self, params: dict[str, nn.Parameter], mask: dict[str, torch.Tensor], *, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.params = params
        self.groups: dict[str, dict] = {}  # segment key ("name" or "name#k") -> segment
        self.active: set[str] | None = None  # parameter names stepped (None: all)
        self.add(mask)

    # ------------------------------------------------------------------ the mask
    def add(self, mask: dict[str, torch.Tensor]) -> int:
        """Unmasks the elements of ``mask`` not trained yet (a new segment per parameter, fresh
        moments, step count 0). Returns the number of elements added."""
        unknown = sorted(set(mask) - set(self.params))
        if unknown:
            raise MaskedOptimizerError(f"the mask names {unknown[0]}, which the model does not have "
                                       f"({len(unknown)} unknown)")
        added = 0
        for name, m in mask.items():
            p = self.params[name]
            if tuple(m.shape) != tuple(p.shape):
                raise MaskedOptimizerError(f"mask {name} has shape {tuple(m.shape)}, the parameter {tuple(p.shape)}")
            flat = m.detach().reshape(-1).to(p.device, torch.bool)
            old = self.segments_of(name)
            if old:
                flat = flat.clone()
                for g in old:
                    flat[g["idx"]] = False
            # indices live here, not in an optimizer state dict: torch's state reload casts state
            # tensors to the parameter's dtype, which would turn int64 indices into floats
            idx = flat.nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            self._new_segment(name, idx)
            added += idx.numel()
        return added

    def _new_segment(self, name: str, idx: torch.Tensor) -> dict:
        p = self.params[name]
        key = name if name not in self.groups else f"{name}#{sum(1 for g in self.groups.values() if g['name'] == name)}"
        master = p.detach().reshape(-1)[idx].float().clone()  # [k] float32
        seg = {"name": name, "param": p, "idx": idx, "master": master, "step": 0,
               "exp_avg": torch.zeros_like(master), "exp_avg_sq": torch.zeros_like(master)}
        self.groups[key] = seg
        return seg

    def segments_of(self, name: str) -> list[dict]:
        return [g for g in self.groups.values() if g["name"] == name]

    def mask(self) -> dict[str, torch.Tensor]:
        """The elements trained so far, as a mask over the parameters that have any."""
        out: dict[str, torch.Tensor] = {}
        for g in self.groups.values():
            m = out.setdefault(g["name"], torch.zeros(g["param"].numel(), dtype=torch.bool, device=g["idx"].device))
            m[g["idx"]] = True
        return {n: m.reshape(self.params[n].shape) for n, m in out.items()}

    def set_active(self, names: set[str] | None) -> None:
        """Step only these parameters from now on (None: every segment)."""
        self.active = None if names is None else set(names)

    def _stepped(self) -> list[dict]:
        return [g for g in self.groups.values() if self.active is None or g["name"] in self.active]

    @property
    def trainable(self) -> int:
        """Elements trained (in any segment)."""
        return sum(g["idx"].numel() for g in self.groups.values())

    def state_bytes(self) -> int:
        """Optimizer memory: fp32 master + two fp32 moments + int64 indices per masked element."""
        return sum(sum(g[k].numel() * g[k].element_size() for k in ("idx", "master", "exp_avg", "exp_avg_sq"))
                   for g in self.groups.values())

    # ------------------------------------------------------------------ steps
    def zero_grad(self) -> None:
        for g in self.groups.values():
            g["param"].grad = None

    def gather_grads(self) -> dict[str, torch.Tensor | None]:
        """The gradient entries of the stepped segments, gathered by index after backward:
        segment key -> float32 ``[k]`` (None where the parameter got no gradient). In several
        processes these compact vectors are what gets averaged (communication ∝ density)."""
        return {key: None if g["param"].grad is None else g["param"].grad.reshape(-1)[g["idx"]].float()
                for key, g in self.groups.items() if self.active is None or g["name"] in self.active}

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor | None] | None = None) -> None:
        """One AdamW step on the masked elements (after ``loss.backward()``).

        Args:
            grads (dict, optional): gathered gradients as from :meth:`gather_grads` (e.g. averaged
                across processes). Default: None (gather them from ``.grad`` now).
        """
        grads = self.gather_grads() if grads is None else grads
        beta1, beta2 = self.betas
        for key, g in self.groups.items():
            grad = grads.get(key)
            if grad is None:
                continue
            g["step"] += 1
            step = g["step"]
            bias_correction1 = 1 - beta1 ** step
            bias_correction2 = 1 - beta2 ** step
            step_size = self.lr / bias_correction1
            bias_correction2_sqrt = bias_correction2 ** 0.5
            p = g["param"]
            master, exp_avg, exp_avg_sq = g["master"], g["exp_avg"], g["exp_avg_sq"]
            if self.weight_decay:
                master.mul_(1 - self.lr * self.weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            master.addcdiv_(exp_avg, denom, value=-step_size)
            p.view(-1).index_copy_(0, g["idx"], master.to(p.dtype))  # write back: only masked elements

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """Per segment its parameter, indices, step count, master values and moments (for resuming).
        Only tensors, strings and ints: loadable with ``torch.load(weights_only=True)``."""
        return {"groups": {key: {"name": g["name"], "step": g["step"],
                                 **{k: g[k].clone() for k in ("idx", "master", "exp_avg", "exp_avg_sq")}}
                           for key, g in self.groups.items()},
                "active": None if self.active is None else sorted(self.active)}

    def load_state_dict(self, state: dict) -> None:
        """Restores a saved state; segments added after construction (ID3) are recreated, and the
        masked weights are set to the saved float32 masters (so a resumed run continues exactly)."""
        for key, s in state["groups"].items():
            g = self.groups.get(key)
            idx = s["idx"].long()
            if g is None:
                if s["name"] not in self.params:
                    raise MaskedOptimizerError(f"optimizer state names {s['name']}, which the model does not have")
                g = self._new_segment(s["name"], idx.to(self.params[s["name"]].device))
                if key not in self.groups:
                    raise MaskedOptimizerError(f"optimizer state segment {key} does not fit this mask")
            elif not torch.equal(idx.to(g["idx"].device), g["idx"]):
                raise MaskedOptimizerError(f"optimizer state of {key} was saved for a different mask")
            for k in ("master", "exp_avg", "exp_avg_sq"):
                g[k].copy_(s[k])
            g["step"] = int(s["step"])
            with torch.no_grad():
                g["param"].view(-1).index_copy_(0, g["idx"], g["master"].to(g["param"].dtype))
        missing = set(self.groups) - set(state["groups"])
        if missing:
            raise MaskedOptimizerError(f"optimizer state lacks {sorted(missing)[0]} of this mask")
        self.active = None if state.get("active") is None else set(state["active"])

    # ------------------------------------------------------------------ the trainer's interface
    def step_averaged(self, dist, *, averaged: bool = False) -> float:
        """One step of a (possibly data-parallel) run: gathers the masked gradient entries, averages
        these compact vectors across processes (unless ``averaged``: the caller did it on the full
        gradients), and steps. Returns the L2 norm of the gradient stepped on.

        Args:
            dist (Distributed): the run's processes.
            averaged (bool): the ``.grad`` tensors already hold the mean over processes. Default: False.
        """
        grads = self.gather_grads()  # after backward, never in a hook
        if not averaged:
            keys = [k for k, g in grads.items() if g is not None]
            grads.update(zip(keys, dist.average([grads[k] for k in keys])))
        present = [g for g in grads.values() if g is not None]
        norm = float(torch.nn.utils.get_total_norm(present)) if present else 0.0
        self.step(grads)
        return norm

    def weights_to_save(self) -> dict[str, torch.Tensor]:
        """The weights a resumable state must hold besides :meth:`state_dict`: none (the float32
        masters in the state are the trained values; nothing else moved)."""
        return {}


def full_adamw_state_bytes(params: dict[str, nn.Parameter]) -> int:
    """What torch's AdamW keeps for the same parameters: two moments in the parameters' dtype
    (plus a step scalar each)."""
    return sum(2 * p.numel() * p.element_size() + 4 for p in params.values() if p.requires_grad)


def masked_reference_step(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter],
                          mask: dict[str, torch.Tensor]) -> None:
    """The reference mode: zero every gradient outside the mask with ``masked_fill_`` (NaN-safe),
    then a plain optimizer step. With AdamW (weight decay 0, fresh state) an element whose gradient
    was always zero keeps exp_avg = 0 and never moves."""
    for name, p in params.items():
        if p.grad is None:
            continue
        m = mask.get(name)
        if m is None:
            p.grad = None  # not trained at all
        else:
            p.grad.masked_fill_(~m.to(p.grad.device), 0.0)
    optimizer.step()


__all__ = ["MaskedOptimizerError", "SparseMaskedAdamW", "full_adamw_state_bytes", "masked_reference_step"]
