"""What every importance selector shares (docs/design.md §6).

- :class:`Scores`, the one result type of every selector;
- :func:`scoring`, the context a selector runs in: eval mode, and on exit the model exactly as
  found (training flags of every module, ``requires_grad`` of every parameter);
- the calibration loops: :func:`loss_steps` / :func:`gradient_steps` (forward + backward through
  ``torch.autograd.grad``, so no ``.grad`` is ever written) and :func:`collect_activations`
  (no-grad forwards handing module inputs and outputs, padding dropped, to a callback);
- the model lookups of :mod:`analysis.checkpoints.modules` (parameters, linear modules, blocks, hooks).

HF models are never modified: hooks read activations (and, for the head mask, multiply them by
ones), parameters are only read.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator

import torch
from torch import nn

from analysis.definitions import GRANULARITIES  # noqa: F401 (re-exported)
from analysis.errors import SubnetscopeError
from analysis.checkpoints.modules import (align_names, architecture, block_modules, hooks,  # noqa: F401 (shared)
                                          linear_modules, modules_of_kind, num_layers, parameters, row_axis)
from analysis.checkpoints.structure import Architecture, tensor_role  # noqa: F401 (shared)

Batch = dict[str, torch.Tensor]  # "input_ids", "attention_mask", "labels": each [batch, pos]
Progress = Callable[[int, int, str], None]  # progress(done, total, what)

class SelectorError(SubnetscopeError):
    """A selector that cannot run as asked (unknown name, option or granularity, no data ...)."""


@dataclass
class Scores:
    """Importance from one selector at one granularity; higher means more important.

    ``values`` by ``granularity`` (float32, CPU):

    - ``element``: ``dict[name, Tensor]``, each shaped like the parameter ``name`` of
      ``model.named_parameters()``; a selector may leave out parameters it does not define
      (e.g. Wanda has no score for norms), listed in ``info["unscored"]``;
    - ``row``: ``dict[name, Tensor]``, ``# [rows]`` per 2-D parameter, rows being output units
      (see :func:`row_axis`);
    - ``head``: ``Tensor # [layers, heads]`` (query heads; GQA kv heads are shared by groups);
    - ``channel``: ``Tensor # [layers, channels]`` (MLP intermediate channels);
    - ``layer``: ``Tensor # [layers]`` (transformer blocks).

    ``arch`` and ``shapes`` (every parameter of the model, in model order) let aggregation,
    budgets and masks work from the scores alone, without the model.
    """

    selector: str
    granularity: str
    values: dict[str, torch.Tensor] | torch.Tensor
    arch: Architecture
    shapes: dict[str, tuple[int, ...]]
    info: dict = field(default_factory=dict)  # options used, calibration steps, unscored names

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise SelectorError(f"unknown granularity {self.granularity!r}; one of {', '.join(GRANULARITIES)}")

    @property
    def num_layers(self) -> int:
        return num_layers(self.arch, self.shapes)


def make_scores(selector: str, granularity: str, values, model: nn.Module, **info) -> Scores:
    """Builds :class:`Scores` for ``model``: values moved to float32 CPU, arch and shapes filled."""
    if isinstance(values, dict):
        values = {n: v.detach().float().cpu() for n, v in values.items()}
    else:
        values = values.detach().float().cpu()
    params = parameters(model)
    return Scores(selector, granularity, values, architecture(model),
                  {n: tuple(p.shape) for n, p in params.items()}, info)


# ----------------------------------------------------------------------------- model lookups

# ----------------------------------------------------------------------------- context

@contextmanager
def scoring(model: nn.Module, *, grad: bool = False):
    """Runs a selector on ``model`` in eval mode and restores it on exit, whatever happens.

    Args:
        model (nn.Module): the model to score; its parameters are never written.
        grad (bool, optional): make every floating parameter require grad while inside (gradient
            selectors differentiate with respect to all of them). Default: False.
    """
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        model.eval()
        if grad:
            for p in params:
                if p.is_floating_point():
                    p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


# ----------------------------------------------------------------------------- batches and loss

def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def prepare(batch: Batch, device) -> Batch:
    """Checks a batch and fills defaults: attention mask of ones, labels = inputs (−100 on padding)."""
    ids = batch.get("input_ids") if isinstance(batch, dict) else None
    if ids is None or ids.dim() != 2 or ids.is_floating_point():
        raise SelectorError("a calibration batch is a dict with integer 'input_ids' of shape [batch, pos]")
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    labels = batch.get("labels")
    labels = ids.masked_fill(mask == 0, -100) if labels is None else labels
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def split(batch: Batch, size: int) -> Iterator[Batch]:
    """Micro-batches of ``size`` sequences, trailing all-padding columns trimmed."""
    for i in range(0, batch["input_ids"].shape[0], size):
        part = {k: v[i:i + size] for k, v in batch.items()}
        cols = part["attention_mask"].any(0).nonzero()
        end = int(cols.max()) + 1 if len(cols) else 1
        yield {k: v[:, :end] for k, v in part.items()}


def forward(model: nn.Module, batch: Batch):
    """``model(input_ids, attention_mask)`` without a KV cache where the model takes ``use_cache``."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    return model(**kwargs)


def model_loss(model: nn.Module, batch: Batch, *, per_sequence: bool = False) -> torch.Tensor:
    """Next-token cross-entropy of a model on a batch (:func:`analysis.training.lm_loss`), on the
    labelled positions (labels −100 are ignored); 0 for a batch without labels.

    Args:
        per_sequence (bool, optional): one mean loss per sequence ``# [batch]`` instead of the mean
            over every labelled token of the batch (a scalar, as HF's ``labels=`` loss). Default: False.
    """
    from analysis.training import IGNORE
    from analysis.training import lm_loss

    logits = getattr(forward(model, batch), "logits", None)
    if logits is None:
        raise SelectorError(f"{type(model).__name__} has no language-modelling head; gradient selectors "
                            "need a loss (load the checkpoint as a causal LM)")
    if per_sequence:
        return lm_loss(logits, batch["labels"], reduction="sequence")
    count = (batch["labels"][:, 1:] != IGNORE).sum()
    return lm_loss(logits, batch["labels"], reduction="sum") / count.clamp(min=1)


def _require_data(batches, what: str) -> list:
    batches = list(batches or ())
    if not batches:
        raise SelectorError(f"{what} needs calibration data (no batches given)")
    return batches


def loss_steps(model: nn.Module, batches, *, micro_batch: int | None = None, per_sequence: bool = False,
               progress: Progress | None = None, what: str = "") -> Iterator[tuple[Batch, torch.Tensor]]:
    """The shared calibration loop of gradient selectors: yields ``(batch, loss)`` with autograd on.

    Args:
        batches (list[Batch]): calibration batches (moved to the model's device here).
        micro_batch (int, optional): split each batch into micro-batches of this many sequences,
            one loss each (``1`` gives per-sample losses). Default: None (whole batches).
        per_sequence (bool, optional): losses ``# [batch]`` instead of a scalar. Default: False.
        progress (callable, optional): ``progress(done, total, what)`` after each batch.
    Yields:
        tuple[Batch, Tensor]: the (micro-)batch and its loss; batches without a labelled token
        are skipped.
    """
    batches = _require_data(batches, what or "this selector")
    device = device_of(model)
    for i, raw in enumerate(batches):
        batch = prepare(raw, device)
        parts = split(batch, micro_batch) if micro_batch else (batch,)
        for part in parts:
            if not bool((part["labels"][:, 1:] != -100).any()):
                continue
            with torch.enable_grad():
                loss = model_loss(model, part, per_sequence=per_sequence)
            yield part, loss
        if progress is not None:
            progress(i + 1, len(batches), what)


def gradient_steps(model: nn.Module, batches, params: dict[str, torch.Tensor],
                   **loop) -> Iterator[dict[str, torch.Tensor]]:
    """One gradient of the loss per (micro-)batch of :func:`loss_steps`, by ``torch.autograd.grad``.

    Args:
        params (dict[str, Tensor]): the parameters to differentiate, by name (all must require grad).
        **loop: ``micro_batch``, ``progress``, ``what`` of :func:`loss_steps`.
    Yields:
        dict[str, Tensor]: name -> gradient shaped like the parameter (zeros where unused).
    """
    names, tensors = list(params), list(params.values())
    for _, loss in loss_steps(model, batches, **loop):
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        yield {n: torch.zeros_like(t) if g is None else g for n, t, g in zip(names, tensors, grads)}


def collect_activations(model: nn.Module, batches, modules: dict[str, nn.Module],
                        on_io: Callable[[str, torch.Tensor, torch.Tensor], None], *,
                        progress: Progress | None = None, what: str = "") -> int:
    """The shared forward-only loop: no-grad forwards with hooks handing module inputs and outputs on.

    Args:
        modules (dict[str, nn.Module]): key -> module to watch.
        on_io (callable): ``on_io(key, x_in, x_out)`` per call of a watched module, with the first
            positional input and the first output restricted to real tokens (attention mask 1):
            ``# [tokens, features]`` (float32; integer inputs such as token ids stay integer, ``# [tokens]``).
    Returns:
        int: real tokens seen.
    """
    batches = _require_data(batches, what or "this selector")
    device = device_of(model)
    state: dict = {}

    def hook(key):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
            y = output[0] if isinstance(output, (tuple, list)) else output
            on_io(key, _tokens(x, state["valid"]), _tokens(y, state["valid"]))
        return fn

    tokens = 0
    with hooks(post=[(m, hook(k)) for k, m in modules.items()]), torch.no_grad():
        for i, raw in enumerate(batches):
            batch = prepare(raw, device)
            state["valid"] = batch["attention_mask"].bool()
            tokens += int(state["valid"].sum())
            forward(model, batch)
            if progress is not None:
                progress(i + 1, len(batches), what)
    return tokens


def _tokens(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``# [batch, pos, ...]`` -> ``# [tokens, ...]`` of the real tokens (broadcast rows expanded)."""
    if x.shape[:2] != valid.shape:
        x = x.expand(*valid.shape, *x.shape[2:])
    x = x[valid]
    return x.float() if x.is_floating_point() else x
