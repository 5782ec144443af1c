"""AdamW on the masked elements of dense weights, with compact fp32 state.

The main path of DESIGN.md §8: weights stay dense; after backward, the gradient entries of the
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
        self.step_count = 0
        self.groups: dict[str, dict] = {}
        unknown = sorted(set(mask) - set(params))
        if unknown:
            raise MaskedOptimizerError(f"the mask names {unknown[0]}, which the model does not have "
                                       f"({len(unknown)} unknown)")
        for name, m in mask.items():
            p = params[name]
            if tuple(m.shape) != tuple(p.shape):
                raise MaskedOptimizerError(f"mask {name} has shape {tuple(m.shape)}, the parameter {tuple(p.shape)}")
            # indices live here, not in an optimizer state dict: torch's state reload casts state
            # tensors to the parameter's dtype, which would turn int64 indices into floats
            idx = m.detach().reshape(-1).to(p.device).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            master = p.detach().reshape(-1)[idx].float().clone()  # [k] float32
            self.groups[name] = {"param": p, "idx": idx, "master": master,
                                 "exp_avg": torch.zeros_like(master), "exp_avg_sq": torch.zeros_like(master)}

    @property
    def trainable(self) -> int:
        """Elements trained."""
        return sum(g["idx"].numel() for g in self.groups.values())

    def state_bytes(self) -> int:
        """Optimizer memory: fp32 master + two fp32 moments + int64 indices per masked element."""
        return sum(sum(g[k].numel() * g[k].element_size() for k in ("idx", "master", "exp_avg", "exp_avg_sq"))
                   for g in self.groups.values())

    def zero_grad(self) -> None:
        for g in self.groups.values():
            g["param"].grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW step on the masked elements (after ``loss.backward()``)."""
        self.step_count += 1
        beta1, beta2 = self.betas
        step = self.step_count
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = self.lr / bias_correction1
        bias_correction2_sqrt = bias_correction2 ** 0.5
        for g in self.groups.values():
            p = g["param"]
            if p.grad is None:
                continue
            grad = p.grad.reshape(-1)[g["idx"]].float()  # gather: [k]
            master, exp_avg, exp_avg_sq = g["master"], g["exp_avg"], g["exp_avg_sq"]
            if self.weight_decay:
                master.mul_(1 - self.lr * self.weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            master.addcdiv_(exp_avg, denom, value=-step_size)
            p.view(-1).index_copy_(0, g["idx"], master.to(p.dtype))  # write back: only masked elements

    def state_dict(self) -> dict:
        """Step count, and per parameter its indices, master values and moments (for resuming)."""
        return {"step": self.step_count,
                "groups": {n: {k: g[k].clone() for k in ("idx", "master", "exp_avg", "exp_avg_sq")}
                           for n, g in self.groups.items()}}

    def load_state_dict(self, state: dict) -> None:
        if set(state["groups"]) != set(self.groups):
            raise MaskedOptimizerError("optimizer state covers different parameters than the mask")
        for n, s in state["groups"].items():
            g = self.groups[n]
            if not torch.equal(s["idx"].long().to(g["idx"].device), g["idx"]):
                raise MaskedOptimizerError(f"optimizer state of {n} was saved for a different mask")
            for k in ("master", "exp_avg", "exp_avg_sq"):
                g[k].copy_(s[k])
        self.step_count = int(state["step"])


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


__all__ = ["SparseMaskedAdamW", "MaskedOptimizerError", "masked_reference_step", "full_adamw_state_bytes"]
