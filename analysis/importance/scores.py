"""Importance scores -> aggregates and masks (docs/design.md §5–§6).

- :func:`compute_scores` runs a registered selector at a granularity (element scores are
  aggregated when the selector is element-level and a coarser granularity is asked);
- scope: ``"blocks"`` (default) = the 2-D weight matrices inside the transformer blocks (attention
  and MLP groups); ``"all"`` = every parameter (adds embeddings, lm_head, norms, biases);
- :func:`aggregate` element scores to rows, heads (GQA-aware), channels, layers (sum or mean);
  :func:`summarize` per layer, per module kind, per layer × kind and per head, JSON-ready;
  :func:`expand` coarse scores back to elements;
- budgets: :func:`global_topk`, :func:`per_layer_topk`, :func:`structured_mask`.

The mask contract: exactly ``round(density · n)`` (Python's ``round``: halves to even) of the n
elements (units, for structured budgets) in scope are selected, every selected score ≥ every
unselected score (within each group for per-layer budgets), ties broken by position in the flat
model-order concatenation (earlier first). Elements outside the scope are False. A mask holds
every parameter of the model.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import torch

from analysis.errors import SubnetscopeError
from analysis.sparsity.masks import Mask
from analysis.importance.selectors import GRANULARITIES, Scores, get_selector
from analysis.importance.selectors.base import Progress, row_axis
from analysis.checkpoints.structure import KINDS, tensor_role, unit_slices

SCOPES = ("blocks", "all")
REDUCTIONS = ("sum", "mean")
SEQ_LEN = 64  # tokens per calibration sequence by default (fewer for a model with fewer positions)
POSITION_FIELDS = ("n_positions", "max_position_embeddings")  # config fields bounding a sequence (GPT-2 first)


class ImportanceError(SubnetscopeError):
    """A budget, scope or aggregation that cannot be applied, in one line."""


# ----------------------------------------------------------------------------- running selectors

def compute_scores(model, selector: str, batches=None, *, granularity: str | None = None, seed: int = 0,
                   progress: Progress | None = None, **options) -> Scores:
    """Runs a registered selector, at its natural granularity or aggregated to a coarser one.

    Args:
        model (nn.Module): the model to score (left as found).
        selector (str): a key of :data:`analysis.importance.selectors.SELECTORS`.
        batches (list[Batch], optional): calibration batches (required by ``needs_data`` selectors).
        granularity (str, optional): ``element``, ``row``, ``head``, ``channel`` or ``layer``.
            A granularity the selector has natively is passed to it; an element-level selector's
            scores are summed to a coarser one. Default: None (the selector's first).
        seed (int): seed for random selectors. Default: 0.
        progress (callable, optional): ``progress(done, total, what)``.
        **options: selector options (see ``SELECTORS[name].options``); unknown ones are an error.
    Returns:
        Scores: at ``granularity``.
    """
    entry = get_selector(selector)
    unknown = sorted(set(options) - set(entry.options) - {"granularity"})
    if unknown:
        have = ", ".join(o for o in entry.options if o != "granularity") or "none"
        raise ImportanceError(f"{selector} has no option {unknown[0]!r} (options: {have})")
    requested = options.pop("granularity", None)
    granularity = granularity or requested or entry.granularities[0]
    if granularity not in GRANULARITIES:
        raise ImportanceError(f"unknown granularity {granularity!r}; one of {', '.join(GRANULARITIES)}")
    if entry.needs_data and not batches:
        raise ImportanceError(f"{selector} needs calibration data")
    native = granularity in entry.granularities
    if native and "granularity" in inspect.signature(entry.fn).parameters:
        options["granularity"] = granularity
    if not native and entry.granularities[0] != "element":
        raise ImportanceError(f"{selector} scores {', '.join(entry.granularities)}; it cannot give {granularity}")
    check_float_weights(model)
    scores = entry.fn(model, batches, seed=seed, progress=progress, **options)
    return scores if native else aggregate(scores, granularity)


def calibration_length(config, seq_len: int | None = None, *, where: str = "the model") -> int:
    """Tokens per calibration sequence for a model: ``seq_len`` when the model has that many
    positions; not given, :data:`SEQ_LEN` or the model's positions when fewer.

    Args:
        config: a transformers config, a ``config.json`` dict, or None (no bound).
        seq_len (int, optional): the length asked for. Default: None.
        where (str): the checkpoint, for the message. Default: "the model".
    Raises:
        ImportanceError: ``seq_len`` beyond the positions of the config's ``max_position_embeddings``
            (or GPT-2's ``n_positions``), naming both.
    """
    get = config.get if isinstance(config, dict) else lambda f: getattr(config, f, None)
    limit, field = next(((get(f), f) for f in POSITION_FIELDS if isinstance(get(f), int)), (None, None))
    if seq_len is None:
        return SEQ_LEN if limit is None else min(SEQ_LEN, limit)
    if limit is not None and seq_len > limit:
        raise ImportanceError(f"--seq-len {seq_len:,} is more than the {limit:,} positions of {where} "
                              f"({field} of its config)")
    return seq_len


def check_float_weights(model) -> None:
    """Selectors score float weights (gradients, activations, magnitudes of real values).

    Checks the model's parameters and, when the model was loaded from a local safetensors
    checkpoint (``model.name_or_path``), the stored dtypes of that checkpoint's weights:
    ``load_model`` upcasts an int8 or fp8 weight to float32 silently, and scores of integer
    codes (or of GPTQ / AWQ packed words) would be meaningless. Buffers (position ids, GPT-2
    attention masks) are not weights and may be integers.

    Raises:
        ImportanceError: one line naming the first weight stored as an integer, bool or one-byte
            float (int8, packed int32, fp8 of a quantized checkpoint) and its dtype.
    """
    for name, p in model.named_parameters():
        if not p.is_floating_point() or p.element_size() < 2:
            raise ImportanceError(f"importance needs float weights (float16, bfloat16, float32 or float64): {name} "
                                  f"is {str(p.dtype).replace('torch.', '')}; score the unquantized model")
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path or not Path(path).is_dir() or not any(Path(path).glob("*.safetensors")):
        return  # built in memory, or weights without a cheap header (only the parameters are checked)
    from analysis.checkpoints import open_checkpoint

    try:
        ck = open_checkpoint(path)
    except SubnetscopeError:
        return
    for t in ck.tensors.values():
        dtype = getattr(torch, t.dtype, None)
        if t.kind == "buffer" or (isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize >= 2):
            continue
        raise ImportanceError(f"importance needs float weights (float16, bfloat16, float32 or float64): {path}: "
                              f"{t.name} is stored as {t.dtype}, as in a quantized checkpoint; "
                              "score the unquantized model")


# ----------------------------------------------------------------------------- scope

def in_scope(name: str, shape, family: str | None, scope: str = "blocks") -> bool:
    """Whether a parameter belongs to a scope (``blocks``: 2-D attention/MLP weights of the blocks)."""
    if scope == "all":
        return True
    if scope != "blocks":
        raise ImportanceError(f"unknown scope {scope!r}; one of {', '.join(SCOPES)}")
    role = tensor_role(name, family)
    return role.layer is not None and role.group in ("attention", "mlp") and len(shape) == 2


def scope_names(scores: Scores, scope: str = "blocks") -> list[str]:
    """The parameters of ``scores`` in scope, in model order; every one must have a score.

    Raises:
        ImportanceError: when an in-scope parameter has no score (e.g. Wanda's norms under ``all``).
    """
    names = [n for n, shape in scores.shapes.items() if in_scope(n, shape, scores.arch.family, scope)]
    if scores.granularity in ("element", "row"):
        if scores.granularity == "row":
            names = [n for n in names if len(scores.shapes[n]) == 2]
        missing = [n for n in names if n not in scores.values]
        if missing:
            raise ImportanceError(f"{scores.selector} has no score for {missing[0]} (in scope {scope!r}; "
                                  f"{len(missing)} such); use scope 'blocks'")
    if not names:
        raise ImportanceError(f"no parameters in scope {scope!r}")
    return names


def flatten(scores: Scores, scope: str = "blocks") -> torch.Tensor:
    """All scores in scope as one vector ``# [n]``: element/row scores concatenated in model order,
    head/channel/layer tensors flattened layer-major."""
    if isinstance(scores.values, dict):
        return torch.cat([scores.values[n].reshape(-1) for n in scope_names(scores, scope)])
    return scores.values.reshape(-1)


# ----------------------------------------------------------------------------- aggregation

def aggregate(scores: Scores, to: str, *, reduce: str = "sum", scope: str = "blocks") -> Scores:
    """Aggregates element scores to rows, heads, channels or layers.

    Args:
        scores (Scores): ``element`` granularity.
        to (str): ``row`` (``{name: # [rows]}``, output rows of each 2-D parameter in scope),
            ``head`` (``# [layers, heads]``: q rows and o columns of the head, plus 1/G of the k and
            v rows of its kv head, G = query heads per kv head), ``channel``
            (``# [layers, channels]``: gate/up rows and down columns), or ``layer`` (``# [layers]``:
            every in-scope parameter of the block).
        reduce (str): ``sum`` or ``mean`` (sum over the elements counted, divided by their number;
            kv elements count 1/G toward each of their query heads). Default: ``sum``.
        scope (str): ``blocks`` or ``all``. Default: ``blocks``.
    Returns:
        Scores: at ``to``, same selector, ``info["reduce"]`` set.
    """
    if reduce not in REDUCTIONS:
        raise ImportanceError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    if scores.granularity == to:
        return scores
    if scores.granularity != "element":
        raise ImportanceError(f"cannot aggregate {scores.granularity} scores to {to}")
    if to == "row":
        values = {}
        for n in scope_names(scores, scope):
            if len(scores.shapes[n]) == 2:
                s = scores.values[n].movedim(row_axis(n, scores.arch), 0)
                values[n] = s.sum(1) / (s.shape[1] if reduce == "mean" else 1)
    elif to in ("head", "channel", "layer"):
        total, count = _unit_sums(scores, to, scope)
        values = total / count.clamp(min=1e-30) if reduce == "mean" else total
    else:
        raise ImportanceError(f"cannot aggregate to {to!r}; one of row, head, channel, layer")
    return Scores(scores.selector, to, values.float() if torch.is_tensor(values) else values, scores.arch,
                  scores.shapes, {**scores.info, "reduce": reduce, "scope": scope})


def _unit_sums(scores: Scores, to: str, scope: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of scores, number of elements) per unit, float64 ``# [layers, units]`` or ``# [layers]``."""
    arch = scores.arch
    L = scores.num_layers
    units = {"head": arch.num_heads, "channel": arch.intermediate_size, "layer": 1}[to]
    if not units:
        raise ImportanceError(f"the architecture gives no {to} count (no config)")
    total = torch.zeros(L, units, dtype=torch.float64)
    count = torch.zeros(L, units, dtype=torch.float64)
    for n in scope_names(scores, scope):
        layer = tensor_role(n, arch.family).layer
        if layer is None:
            continue
        s = scores.values[n].double()
        if to == "layer":
            total[layer, 0] += s.sum()
            count[layer, 0] += s.numel()
            continue
        kind = tensor_role(n, arch.family).kind
        for sl in unit_slices(kind, scores.shapes[n], arch):
            seg = s.movedim(sl.axis, 0)[sl.start: sl.start + sl.size * sl.count]
            per_unit = seg.reshape(sl.count, -1).sum(1)  # [count]
            numel = seg[0:sl.size].numel()
            if to == "head" and sl.unit == "head":
                total[layer] += per_unit
                count[layer] += numel
            elif to == "head" and sl.unit == "kv_head":
                group = units // sl.count
                total[layer] += per_unit.repeat_interleave(group) / group
                count[layer] += numel / group
            elif to == "channel" and sl.unit == "channel":
                total[layer] += per_unit
                count[layer] += numel
    return (total[:, 0], count[:, 0]) if to == "layer" else (total, count)


def sample_scores(scores: Scores, scope: str = "blocks", *, at_most: int = 50_000) -> tuple[list[float], int]:
    """Every k-th element score in scope, for a histogram: between ``at_most`` and ``2 · at_most``
    of them (all when there are fewer).

    Returns:
        tuple[list[float], int]: the sample and how many scores it was taken from.
    """
    flat = flatten(scores, scope)
    return flat[:: max(1, flat.numel() // at_most)].tolist(), flat.numel()


def summarize(scores: Scores, *, scope: str = "blocks") -> dict:
    """Aggregated scores for the CLI's JSON and the page's heatmaps (plain Python numbers).

    Returns:
        dict: ``selector``, ``granularity``, ``scope``; ``layers`` [{layer, numel, sum, mean}];
        for element scores also ``kinds`` [{kind, numel, sum, mean}], ``layer_kinds``
        [{layer, kind, numel, sum, mean}] and ``heads`` {"sum": [[...]], "mean": [[...]]}
        (``# [layers, heads]``, None without a head count); for head/channel/layer scores the
        values themselves under ``heads`` / ``channels`` / ``layers``.
    """
    out = {"selector": scores.selector, "granularity": scores.granularity, "scope": scope}
    if scores.granularity == "element":
        groups: dict[tuple, list] = {}
        for n in scope_names(scores, scope):
            role = tensor_role(n, scores.arch.family)
            g = groups.setdefault((role.layer, role.kind), [0.0, 0])
            g[0] += float(scores.values[n].double().sum())
            g[1] += scores.values[n].numel()
        out["layer_kinds"] = [_row({"layer": L, "kind": k}, *v) for (L, k), v in
                              sorted(groups.items(), key=lambda kv: (kv[0][0] is None, kv[0][0] or 0,
                                                                     KINDS.index(kv[0][1])))]
        out["layers"] = _rollup(groups, lambda key: key[0], "layer", skip_none=True)
        out["kinds"] = _rollup(groups, lambda key: key[1], "kind", order=KINDS)
        if scores.arch.num_heads and scores.arch.head_dim:
            total, count = _unit_sums(scores, "head", scope)
            out["heads"] = {"sum": total.tolist(), "mean": (total / count.clamp(min=1e-30)).tolist()}
        else:
            out["heads"] = None
    elif scores.granularity == "row":
        out["rows"] = {n: v.tolist() for n, v in scores.values.items()}
    else:
        key = {"head": "heads", "channel": "channels", "layer": "layers"}[scores.granularity]
        out[key] = scores.values.tolist()
    return out


def _row(head: dict, total: float, numel: int) -> dict:
    return {**head, "numel": numel, "sum": total, "mean": total / numel if numel else None}


def _rollup(groups: dict, key, field: str, *, skip_none: bool = False, order=None) -> list[dict]:
    acc: dict = {}
    for k, (total, numel) in groups.items():
        if skip_none and key(k) is None:
            continue
        a = acc.setdefault(key(k), [0.0, 0])
        a[0] += total
        a[1] += numel
    keys = [k for k in order if k in acc] if order else sorted(acc)
    return [_row({field: k}, *acc[k]) for k in keys]


def expand(scores: Scores, *, fill: float = 0.0, scope: str = "blocks") -> Scores:
    """Broadcasts head/channel/layer/row scores to the elements they cover.

    Every element of a unit gets the unit's score (k/v rows of a kv head: the mean of its query
    heads' scores); in-scope elements no unit covers (e.g. MLP weights for head scores) get
    ``fill``. Lets structured selectors be compared with element-level ones and with a diff.

    Returns:
        Scores: ``element`` granularity over the parameters in scope.
    """
    if scores.granularity == "element":
        return scores
    arch = scores.arch
    values = {}
    for n in scope_names(scores, scope):
        shape = scores.shapes[n]
        out = torch.full(shape, float(fill))
        layer = tensor_role(n, arch.family).layer
        if scores.granularity == "row":
            if n in scores.values:
                out = scores.values[n].reshape(-1, 1).expand(-1, shape[1 - row_axis(n, arch)])
                out = out.movedim(0, row_axis(n, arch)).contiguous()
        elif layer is not None and scores.granularity == "layer":
            out.fill_(float(scores.values[layer]))
        elif layer is not None:
            kind = tensor_role(n, arch.family).kind
            for sl in unit_slices(kind, shape, arch):
                if sl.unit == "kv_head" and scores.granularity == "head":
                    per = scores.values[layer].reshape(sl.count, -1).mean(1)
                elif sl.unit == scores.granularity:
                    per = scores.values[layer]
                else:
                    continue
                view = out.movedim(sl.axis, 0)[sl.start: sl.start + sl.size * sl.count]
                view.copy_(per.repeat_interleave(sl.size).reshape(-1, *([1] * (len(shape) - 1))).expand_as(view))
        values[n] = out
    return Scores(scores.selector, "element", values, arch, scores.shapes,
                  {**scores.info, "expanded_from": scores.granularity, "fill": fill})


# ----------------------------------------------------------------------------- budgets

def check_density(density: float) -> float:
    if not (isinstance(density, (int, float)) and math.isfinite(density) and 0.0 <= density <= 1.0):
        raise ImportanceError(f"density must be a number in [0, 1], got {density!r}")
    return float(density)


def topk_flags(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest of a vector, ties broken by position (earlier first).

    Args:
        flat (Tensor): ``# [n]`` scores; NaN is an error.
        k (int): how many to select, 0 ≤ k ≤ n.
    Returns:
        BoolTensor: ``# [n]`` with exactly k True, every selected score ≥ every unselected score.
    """
    n = flat.numel()
    if bool(torch.isnan(flat).any()):
        raise ImportanceError("scores contain NaN; no top-k is defined")
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    threshold = torch.kthvalue(flat.cpu(), n - k + 1).values  # the k-th largest
    flags = flat > threshold
    need = k - int(flags.sum())
    ties = (flat == threshold).nonzero().reshape(-1)[:need]
    flags[ties] = True
    return flags


def _mask_from(scores: Scores, chosen: dict[str, torch.Tensor]) -> Mask:
    """A full mask: ``chosen`` where given, all-False for every other parameter."""
    return {n: chosen[n] if n in chosen else torch.zeros(shape, dtype=torch.bool)
            for n, shape in scores.shapes.items()}


def _split(flags: torch.Tensor, scores: Scores, names: list[str]) -> dict[str, torch.Tensor]:
    out, at = {}, 0
    for n in names:
        shape = scores.values[n].shape
        k = math.prod(shape)
        out[n] = flags[at: at + k].reshape(shape)
        at += k
    return out


def _element_scores(scores: Scores, what: str) -> None:
    if scores.granularity != "element":
        raise ImportanceError(f"{what} needs element scores; {scores.selector} gave {scores.granularity} "
                              f"(use structured_mask, or expand)")


def global_topk(scores: Scores, density: float, *, scope: str = "blocks") -> Mask:
    """Global top-k: the ``round(density · n)`` highest-scoring elements of the whole scope.

    Args:
        scores (Scores): ``element`` granularity.
        density (float): fraction of the n in-scope elements to select, in [0, 1].
        scope (str): ``blocks`` or ``all``. Default: ``blocks``.
    Returns:
        Mask: every parameter; True on the selected elements.
    """
    _element_scores(scores, "global_topk")
    names = scope_names(scores, scope)
    flat = torch.cat([scores.values[n].reshape(-1) for n in names])
    k = round(check_density(density) * flat.numel())
    return _mask_from(scores, _split(topk_flags(flat, k), scores, names))


def allocate(sizes: list[int], density: float) -> list[int]:
    """Per-group counts summing to exactly ``round(density · Σ sizes)``, each within 1 of
    ``density · size`` (largest remainders; ties to the earlier group)."""
    total = round(density * sum(sizes))
    quotas = [density * s for s in sizes]
    counts = [min(math.floor(q), s) for q, s in zip(quotas, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def per_layer_topk(scores: Scores, density: float, *, scope: str = "blocks", group: str = "layer") -> Mask:
    """Uniform budget: top-k inside each layer (or each tensor) at the same density.

    Each group gets ``density · n_group`` elements, rounded by largest remainders so that the
    total is exactly ``round(density · n)``. Parameters outside the blocks (scope ``all``) form
    one group of their own.

    Args:
        scores (Scores): ``element`` granularity.
        density (float): in [0, 1].
        scope (str): ``blocks`` or ``all``. Default: ``blocks``.
        group (str): ``layer`` or ``tensor``. Default: ``layer``.
    Returns:
        Mask: every parameter; True on the selected elements.
    """
    _element_scores(scores, "per_layer_topk")
    if group not in ("layer", "tensor"):
        raise ImportanceError(f"group must be 'layer' or 'tensor', got {group!r}")
    density = check_density(density)
    groups: dict = {}
    for n in scope_names(scores, scope):
        key = n if group == "tensor" else tensor_role(n, scores.arch.family).layer
        groups.setdefault(key, []).append(n)
    chosen = {}
    sizes = [sum(scores.values[n].numel() for n in names) for names in groups.values()]
    for names, k in zip(groups.values(), allocate(sizes, density)):
        flat = torch.cat([scores.values[n].reshape(-1) for n in names])
        chosen.update(_split(topk_flags(flat, k), scores, names))
    return _mask_from(scores, chosen)


def structured_mask(scores: Scores, density: float, *, scope: str = "blocks",
                    components: tuple[str, ...] | None = None) -> Mask:
    """Structured budget: whole heads, channels, layers or rows (S2FT-style selection of units).

    ``round(density · units)`` units with the highest scores are selected (ties to the earlier,
    layer-major) and every in-scope element of each selected unit is set: a head is its q rows,
    its o columns and the k/v rows of its kv head (GQA: a kv head is set when any of its query
    heads is); a channel is its gate/up rows and down column; a layer every in-scope parameter of
    the block; a row one output row.

    Args:
        scores (Scores): ``head``, ``channel``, ``layer`` or ``row`` granularity.
        density (float): fraction of the units to select, in [0, 1].
        scope (str): ``blocks`` or ``all``. Default: ``blocks``.
        components (tuple[str], optional): only these projections' slices (``q k v o`` for heads,
            ``gate up down`` for channels), e.g. ``("o", "down")`` to train only the output
            projections of the selected units. Default: None (all).
    Returns:
        Mask: every parameter; True on the selected units' elements.
    """
    density = check_density(density)
    arch = scores.arch
    names = scope_names(scores, scope)
    if scores.granularity == "row":
        row_names = [n for n in names if n in scores.values]
        flat = torch.cat([scores.values[n] for n in row_names])
        flags = topk_flags(flat, round(density * flat.numel()))
        chosen, at = {}, 0
        for n in row_names:
            rows = scores.values[n].numel()
            sel = flags[at: at + rows]
            at += rows
            axis = row_axis(n, arch)
            shape = (rows, scores.shapes[n][1 - axis])
            chosen[n] = sel[:, None].expand(shape).movedim(0, axis).contiguous()
        return _mask_from(scores, chosen)
    if scores.granularity not in ("head", "channel", "layer"):
        raise ImportanceError(f"structured_mask needs head, channel, layer or row scores, not {scores.granularity}")
    flat = scores.values.reshape(-1)
    selected = topk_flags(flat, round(density * flat.numel())).reshape(scores.values.shape)
    chosen = {}
    for n in names:
        role = tensor_role(n, arch.family)
        if role.layer is None:
            continue
        shape = scores.shapes[n]
        if scores.granularity == "layer":
            if selected[role.layer]:
                chosen[n] = torch.ones(shape, dtype=torch.bool)
            continue
        m = torch.zeros(shape, dtype=torch.bool)
        for sl in unit_slices(role.kind, shape, arch):
            if components is not None and sl.component not in components:
                continue
            if sl.unit == scores.granularity:
                units = selected[role.layer]
            elif sl.unit == "kv_head" and scores.granularity == "head":
                units = selected[role.layer].reshape(sl.count, -1).any(1)
            else:
                continue
            view = m.movedim(sl.axis, 0)[sl.start: sl.start + sl.size * sl.count]
            view.copy_(units.repeat_interleave(sl.size).reshape(-1, *([1] * (len(shape) - 1))).expand_as(view))
        chosen[n] = m
    return _mask_from(scores, chosen)


def scores_to_mask(scores: Scores, density: float, *, budget: str | None = None, scope: str = "blocks") -> Mask:
    """One entry point for the CLI and the page.

    Args:
        budget (str, optional): ``global``, ``per_layer`` or ``structured``. Default: ``global``
            for element scores, ``structured`` otherwise.
    """
    budget = budget or ("global" if scores.granularity == "element" else "structured")
    if budget == "global":
        return global_topk(scores, density, scope=scope)
    if budget == "per_layer":
        return per_layer_topk(scores, density, scope=scope)
    if budget == "structured":
        return structured_mask(scores, density, scope=scope)
    raise ImportanceError(f"unknown budget {budget!r}; one of global, per_layer, structured")
