"""The optimizers of a run behind one interface: :class:`SparseMaskedAdamW` (compact fp32 state
of the masked elements) and :class:`DenseAdamW` (torch's AdamW: full and LoRA runs, and the
masked reference mode), so the trainer never asks which one it holds.

The interface: ``lr`` (settable), ``trainable``, ``set_active(names)`` (LISA), ``zero_grad()``,
``step_averaged(dist, averaged=False) -> grad norm``, ``state_bytes()``, ``state_dict()`` /
``load_state_dict()``, ``weights_to_save()`` and ``mask()``.
"""

from __future__ import annotations

import torch
from torch import nn

from analysis.finetune.sparse_adamw import SparseMaskedAdamW, masked_reference_step

Mask = dict[str, torch.Tensor]


class DenseAdamW:
    """``torch.optim.AdamW`` (weight decay 0) over the trained parameters, with
    :class:`SparseMaskedAdamW`'s interface.

    With a ``mask`` it is the reference mode: every gradient outside the mask is zeroed before the
    step (:func:`masked_reference_step`), so an element never selected never moves.

    Args:
        params (dict[str, nn.Parameter]): every parameter of the model, by name.
        trained (list[str]): the names the optimizer steps (the others get no gradient).
        mask (Mask, optional): the reference mode's mask. Default: None (train ``trained`` whole).
        lr (float): the learning rate.
        foreach (bool, optional): torch's ``foreach`` switch (the reference mode sets False, as
            its masked gradients are edited in place). Default: None (torch's choice).
    """

    def __init__(self, params: dict[str, nn.Parameter], trained: list[str], mask: Mask | None = None, *,
                 lr: float, foreach: bool | None = None):
        self.params, self.trained, self.fixed_mask = params, list(trained), mask
        self.torch = torch.optim.AdamW([params[n] for n in self.trained], lr=lr, weight_decay=0.0, foreach=foreach)
        self.trainable = (sum(int(m.sum()) for m in mask.values()) if mask is not None
                          else sum(params[n].numel() for n in self.trained))

    @property
    def lr(self) -> float:
        return self.torch.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.torch.param_groups:
            group["lr"] = value

    def mask(self) -> Mask | None:
        """The reference mode's mask (None: whole parameters)."""
        return self.fixed_mask

    def set_active(self, names: set[str] | None) -> None:
        """Nothing to do: LISA's inactive parameters lose ``requires_grad``, get no gradient, and
        torch's AdamW skips a parameter without one."""

    def zero_grad(self) -> None:
        self.torch.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step_averaged(self, dist, *, averaged: bool = False) -> float:
        """Averages the gradients across processes (unless ``averaged``), steps, and returns the
        L2 norm of the gradient inside the mask (or of the whole gradient)."""
        trained = [p for p in self.params.values() if p.requires_grad]
        if not averaged:
            dist.average_grads(trained)
        parts = []
        for n, p in self.params.items():
            if p.grad is None:
                continue
            if self.fixed_mask is None:
                parts.append(p.grad)
            elif n in self.fixed_mask:
                parts.append(p.grad[self.fixed_mask[n].to(p.grad.device)])
        norm = float(torch.nn.utils.get_total_norm([g.float() for g in parts])) if parts else 0.0
        if self.fixed_mask is None:
            self.torch.step()
        else:
            masked_reference_step(self.torch, self.params, self.fixed_mask)
        return norm

    def state_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for s in self.torch.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))

    def state_dict(self) -> dict:
        return self.torch.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.torch.load_state_dict(state)

    def weights_to_save(self) -> dict[str, torch.Tensor]:
        """The trained weights (torch's state holds only the moments)."""
        return {n: self.params[n].detach().cpu().clone() for n in self.trained}


def make_optimizer(kind: str, params: dict[str, nn.Parameter], trained: list[str], mask: Mask | None, *,
                   lr: float) -> SparseMaskedAdamW | DenseAdamW:
    """The optimizer of a run.

    Args:
        kind (str): ``sparse`` or ``reference``: how a mask is trained (ignored without one).
        params (dict): every parameter by name.
        trained (list[str]): the parameters trained (whole, or where the mask selects elements).
        mask (Mask, optional): the elements to train; None: ``trained`` whole (full and LoRA runs).
        lr (float): the learning rate.
    """
    if mask is None:
        return DenseAdamW(params, trained, lr=lr)
    if kind == "sparse":
        return SparseMaskedAdamW(params, mask, lr=lr)
    return DenseAdamW(params, trained, mask, lr=lr, foreach=False)
