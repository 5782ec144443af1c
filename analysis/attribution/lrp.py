"""Layer-wise Relevance Propagation for transformers, as input × modified gradient.

Inside :func:`lrp_rules` a model's backward pass computes a *modified* gradient such that
``relevance = activation × gradient`` at any tensor (input embeddings, residual stream, a head's
output) is the LRP relevance of that tensor for the output the backward starts from. Two variants:

- ``"cp"`` — CP-LRP (Ali et al., *XAI for Transformers: Better Explanations through Conservative
  Propagation*, ICML 2022): attention weights are constants (no gradient through query and key),
  normalisation layers are linear in their input (the normaliser 1/σ detached), element-wise
  activations by the identity rule, and in gated MLPs the gate is a constant. On a model without
  biases the modified network is linear in its input embeddings, so relevance is conserved
  exactly (up to float rounding): Σ relevance = target logit.
- ``"attn"`` — AttnLRP (Achtibat et al., *AttnLRP: Attention-Aware Layer-Wise Relevance Propagation
  for Transformers*, ICML 2024): the same rules for norms and activations; the products of two
  input-dependent tensors (Q·Kᵀ, A·V, the gated MLP's act(gate)·up) by the uniform rule — each
  factor gets half the relevance, i.e. the gradient to query and key is divided by 4 and to the
  value by 2 — and the softmax by its plain gradient (a Taylor decomposition at the input, whose
  bias term is lost: AttnLRP does not conserve exactly through attention).

The rules are applied **per model instance**: instance attributes ``forward`` on the norm, MLP and
activation modules of this model, and an attention function registered through transformers'
``AttentionInterface`` and selected with ``set_attn_implementation`` on this model only. Leaving the
context deletes the instance forwards and selects the previous attention implementation, so the
model is exactly as before. Nothing is patched process-wide.

Written here because the reference implementation (the ``lxt`` package) patches classes and
module-level functions process-wide (every Llama in the process, ``nn.Dropout``) without an undo,
fails on transformers 5.x and pins a different torch; its rules (``lxt/efficient/rules.py``) are
the ones implemented below.

LRP is a patented technology (Fraunhofer HHI); it is free for research and personal use.
"""

from __future__ import annotations

import types
import weakref
from contextlib import contextmanager

import torch
from torch import nn

from analysis.errors import SubnetscopeError

VARIANTS = {"cp": "CP-LRP", "attn": "AttnLRP"}
FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "bert")  # model_type values the rules are defined for
ATTENTION = {"cp": "subnetscope-lrp-cp", "attn": "subnetscope-lrp-attn"}  # AttentionInterface names


class LRPError(SubnetscopeError):
    """A model or variant the rules are not defined for, in one line."""


# The rules in gradient form, composed of native autograd operations (no Python autograd.Function:
# on SmolLM2 the 120 custom-function calls of AttnLRP cost a third of the backward). Each keeps the
# forward value exactly — ``v + (x - x.detach()) * r`` adds an exact zero — and multiplies the
# gradient reaching x by r.

def _with_gradient_factor(value: torch.Tensor, x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """``value`` (computed without gradient) whose gradient reaches ``x`` multiplied by ``factor``."""
    return value + (x - x.detach()) * factor


def scale_grad(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Identity forward; the gradient divided by ``factor`` (a power of two): the uniform rule.

    Each halving is ``x/2 + (x/2).detach()``: x/2 is exact in binary floating point, so the value is
    x bit for bit (subnormals aside) and the gradient is halved."""
    if factor < 1 or factor & (factor - 1):
        raise ValueError(f"scale_grad divides by a power of two, not {factor}")
    while factor > 1:
        half = x * 0.5
        x = half + half.detach()
        factor //= 2
    return x


def identity_rule(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` exactly, with the gradient to x multiplied by fn(x) / x, so x·grad_x = y·grad_y: an
    element-wise non-linearity passes its relevance on unchanged (AttnLRP's identity rule)."""
    with torch.no_grad():
        y = fn(x)
        ratio = torch.where(x != 0, y / torch.where(x != 0, x, 1), 0)
    return _with_gradient_factor(y, x, ratio) if x.requires_grad else y


def epsilon_rule(z: torch.Tensor, eps: float) -> torch.Tensor:
    """A linear layer's output z unchanged, with the gradient times z / (z + ε·sign(z)): the
    relevance z·grad of each output is split over the inputs in proportion to x_i·w_ij, ε absorbing
    part of it (LRP-ε; ε = 0 is gradient × input)."""
    with torch.no_grad():
        ratio = z / (z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype))
    return _with_gradient_factor(z.detach(), z, ratio) if z.requires_grad else z


# ----------------------------------------------------------------------------- instance forwards

def _rms_norm_forward(self, hidden_states):
    # LlamaRMSNorm / Qwen2RMSNorm / MistralRMSNorm, the same operations, with 1/rms a constant
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon).detach()
    return self.weight * hidden_states.to(input_dtype)


def _layer_norm_forward(self, x):
    mean = x.mean(-1, keepdim=True)
    centered = x - mean
    std = (centered.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
    y = centered / std.detach()
    if self.weight is not None:
        y = y * self.weight
    if self.bias is not None:
        y = y + self.bias
    return y


def identity_forward(module: nn.Module):
    """An instance forward applying ``module``'s own (element-wise) forward by the identity rule."""
    original = type(module).forward.__get__(module)

    def forward(self, x):
        return identity_rule(original, x)
    return forward


def epsilon_forward(module: nn.Module, eps: float):
    """An instance forward of a linear layer (``nn.Linear``, GPT-2's ``Conv1D``) by the LRP-ε rule."""
    original = type(module).forward.__get__(module)

    def forward(self, x):
        return epsilon_rule(original(x), eps)
    return forward


def _gated_mlp_cp(self, x):
    return self.down_proj(self.act_fn(self.gate_proj(x).detach()) * self.up_proj(x))


def _gated_mlp_attn(self, x):
    return self.down_proj(scale_grad(self.act_fn(self.gate_proj(x)) * self.up_proj(x), 2))


def _attention(variant: str):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, *args, **kwargs):
        if variant == "cp":
            query, key = query.detach(), key.detach()
        else:
            query, key, value = scale_grad(query, 4), scale_grad(key, 4), scale_grad(value, 2)
        kwargs["dropout"] = 0.0
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)
    return attention


def _register_attention() -> None:
    """Adds the two attention functions (and sdpa's mask format for them) to transformers'
    registries; selecting them is per model (``set_attn_implementation``)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for variant, name in ATTENTION.items():
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _attention(variant))
            AttentionMaskInterface.register(name, sdpa_mask)


# element-wise non-linearities: transformers' ACT2FN classes and torch's
_ACTIVATIONS = (nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Mish, nn.LeakyReLU, nn.ELU, nn.Sigmoid)
# where the supported families keep theirs (Llama/Qwen2 MLP, GPT-2 MLP, BERT intermediate and MLM head)
_ACTIVATION_ATTRS = ("act_fn", "act", "intermediate_act_fn", "transform_act_fn")


def _is_activation(m) -> bool:
    return isinstance(m, _ACTIVATIONS) or type(m).__module__ == "transformers.activations"


_RULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(variant, ε): changes}


def _rules(model: nn.Module, variant: str, epsilon: float) -> list[tuple[nn.Module, object]]:
    """(module, new forward) for every module this variant changes; found once per model instance
    (a model's modules do not change; the forwards only refer to their own module)."""
    cache = _RULES.setdefault(model, {})
    if (variant, epsilon) not in cache:
        cache[(variant, epsilon)] = _find_rules(model, variant, epsilon)
    return cache[(variant, epsilon)]


def _find_rules(model: nn.Module, variant: str, epsilon: float) -> list[tuple[nn.Module, object]]:
    from transformers.pytorch_utils import Conv1D

    out = []
    for m in model.modules():
        if epsilon and isinstance(m, (nn.Linear, Conv1D)):
            out.append((m, epsilon_forward(m, epsilon)))
        name = type(m).__name__
        if isinstance(m, nn.LayerNorm):
            out.append((m, _layer_norm_forward))
        elif name.endswith("RMSNorm"):
            if not hasattr(m, "variance_epsilon") or getattr(m, "weight", None) is None:
                raise LRPError(f"LRP: {name} is not the RMSNorm the rules are written for")
            out.append((m, _rms_norm_forward))
        if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            out.append((m, _gated_mlp_cp if variant == "cp" else _gated_mlp_attn))
        for attr in () if _is_activation(m) else _ACTIVATION_ATTRS:
            act = getattr(m, attr, None)
            if act is not None and not isinstance(act, nn.Module):
                raise LRPError(f"LRP: {type(m).__name__}.{attr} is a plain function, the identity rule "
                               "needs an activation module")
        if _is_activation(m):
            out.append((m, identity_forward(m)))
    return out


def check_model(model: nn.Module) -> str:
    """The model's family if the rules are defined for it; :class:`LRPError` otherwise."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in FAMILIES:
        raise LRPError(f"LRP rules are defined for {', '.join(FAMILIES)} models, not {family or type(model).__name__}")
    return family


@contextmanager
def instance_forwards(changes):
    """Gives each module of ``changes`` (pairs ``(module, forward(self, ...))``) an instance
    ``forward`` for a ``with`` block; on exit, also after an exception, the instance attributes are
    removed (or the ones that were there before put back), so the class forward runs again."""
    patched: list[tuple[nn.Module, object]] = []
    try:
        for m, fn in changes:
            patched.append((m, m.__dict__.get("forward")))
            m.forward = types.MethodType(fn, m)
        yield
    finally:
        for m, before in reversed(patched):
            if before is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = before


@contextmanager
def lrp_rules(model: nn.Module, variant: str = "cp", *, epsilon: float = 0.0):
    """Applies the LRP rules of ``variant`` to this model instance for a ``with`` block.

    Inside, ``input × gradient`` of any tensor is its LRP relevance for the output the backward
    starts from; the forward values are unchanged (up to float rounding in LayerNorm). The model is
    put in eval mode (no dropout) inside. On exit — also after an exception — every instance
    forward is removed, the previous attention implementation selected and the training flags
    restored: the model computes exactly what it did before.

    Args:
        model (nn.Module): a Hugging Face Llama / Mistral / Qwen2 / GPT-2 / BERT model.
        variant (str): ``"cp"`` (CP-LRP) or ``"attn"`` (AttnLRP). Default: ``"cp"``.
        epsilon (float): LRP-ε on every linear layer (ε absorbs relevance; it stabilises the
            division by small pre-activations). Default: 0 (gradient × input on linear layers).
    Raises:
        LRPError: an unknown variant or a model family without rules.
    """
    if variant not in VARIANTS:
        raise LRPError(f"unknown LRP variant {variant!r}; one of {', '.join(VARIANTS)}")
    if not (isinstance(epsilon, (int, float)) and 0 <= epsilon < float("inf")):
        raise LRPError(f"LRP-ε needs a finite ε >= 0, got {epsilon!r}")
    check_model(model)
    changes = _rules(model, variant, float(epsilon))
    _register_attention()
    previous = model.config._attn_implementation
    modes = [(m, m.training) for m in model.modules()]
    try:
        with instance_forwards(changes):
            model.set_attn_implementation(ATTENTION[variant])
            model.eval()
            yield model
    finally:
        model.set_attn_implementation(previous)
        for m, mode in modes:
            m.training = mode
