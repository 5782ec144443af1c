"""Importance selectors (docs/design.md §6): one module per selector, one explicit registry.

Every selector is ``score(model, batches, *, seed=0, progress=None, **options) -> Scores``
(:class:`~analysis.importance.selectors.base.Scores`): it runs its own forward/backward passes, removes its
hooks in ``finally``, and leaves the model as it found it (parameters, ``.grad``, training mode,
``requires_grad``). Adding a selector = adding a module and one line below; the contract test in
``tests/analysis/selectors`` then covers it. Turning scores into masks, aggregating them and
evaluating selectors is :mod:`analysis.importance.scores` and :mod:`analysis.importance.evaluation`.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from collections.abc import Callable

from analysis.importance.selectors import (block_influence, diff, fisher, fluctuation, head_importance, lisa, lrp,
                                           magnitude, principal, random, sensitivity, smallest_magnitude, taylor, wanda)
from analysis.importance.selectors.base import GRANULARITIES, Batch, Scores, SelectorError
from analysis.definitions import PAPER_TOL

__all__ = ["SELECTORS", "Selector", "Scores", "Batch", "SelectorError", "GRANULARITIES", "get_selector",
           "parse_options"]

_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


@dataclass(frozen=True)
class Selector:
    """A registry entry: the function and what the CLI and the page show about it."""

    fn: Callable[..., Scores]
    label: str
    description: str  # one line
    paper: str
    granularities: tuple[str, ...]  # what ``fn`` returns natively; the first is its default
    needs_data: bool  # calibration batches required
    cost: str  # forward/backward passes per calibration batch
    options: dict[str, str] = field(default_factory=dict)  # option -> help (with its default)

    def option_types(self) -> dict[str, tuple[type, ...]]:
        """option -> the types its value may have, in the order a text value is tried: from the
        annotation of ``fn``'s keyword argument of that name (``None`` dropped), else from the type
        of its default; ``(str,)`` when neither says (a path, a name)."""
        hints = typing.get_type_hints(self.fn)
        params = inspect.signature(self.fn).parameters
        out = {}
        for opt in self.options:
            hint = hints.get(opt)
            if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
                kinds = typing.get_args(hint)
            elif hint is not None:
                kinds = (hint,)
            else:
                default = params[opt].default if opt in params else None
                kinds = (type(default),) if default not in (None, inspect.Parameter.empty) else (str,)
            out[opt] = tuple(t for t in (bool, int, float, str) if t in kinds) or (str,)
        return out


SELECTORS: dict[str, Selector] = {
    "magnitude": Selector(
        magnitude.score, "Magnitude |W|", "Largest absolute weights.",
        "Han et al. 2015, Learning both Weights and Connections for Efficient Neural Networks",
        ("element",), False, "none (data-free)"),
    "smallest_magnitude": Selector(
        smallest_magnitude.score, "Smallest magnitude (SaRA)", "Smallest absolute weights, the free ones (−|W|).",
        "Hu et al. 2024, SaRA: Progressive Sparse Low-Rank Adaptation (arXiv 2409.06633)",
        ("element",), False, "none (data-free)"),
    "principal": Selector(
        principal.score, "Principal weights |U_kΣ_kV_kᵀ|",
        "Magnitude of each element in its matrix's best rank-k approximation (block matrices).",
        "The Path Not Taken: RLVR Provably Learns Off the Principals (arXiv 2511.08567)",
        ("element",), False, "one SVD per block matrix (no model passes)",
        {"k": "rank of the approximation: a count, or a fraction of the rank in (0, 1) (default 1% of the rank)"}),
    "random": Selector(
        random.score, "Random", "Seeded uniform random scores: the chance baseline.", "—",
        random.GRANULARITIES, False, "none (data-free)",
        {"granularity": "element | row | head | channel | layer (default element)"}),
    "wanda": Selector(
        wanda.score, "Wanda |W|·‖X‖₂", "Weight magnitude times the ℓ2 norm of its input feature.",
        "Sun et al. 2024, A Simple and Effective Pruning Approach for LLMs (ICLR)",
        ("element",), True, "1 forward"),
    "taylor": Selector(
        taylor.score, "Taylor |W⊙∇W|", "Gradient × weight over calibration batches.",
        "Molchanov et al. 2019 (CVPR); GBLM-Pruner, Das et al. 2023 (arXiv 2311.04902)",
        ("element",), True, "1 forward+backward (per micro-batch with micro_batch)",
        {"gradient": "mean (gradient of the mean loss) | l1 | l2 (GBLM-Pruner's normalized gradient); default mean",
         "micro_batch": "sequences per gradient, e.g. 1 for GBLM-Pruner's per-sample gradients "
                        "(default: whole batch)"}),
    "fisher": Selector(
        fisher.score, "Fisher E[g²]", "Diagonal empirical Fisher from per-sample gradients.",
        "Foster et al. 2024, Selective Synaptic Dampening (AAAI); Sung et al. 2021, FISH mask (NeurIPS)",
        ("element",), True, "1 forward+backward per sequence (micro-batches of 1)",
        {"micro_batch": "sequences per gradient; 1 = per-sample Fisher (default 1)"}),
    "sensitivity": Selector(
        sensitivity.score, "Smoothed sensitivity (AdaLoRA/PST)",
        "EMA of |W⊙g| times the EMA of its deviation (uncertainty).",
        "Zhang et al. 2023, AdaLoRA (ICLR); Li et al. 2022, PST (IJCAI)",
        ("element",), True, "1 forward+backward",
        {"beta1": "EMA factor of the sensitivity (default 0.85)",
         "beta2": "EMA factor of the uncertainty (default 0.85)"}),
    "block_influence": Selector(
        block_influence.score, "Block influence 1−cos",
        "How much each block turns the hidden state: 1 − cos(h_in, h_out).",
        "Men et al. 2024, ShortGPT (arXiv 2403.03853); Dumitru et al. 2024, Layer-Wise Quantization",
        ("layer",), True, "1 forward"),
    "lisa": Selector(
        lisa.score, "LISA layer sampling", "Probability that LISA trains each block in a period.",
        "Pan et al. 2024, LISA: Layerwise Importance Sampling (NeurIPS)",
        ("layer",), False, "none (data-free)",
        {"mode": "uniform | weight_norm (default uniform)",
         "active_layers": "γ, blocks unfrozen per period (default 2)"}),
    "head_importance": Selector(
        head_importance.score, "Head importance (head-mask gradient)",
        "|∂L/∂ξ_h| of a mask on each head's output, summed over sequences (GQA aware).",
        "Michel et al. 2019, Are Sixteen Heads Really Better than One? (NeurIPS)",
        ("head",), True, "1 forward+backward (no weight gradients)",
        {"normalize": "divide each layer's scores by their ℓ2 norm (default true)"}),
    "fluctuation": Selector(
        fluctuation.score, "Fluctuation (FLAP)",
        "Input variance × squared column norm of o_proj / down_proj channels, per head or channel.",
        "An et al. 2024, Fluctuation-based Adaptive Structured Pruning for LLMs (AAAI)",
        fluctuation.GRANULARITIES, True, "1 forward",
        {"granularity": "channel | head (default channel)",
         "standardize": "z-score each layer's channels, FLAP's adaptive structure (default false)"}),
    "lrp": Selector(
        lrp.score, "LRP relevance |W⊙∇ᴸᴿᴾW|",
        "Parameter relevance for the next-token logits by CP-LRP or AttnLRP (modified gradient × weight).",
        "Achtibat et al. 2024, AttnLRP (ICML); Yeom et al. 2021, Pruning by Explaining (Pattern Recognition)",
        ("element",), True, "1 forward+backward",
        {"variant": "cp (CP-LRP) | attn (AttnLRP); default cp"}),
    "diff": Selector(
        diff.score, "Diff (changed elements)", "Elements a real fine-tune changed (1) or not (0).",
        "Mukherjee et al. 2025, RL Finetunes Small Subnetworks in LLMs (arXiv 2505.11711)",
        ("element",), False, "one streaming diff (no model passes)",
        {"base": "base checkpoint", "tuned": "tuned checkpoint", "tol": f"tolerance τ (default {PAPER_TOL:g})",
         "mask": "a mask file instead of base and tuned"}),
}


def get_selector(name: str) -> Selector:
    """The registry entry ``name``; :class:`SelectorError` naming the known ones otherwise."""
    try:
        return SELECTORS[name]
    except KeyError:
        raise SelectorError(f"unknown selector {name!r}; one of {', '.join(SELECTORS)}") from None


def parse_options(name: str, raw: dict[str, str], *, fixed: dict[str, str] | None = None) -> dict:
    """Option values given as text (``--option KEY=VALUE``) -> the values selector ``name`` takes.

    Each key must be one of ``SELECTORS[name].options``; its value is converted to the type its
    keyword argument declares (:meth:`Selector.option_types`): ``true`` / ``false`` for a bool, an
    integer, a finite number, or the text itself.

    Args:
        name (str): a key of :data:`SELECTORS`.
        raw (dict[str, str]): option -> its text.
        fixed (dict[str, str], optional): keys the caller sets by other means (e.g. ``seed`` ->
            ``--seed``), refused here so that none is given twice; also left out of the list of
            valid options an unknown key is answered with. Default: None.
    Returns:
        dict: option -> typed value, in the order given.
    Raises:
        SelectorError: one line: a fixed key and where to set it, an unknown key and the valid
        ones, or a value of the wrong type with the type expected.
    """
    entry = get_selector(name)
    fixed = fixed or {}
    kinds = entry.option_types()
    valid = [o for o in kinds if o not in fixed]
    out = {}
    for key, text in raw.items():
        if key in fixed:
            raise SelectorError(f"{key!r} is set by {fixed[key]}, not as an option of {name}")
        if key not in kinds:
            have = f"its options: {', '.join(valid)}" if valid else "it takes none"
            raise SelectorError(f"{name} has no option {key!r}; {have}")
        out[key] = _convert(text, kinds[key])
        if out[key] is None:
            want = " or ".join(_TYPE_WORDS[t] for t in kinds[key])
            raise SelectorError(f"{name}: option {key} must be {want}, got {text!r}")
    return out


def _convert(text: str, kinds: tuple[type, ...]):
    """``text`` as the first of ``kinds`` it reads as; None when it reads as none of them."""
    for kind in kinds:
        if kind is bool and text.strip().lower() in ("true", "false"):
            return text.strip().lower() == "true"
        if kind is int:
            try:
                return int(text)
            except ValueError:
                continue
        if kind is float:
            try:
                value = float(text)
            except ValueError:
                continue
            if math.isfinite(value):
                return value
        if kind is str:
            return text
    return None
