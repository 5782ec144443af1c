"""A loaded model's parts by the names of :mod:`analysis.checkpoints.structure`: its floating-point
parameters, linear modules (``nn.Linear`` and GPT-2's ``Conv1D``), transformer blocks, the module
of one kind in each block, the row axis of a stored weight, names matched to parameters — and
:func:`hooks`, the one place forward hooks are registered (removed in ``finally``). Shared by the
selectors, attribution and patching."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from analysis.checkpoints.structure import (Architecture, architecture_from_config, block_index, normalize_name,
                                            tensor_role)

_CONV1D_KINDS = ("qkv", "o", "up", "down")  # GPT-2 Conv1D weights, stored [in, out]


def parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Floating-point parameters by ``named_parameters()`` name (tied weights once)."""
    return {n: p for n, p in model.named_parameters() if p.is_floating_point()}


def architecture(model: nn.Module) -> Architecture:
    """The model's :class:`Architecture` from its config (family from names when it has none)."""
    return architecture_from_config(getattr(model, "config", None), [n for n, _ in model.named_parameters()])


def num_layers(arch: Architecture, shapes) -> int:
    """Transformer blocks: from the config, else one more than the largest layer index in names."""
    if arch.num_layers:
        return arch.num_layers
    layers = [tensor_role(n, arch.family).layer for n in shapes]
    return max((L for L in layers if L is not None), default=-1) + 1


def row_axis(name: str, arch: Architecture) -> int:
    """Axis of the stored 2-D weight that indexes output units: 0 for ``nn.Linear`` and
    embeddings (``[out, in]``), 1 for GPT-2's ``Conv1D`` (``[in, out]``)."""
    kind = tensor_role(name, arch.family).kind
    return 1 if arch.family == "gpt2" and kind in _CONV1D_KINDS else 0


def linear_modules(model: nn.Module) -> dict[str, tuple[nn.Module, str, int]]:
    """Every ``nn.Linear`` and GPT-2 ``Conv1D``.

    Returns:
        dict: module name -> (module, name of its weight in ``named_parameters()`` — for tied
        weights the name it is listed under, input axis of the stored weight: 1 for
        ``nn.Linear`` ``[out, in]``, 0 for ``Conv1D`` ``[in, out]``).
    """
    from transformers.pytorch_utils import Conv1D

    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for mname, m in model.named_modules():
        if isinstance(m, (nn.Linear, Conv1D)) and id(m.weight) in names:
            out[mname] = (m, names[id(m.weight)], 1 if isinstance(m, nn.Linear) else 0)
    return out


def modules_of_kind(model: nn.Module, kind: str) -> dict[int, tuple[nn.Module, str, int]]:
    """The linear module of one kind (``"o"``, ``"down"`` ...) in each block, by layer index."""
    arch = architecture(model)
    out = {}
    for mname, entry in linear_modules(model).items():
        role = tensor_role(mname + ".weight", arch.family)
        if role.kind == kind and role.layer is not None:
            out[role.layer] = entry
    return out


def block_modules(model: nn.Module) -> dict[int, nn.Module]:
    """The transformer blocks (``model.layers.3``, ``transformer.h.3``, ``encoder.layer.3``) by index."""
    out = {}
    for mname, m in model.named_modules():
        index = block_index(mname)
        if index is not None:
            out.setdefault(index, m)
    return dict(sorted(out.items()))


def align_names(names, targets) -> tuple[dict[str, str], list[str], list[str]]:
    """Matches tensor names of a checkpoint or mask to model parameter names.

    Names are compared after :func:`~analysis.checkpoints.structure.normalize_name` (``model.`` etc.
    stripped), so a diff of stored tensors lines up with ``model.named_parameters()``.

    Returns:
        tuple: (source name -> target name, target names not matched, source names not matched).
    """
    by_key = {normalize_name(t): t for t in targets}
    matched, extra = {}, []
    for n in names:
        t = by_key.get(normalize_name(n))
        if t is None:
            extra.append(n)
        else:
            matched[n] = t
    used = set(matched.values())
    return matched, [t for t in targets if t not in used], extra


@contextmanager
def hooks(*, pre=(), post=()):
    """Registers forward hooks for the duration of a ``with`` block; removes them in ``finally``.

    Args:
        pre: ``(module, fn)`` pairs; ``fn(module, args, kwargs)`` may return new ``(args, kwargs)``.
        post: ``(module, fn)`` pairs; ``fn(module, args, kwargs, output)``.
    """
    handles = []
    try:
        for module, fn in pre:
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        for module, fn in post:
            handles.append(module.register_forward_hook(fn, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
