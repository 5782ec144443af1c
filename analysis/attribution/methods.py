"""Relevance of prompt tokens, layers and heads for a target continuation (docs/design.md §7).

Six methods on one encoded example (:func:`encode`):

- ``ig``, ``saliency``, ``ablation`` — captum's ``IntegratedGradients``, ``Saliency`` and
  ``FeatureAblation`` on the input embeddings, explaining the target's log-probability
  ``log p(target | prompt)`` (summed over the target tokens, teacher-forced, as captum's
  ``LLMAttribution`` does). IG reports its convergence delta as the completeness error
  |Σ scores − (f(x) − f(x′))| / |f(x) − f(x′)|; x′ replaces every prompt token (not the special
  tokens) by the baseline token. By default IG adapts its steps (:func:`integrated_gradients`):
  captum's Gauss-Legendre rule on segments of the path, split in two where a segment's
  completeness or its scores disagree with its halves, until both errors are below
  :data:`COMPLETENESS_TARGET` or a budget of steps is spent (docs/integrated-gradients.md: why the
  path from a zero baseline embedding is hard).
- ``ixg``, ``lrp-cp``, ``lrp-attn`` — activation × gradient in one forward and one backward,
  explaining the target logit (summed over the target tokens): plain gradients for ``ixg``, the
  modified gradients of :func:`analysis.attribution.lrp.lrp_rules` for the two LRP variants. The same pass
  gives the relevance of the residual stream after every block and of every attention head (at the
  input of the output projection, split by head), and the conservation error
  |Σ relevance − target logit| / |target logit| over all input positions.

Each result can carry a perturbation curve (:func:`faithfulness`): the prompt tokens removed (set
to the baseline token) most relevant first and least relevant first, the drop of the target
log-probability, and the area between the two curves (ABPC; larger is more faithful).

captum's ``LLMGradientAttribution`` runs one attribution per target token and has no convergence
delta; the captum methods are therefore called on a forward function of the embeddings that scores
the whole target in one pass. Activation × gradient at the embeddings, the residual stream and the
heads is read from one backward here (captum's layer methods take one pass per set of layers).
"""

from __future__ import annotations

import inspect
import math
import time
import weakref
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch

from analysis.attribution.options import (  # noqa: F401 (re-exported)
    BATCH_TOKENS, COMPLETENESS_TARGET, DEFAULT_BUDGET, DEFAULT_STEPS, DEFAULT_TARGET_TOKENS, LRP_VARIANT, MAX_BATCH,
    MAX_BUDGET, MAX_PROMPT_CHARS, MAX_STEPS, MAX_TOKENS, METHODS, MIN_BUDGET, MIN_PANEL, PANEL_STEPS, RELEVANCE_METHODS,
    START_PANELS)
from analysis.errors import SubnetscopeError, quoted
from analysis.definitions import PAPER_TOL


class AttributionError(SubnetscopeError):
    """A prompt, target, method or model that cannot be attributed, in one line."""


@dataclass
class Example:
    """A prompt and target as the model reads them."""

    ids: list[int]  # the model's input: prompt, then (causal LM) the target but its last token
    n_prompt: int  # positions 0..n_prompt-1 are the prompt
    tokens: list[str]  # the prompt's tokens, as the tokenizer split them
    features: list[int]  # prompt positions a perturbation may remove (not special tokens)
    target: str
    target_ids: list[int]
    target_tokens: list[str]
    target_positions: list[int]  # the logits at these positions score the target tokens
    baseline_id: int  # the token a removed prompt token is replaced by
    unknown: list[str] = field(default_factory=list)  # prompt characters the tokenizer read as its unk token


@dataclass
class Attribution:
    """One method's result on one example; :meth:`to_json` is the CLI's JSON."""

    method: str
    explains: str  # "log p(target)" or "target logit"
    tokens: list[str]
    scores: list[float]  # one per prompt token
    target: str
    target_tokens: list[str]
    target_logit: float
    target_logprob: float
    seconds: float
    device: str
    steps: int | None = None  # IG: Gauss-Legendre points of the final estimate (all segments)
    steps_used: int | None = None  # IG: gradient evaluations spent, refined-away segments included
    step_budget: int | None = None  # IG: the adaptive rule's budget of steps (None: a fixed rule)
    converged: bool | None = None  # IG: completeness bound (adaptive: and scores' error) <= completeness_target
    completeness_target: float | None = None  # IG
    completeness_error: float | None = None  # IG
    convergence_delta: float | None = None  # IG: Σ scores − (f(x) − f(x′))
    baseline_difference: float | None = None  # IG: f(x) − f(x′)
    conservation_error: float | None = None  # ixg / LRP: over all input positions
    relevance_sum: float | None = None  # ixg / LRP: Σ relevance over all input positions
    layers: list[float] | None = None  # relevance of the residual stream after each block
    layer_tokens: list[list[float]] | None = None  # # [layers, prompt tokens]
    heads: list[list[float]] | None = None  # # [layers, heads], at the input of the output projection
    faithfulness: dict | None = None
    info: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- encoding

def _is_masked_lm(model) -> bool:
    return type(model).__name__.endswith("ForMaskedLM")


def baseline_token(tokenizer) -> int:
    """The token a removed prompt token becomes: pad, else unk, else eos, else id 0."""
    for name in ("pad_token_id", "unk_token_id", "eos_token_id"):
        tid = getattr(tokenizer, name, None)
        if isinstance(tid, int):
            return tid
    return 0


def position_limit(model) -> int:
    """The positions a model reads at most: its config's ``max_position_embeddings`` (``n_positions``),
    else :data:`MAX_TOKENS`."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else MAX_TOKENS


def unknown_characters(tokenizer, text: str) -> list[str]:
    """The pieces of ``text`` the tokenizer encodes as its unknown token (in order, each once; a
    literal unk token in the text is not counted). A slow tokenizer without offsets gives
    ``["<unk> xN"]`` style counts instead of the characters."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if not isinstance(unk, int) or not text:
        return []
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):  # a slow tokenizer has no offsets
        n = list(tokenizer(text, add_special_tokens=False)["input_ids"]).count(unk)
        return [f"{n} unknown token{'s' if n != 1 else ''}"] if n else []
    pieces = [text[a:b] for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if t == unk]
    return [p for p in dict.fromkeys(pieces) if p != tokenizer.unk_token]


def prompt_tokens(model, tokenizer, prompt: str) -> list[int]:
    """The prompt's ids (with the tokenizer's special tokens), checked before any forward: not empty,
    at most :data:`MAX_PROMPT_CHARS` characters (before tokenizing), and within the model's
    :func:`position_limit`.

    Raises:
        AttributionError: no tokenizer, an empty or too long prompt, a prompt without tokens.
    """
    if tokenizer is None:
        raise AttributionError("attribution needs the checkpoint's tokenizer; this directory has none")
    if not prompt:
        raise AttributionError("the prompt is empty")
    limit = position_limit(model)
    if len(prompt) > MAX_PROMPT_CHARS:
        raise AttributionError(f"the prompt is {len(prompt):,} characters; at most {MAX_PROMPT_CHARS:,} are "
                               f"tokenized (the model reads at most {limit:,} positions)")
    ids = list(tokenizer(prompt)["input_ids"])
    if not ids:
        raise AttributionError(f"the prompt {quoted(prompt)} has no tokens")
    if len(ids) > limit:
        raise AttributionError(f"the prompt is {len(ids):,} tokens; the model reads at most {limit:,} "
                               "(max_position_embeddings)")
    return ids


def encode(tokenizer, prompt: str, target: str, *, masked_lm: bool = False,
           baseline_id: int | None = None) -> Example:
    """Tokenizes a prompt (with the tokenizer's special tokens) and a target continuation.

    A causal LM reads ``prompt + target[:-1]`` and the logit at the last prompt position scores
    the first target token (teacher forcing). A masked LM reads ``prompt [MASK]… [SEP]``, one
    mask per target token. Prompt characters the tokenizer does not know are kept (as its unk
    token) and listed in ``Example.unknown``; a target holding any is refused: it would explain
    the unk token, not the text.

    Raises:
        AttributionError: an empty prompt or target, a target with characters the tokenizer does
            not know, or a tokenizer without a mask token for a masked LM.
    """
    if tokenizer is None:
        raise AttributionError("attribution needs the checkpoint's tokenizer; this directory has none")
    if not prompt:
        raise AttributionError("the prompt is empty")
    if not target:
        raise AttributionError("the target is empty")
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    target_ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    if not target_ids:
        raise AttributionError(f"the target {quoted(target)} has no tokens")
    unknown_target = unknown_characters(tokenizer, target)
    if unknown_target:
        raise AttributionError(f"the target {quoted(target)} holds characters the tokenizer does not know "
                               f"({', '.join(map(quoted, unknown_target))}): they would be explained as "
                               f"{tokenizer.unk_token}; give a target in the model's vocabulary")
    if masked_lm:
        mask = tokenizer.mask_token_id
        if mask is None:
            raise AttributionError("a masked language model needs a tokenizer with a mask token")
        tail = prompt_ids[-1:] if prompt_ids and prompt_ids[-1] == tokenizer.sep_token_id else []
        head = prompt_ids[:len(prompt_ids) - len(tail)]
        ids = head + [mask] * len(target_ids) + tail
        n_prompt = len(head)
        positions = list(range(n_prompt, n_prompt + len(target_ids)))
    else:
        ids = prompt_ids + target_ids[:-1]
        n_prompt = len(prompt_ids)
        positions = list(range(n_prompt - 1, n_prompt - 1 + len(target_ids)))
    special = set(tokenizer.all_special_ids)
    features = [i for i in range(n_prompt) if ids[i] not in special]
    if not features:
        raise AttributionError(f"the prompt {prompt!r} has no tokens besides special ones")
    return Example(ids=ids, n_prompt=n_prompt, tokens=[tokenizer.decode([t]) for t in ids[:n_prompt]],
                   features=features, target=target, target_ids=target_ids,
                   target_tokens=[tokenizer.decode([t]) for t in target_ids], target_positions=positions,
                   baseline_id=baseline_token(tokenizer) if baseline_id is None else int(baseline_id),
                   unknown=unknown_characters(tokenizer, prompt))


def greedy_target(model, tokenizer, prompt: str, max_tokens: int = DEFAULT_TARGET_TOKENS) -> str:
    """The model's greedy continuation of ``prompt`` (at most ``max_tokens`` tokens, up to EOS)."""
    if tokenizer is None:
        raise AttributionError("attribution needs the checkpoint's tokenizer; this directory has none")
    if _is_masked_lm(model):
        raise AttributionError("a masked language model needs a --target")
    ids = prompt_tokens(model, tokenizer, prompt)  # the length checked before any generation
    max_tokens = min(max_tokens, position_limit(model) - len(ids) + 1)  # prompt + target[:-1] fit
    out = []
    dev = next(model.parameters()).device
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model_logits(model, input_ids=torch.tensor([ids + out], device=dev))
            nxt = int(logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            out.append(nxt)
    text = tokenizer.decode(out)
    if not text:
        raise AttributionError(f"the model continues {prompt!r} with end-of-sequence; give a --target")
    return text


# ----------------------------------------------------------------------------- forward functions

def model_logits(model, **kwargs) -> torch.Tensor:
    """All logits of ``model(input_ids=…)`` or ``model(inputs_embeds=…)``, no cache, no padding."""
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    x = kwargs.get("inputs_embeds", kwargs.get("input_ids"))
    kwargs["attention_mask"] = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
    return model(**kwargs).logits


def target_logits(model, ex: Example, **inputs) -> torch.Tensor:
    """The logits that score the target tokens, ``# [batch, target tokens, vocab]``.

    A causal LM's target positions are the last ones of ``ex.ids``: only those go through the
    language-modelling head (``logits_to_keep``; on a 49k vocabulary that head is a large part of a
    short prompt's forward and backward)."""
    n = len(ex.target_ids)
    causal = ex.target_positions[-1] == len(ex.ids) - 1
    if causal and "logits_to_keep" in inspect.signature(model.forward).parameters:
        return model_logits(model, logits_to_keep=n, **inputs)[:, -n:]
    return model_logits(model, **inputs)[:, ex.target_positions]


def logit_of(logits: torch.Tensor, ex: Example) -> torch.Tensor:
    """Σ over target tokens of the target token's logit, ``# [batch]`` (from :func:`target_logits`)."""
    tid = torch.tensor(ex.target_ids, device=logits.device)
    return logits[:, torch.arange(len(tid), device=logits.device), tid].sum(-1)


def logprob_of(logits: torch.Tensor, ex: Example) -> torch.Tensor:
    """log p(target | prompt) = Σ over target tokens of the log-softmax, ``# [batch]``."""
    tid = torch.tensor(ex.target_ids, device=logits.device)
    return torch.log_softmax(logits.float(), -1)[:, torch.arange(len(tid), device=logits.device), tid].sum(-1)


class _Counter:
    """Calls of a forward function reported as progress (captum has no progress callback); with
    ``rows``, the rows of the batches it was called on are counted instead of the calls."""

    def __init__(self, fn, total: int, progress, what: str, rows: bool = False):
        self.fn, self.total, self.progress, self.what, self.done = fn, max(total, 1), progress, what, 0
        self.rows = rows

    def __call__(self, *args):
        out = self.fn(*args)
        self.done += int(args[0].shape[0]) if self.rows else 1
        if self.progress:
            self.progress(min(self.done, self.total), self.total, self.what)
        return out


def embeddings(model, ex: Example) -> tuple[torch.Tensor, torch.Tensor]:
    """(input embeddings, baseline embeddings: every feature position replaced by the baseline token)."""
    dev = next(model.parameters()).device
    emb = model.get_input_embeddings()
    ids = torch.tensor([ex.ids], device=dev)
    base = ids.clone()
    base[0, ex.features] = ex.baseline_id
    with torch.no_grad():
        return emb(ids).detach(), emb(base).detach()


# ----------------------------------------------------------------------------- the methods

def check_ig_options(steps, budget=DEFAULT_BUDGET, batch=None) -> None:
    """IG's steps (a whole number in 1 … :data:`MAX_STEPS`, or ``None`` / ``"auto"`` for the adaptive
    rule), its budget (:data:`PANEL_STEPS` × :data:`START_PANELS` … :data:`MAX_BUDGET`) and the rows
    per forward (1 … :data:`MAX_BATCH`), checked before anything is allocated.

    Raises:
        AttributionError: one line naming the option, the value and its bounds.
    """
    def whole(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if steps not in (None, "auto") and not (whole(steps) and 1 <= steps <= MAX_STEPS):
        raise AttributionError(f"--steps {quoted(steps)}: IG takes 1 to {MAX_STEPS:,} steps in one Gauss-Legendre "
                               "rule (numpy builds it as an n x n matrix), or 'auto' (steps added where the path "
                               "needs them, within --step-budget)")
    low = MIN_BUDGET
    if not (whole(budget) and low <= budget <= MAX_BUDGET):
        raise AttributionError(f"--step-budget {quoted(budget)}: give a whole number from {low} to {MAX_BUDGET:,} "
                               "(gradient evaluations of one adaptive IG)")
    if batch is not None and not (whole(batch) and 1 <= batch <= MAX_BATCH):
        raise AttributionError(f"--batch {quoted(batch)}: give a whole number from 1 to {MAX_BATCH:,} (rows of "
                               "one forward)")


def integrated_gradients(forward, inputs: torch.Tensor, baselines: torch.Tensor, *, steps=None,
                         budget: int = DEFAULT_BUDGET, batch: int = 64, progress=None) -> dict:
    """Integrated Gradients of a scalar ``forward`` (``# [batch]``) from ``baselines`` to ``inputs``
    (one example, ``# [1, positions, dim]``) by captum's ``IntegratedGradients`` (Gauss-Legendre) on
    segments of the straight path.

    IG over a segment [a, b] of the path is IG from x(a) to x(b): the segments' attributions add up
    to the whole path's, and captum's convergence delta of a segment is its own completeness error
    δ = Σ attr − (F(x(b)) − F(x(a))), known exactly. A fixed ``steps`` is one segment [0, 1] of that
    many points (captum's plain IG). ``steps=None`` (adaptive) starts from :data:`START_PANELS`
    segments of :data:`PANEL_STEPS` points and splits segments in two (each half gets
    :data:`PANEL_STEPS` new points), the worst first, until both errors are at most
    :data:`COMPLETENESS_TARGET`:

    - the completeness bound Σ|δ| / |F(x) − F(x′)| (≥ the completeness error: cancelling errors of
      two segments do not count as converged);
    - the scores' error, Σ over split segments of ‖A(segment) − A(its two halves)‖₁ / ‖A‖₁ for the
      per-position attributions A (a sum can be complete while the positions are wrong: every
      segment is checked against its halves at least once),

    or until the next split would pass ``budget`` gradient evaluations (then ``converged`` is False).

    Returns:
        dict: ``attr`` (per position, summed over the last dimension, ``# [1, positions]``),
        ``steps`` (points of the final rule), ``steps_used`` (all gradient evaluations),
        ``step_budget`` (None for a fixed rule), ``convergence_delta``, ``baseline_difference``,
        ``completeness_error`` (None when F(x) = F(x′)), ``error_bound``, ``score_error`` (None for
        a fixed rule), ``converged``, ``panels`` (the final segments).
    """
    from captum.attr import IntegratedGradients

    adaptive = steps in (None, "auto")
    k = PANEL_STEPS if adaptive else int(steps)
    fwd = _Counter(forward, budget if adaptive else k, progress, "ig", rows=True)
    ig = IntegratedGradients(fwd)

    def point(alpha: float) -> torch.Tensor:  # exact at both ends (torch.lerp)
        return torch.lerp(baselines, inputs, float(alpha))

    def run(panels):
        """(per-position attributions, completeness deltas) of each segment, ``batch`` rows a forward."""
        attrs, deltas = [], []
        group = max(1, min(len(panels), batch))
        for i in range(0, len(panels), group):
            part = panels[i:i + group]
            lo = torch.cat([point(a) for a, _ in part])
            hi = torch.cat([point(b) for _, b in part])
            attr, delta = ig.attribute(hi, baselines=lo, n_steps=k, method="gausslegendre",
                                       internal_batch_size=max(batch, len(part)), return_convergence_delta=True)
            attrs += list(attr.detach().double().sum(-1))
            deltas += [float(d) for d in delta.reshape(-1)]
        return attrs, deltas

    with torch.no_grad():
        diff = float(forward(inputs)[0] - forward(baselines)[0])
    panels = [(i / START_PANELS, (i + 1) / START_PANELS) for i in range(START_PANELS)] if adaptive else [(0.0, 1.0)]
    attrs, deltas = run(panels)
    errs = [math.inf] * len(panels)  # a segment's scores error: unknown until compared with its halves
    used = k * len(panels)

    def measures():
        scale = float(torch.stack(attrs).sum(0).abs().sum())  # ‖ΣA‖₁: the whole path's scores, about
        return (sum(map(abs, deltas)) / max(abs(diff), 1e-12),
                sum(errs) / scale if scale else (0.0 if all(e == 0 for e in errs) else math.inf), scale)

    while adaptive:
        bound, score_err, scale = measures()
        if bound <= COMPLETENESS_TARGET and score_err <= COMPLETENESS_TARGET:
            break
        badness = [abs(d) / max(abs(diff), 1e-12) + (e / scale if scale else e) for d, e in zip(deltas, errs)]
        left_d, left_e, split = sum(map(abs, deltas)), sum(errs), []
        for i in sorted(range(len(panels)), key=lambda i: -badness[i]):  # the worst, until the rest is in half
            if left_d <= COMPLETENESS_TARGET * abs(diff) / 2 and left_e <= COMPLETENESS_TARGET * scale / 2:
                break
            if panels[i][1] - panels[i][0] > MIN_PANEL:
                split.append(i)
            left_d, left_e = left_d - abs(deltas[i]), left_e - errs[i]
        split = split[:(budget - used) // (2 * k)]
        if not split:
            break
        halves = [h for i in split for h in ((panels[i][0], sum(panels[i]) / 2), (sum(panels[i]) / 2, panels[i][1]))]
        new_attrs, new_deltas = run(halves)
        used += k * len(halves)
        rows = [(panels[i], attrs[i], deltas[i], errs[i]) for i in range(len(panels)) if i not in set(split)]
        for j, i in enumerate(split):
            a1, a2 = new_attrs[2 * j], new_attrs[2 * j + 1]
            e = float((attrs[i] - a1 - a2).abs().sum()) / 2  # the parent's disagreement, half to each half
            rows += [(halves[2 * j], a1, new_deltas[2 * j], e), (halves[2 * j + 1], a2, new_deltas[2 * j + 1], e)]
        rows.sort(key=lambda r: r[0])
        panels, attrs, deltas, errs = (list(c) for c in zip(*rows))
    attr = torch.stack(attrs).sum(0, keepdim=True)  # # [1, positions]
    delta = float(attr.sum()) - diff
    bound, score_err, _ = measures()
    bound = bound if diff else None
    converged = (bound is not None and bound <= COMPLETENESS_TARGET
                 and (not adaptive or score_err <= COMPLETENESS_TARGET))
    score_err = score_err if adaptive and math.isfinite(score_err) else None  # None: never compared with halves
    return {"attr": attr, "steps": k * len(panels), "steps_used": used, "step_budget": budget if adaptive else None,
            "convergence_delta": delta, "baseline_difference": diff,
            "completeness_error": abs(delta) / abs(diff) if diff else None, "error_bound": bound,
            "score_error": score_err, "converged": converged, "panels": panels}


def _captum(model, ex: Example, method: str, steps, budget: int, batch: int, progress) -> dict:
    from captum.attr import FeatureAblation, Saliency

    embeds, base = embeddings(model, ex)

    def logprob(e):
        return logprob_of(target_logits(model, ex, inputs_embeds=e), ex)

    out: dict = {}
    if method == "ig":
        res = integrated_gradients(logprob, embeds, base, steps=steps, budget=budget, batch=batch, progress=progress)
        panels = res.pop("panels")
        out["ig"] = {"segments": len(panels), "shortest_segment": min(b - a for a, b in panels),
                     "error_bound": res.pop("error_bound"), "score_error": res.pop("score_error")}
        out["token_relevance"] = res.pop("attr").float()[0]  # already per position
        out.update(res, completeness_target=COMPLETENESS_TARGET)
        return out
    if method == "saliency":
        attr = Saliency(_Counter(logprob, 1, progress, "saliency")).attribute(embeds.requires_grad_(True), abs=True)
    else:  # ablation: one feature per prompt token; everything else one group that ablates to itself
        n = len(ex.features)
        mask = torch.full((1, len(ex.ids), 1), n, dtype=torch.long, device=embeds.device)
        mask[0, ex.features, 0] = torch.arange(n, device=embeds.device)
        fwd = _Counter(logprob, 1 + math.ceil((n + 1) / batch), progress, "ablation")
        with torch.no_grad():
            attr = FeatureAblation(fwd).attribute(embeds, baselines=base, feature_mask=mask.expand_as(embeds),
                                                  perturbations_per_eval=batch)
    # the gradient methods give one value per embedding element (summed per token, as captum's LLM
    # attribution does); ablation gives the whole token's Δ to each element of its group
    attr = attr.detach().float()
    out["token_relevance"] = (attr[..., 0] if method == "ablation" else attr.sum(-1))[0]
    return out


_STRUCTURE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _structure(model) -> tuple[dict, dict, int | None]:
    """(blocks by layer, output projections by layer, query heads) of a model, found once per instance."""
    from analysis.checkpoints.modules import architecture, block_modules, modules_of_kind

    if model not in _STRUCTURE:
        _STRUCTURE[model] = (block_modules(model), {L: m for L, (m, _, _) in modules_of_kind(model, "o").items()},
                             architecture(model).num_heads)
    return _STRUCTURE[model]


def _relevance(model, ex: Example, method: str, progress) -> dict:
    """Activation × (modified) gradient of the target logit at the embeddings, after every block and
    at every head's output, from one forward and one backward."""
    from analysis.attribution.lrp import lrp_rules
    from analysis.checkpoints.modules import hooks

    embeds, _ = embeddings(model, ex)
    embeds.requires_grad_(True)
    blocks, o_proj, H = _structure(model)
    outs: dict[int, torch.Tensor] = {}
    head_in: dict[int, torch.Tensor] = {}

    def post(L):
        def fn(module, args, kwargs, output):
            outs[L] = output[0] if isinstance(output, tuple) else output
        return fn

    def pre(L):
        def fn(module, args, kwargs):
            head_in[L] = args[0]
        return fn

    variant = LRP_VARIANT.get(method)
    rules = lrp_rules(model, variant) if variant else nullcontext()
    with rules, hooks(pre=[(m, pre(L)) for L, m in o_proj.items()], post=[(m, post(L)) for L, m in blocks.items()]):
        logits = target_logits(model, ex, inputs_embeds=embeds)
        f = logit_of(logits, ex)[0]
        layers, heads = sorted(outs), sorted(head_in)
        grads = torch.autograd.grad(f, [embeds, *(outs[L] for L in layers), *(head_in[L] for L in heads)],
                                    allow_unused=True)
    if progress:
        progress(1, 1, method)
    rel = (embeds * grads[0]).detach().double().sum(-1)[0]  # [positions]
    total, logit = float(rel.sum()), float(f.detach())
    out = {"token_relevance": rel, "relevance_sum": total, "target_logprob": float(logprob_of(logits.detach(), ex)[0]),
           "target_logit": logit,
           "conservation_error": abs(total - logit) / abs(logit) if logit else None}
    layer_rel = [((outs[L] * g).detach().double().sum(-1)[0] if g is not None else torch.zeros(len(ex.ids),
                  dtype=torch.float64)) for L, g in zip(layers, grads[1:1 + len(layers)])]
    if layer_rel:
        out["layers"] = [float(r.sum()) for r in layer_rel]
        out["layer_tokens"] = [r[:ex.n_prompt].tolist() for r in layer_rel]
    if heads and H:
        out["heads"] = [((head_in[L] * g).detach().double().unflatten(-1, (H, -1)).sum((0, 1, 3)).tolist()
                         if g is not None else [0.0] * H) for L, g in zip(heads, grads[1 + len(layers):])]
    return out


def faithfulness(model, ex: Example, scores, *, batch: int | None = None) -> dict:
    """Perturbation curves of one set of token scores.

    The prompt's feature tokens are replaced by the baseline token one more at a time, most relevant
    first (MoRF) and least relevant first (LeRF); each curve is the drop of log p(target) from the
    unperturbed prompt after k removals, k = 0 … n. ABPC = mean over k of (MoRF drop − LeRF drop):
    positive when the method ranks tokens better than its reverse.

    Returns:
        dict: ``morf``, ``lerf`` (n + 1 drops each), ``abpc``, ``order`` (MoRF positions).
    """
    s = torch.as_tensor(scores, dtype=torch.float64)
    order = sorted(ex.features, key=lambda i: (-float(s[i]), i))
    lerf_order = sorted(ex.features, key=lambda i: (float(s[i]), i))
    dev = next(model.parameters()).device
    rows = []
    for seq in (order, lerf_order):
        for k in range(len(seq) + 1):
            ids = list(ex.ids)
            for i in seq[:k]:
                ids[i] = ex.baseline_id
            rows.append(ids)
    x = torch.tensor(rows, device=dev)
    batch = batch or max(1, BATCH_TOKENS.get(dev.type, 4096) // len(ex.ids))
    with torch.no_grad():
        lp = torch.cat([logprob_of(target_logits(model, ex, input_ids=x[i:i + batch]), ex)
                        for i in range(0, len(rows), batch)]).double().cpu()
    n = len(order) + 1
    full = float(lp[0])
    morf = [full - float(v) for v in lp[:n]]
    lerf = [full - float(v) for v in lp[n:]]
    return {"morf": morf, "lerf": lerf, "abpc": sum(a - b for a, b in zip(morf, lerf)) / n, "order": order}


def attribute(model, tokenizer, prompt: str, target: str | None = None, method: str = "lrp-cp", *,
              steps: int | str | None = None, budget: int = DEFAULT_BUDGET, batch: int | None = None,
              with_faithfulness: bool = True, progress=None, baseline_id: int | None = None) -> Attribution:
    """Relevance of each prompt token (and, for ixg / LRP, of each layer and head) for the target.

    Args:
        model: a causal LM (Llama, Qwen2, GPT-2 ...) or a BERT-family ``…ForMaskedLM``, in eval mode,
            on the device to run on (never modified; LRP rules are undone on exit).
        tokenizer: its tokenizer.
        prompt (str): the prompt text (the tokenizer adds its special tokens).
        target (str, optional): the continuation to explain. Default: the model's greedy continuation.
        method (str): one of :data:`METHODS`. Default: ``lrp-cp``.
        steps (int or "auto", optional): IG's integration steps, 1 … :data:`MAX_STEPS` (one
            Gauss-Legendre rule), or None / ``"auto"``: the adaptive rule of
            :func:`integrated_gradients`. Default: adaptive.
        budget (int): the adaptive rule's budget of gradient evaluations. Default: 4,096.
        batch (int, optional): IG steps / ablations per forward. Default: as many as fit
            :data:`BATCH_TOKENS` (all 50 steps of a prompt under 80 tokens on CPU).
        with_faithfulness (bool): also compute the perturbation curves. Default: True.
        progress (callable, optional): ``progress(done, total, method)``.
        baseline_id (int, optional): the token a removed prompt token becomes. Default: pad / unk / eos.
    Returns:
        Attribution: the scores, target logit and log-probability, completeness / conservation
        error (IG: also its steps, budget and whether it converged), layers and heads where the
        method gives them, and the perturbation curves. ``info["unknown"]`` lists prompt characters
        the tokenizer read as its unk token.
    Raises:
        AttributionError: an unknown method, IG steps, budget or batch out of bounds, a bad prompt
            or target (empty, longer than the model reads — checked before a continuation is
            generated —, a target the tokenizer does not know).
    """
    if method not in METHODS:
        raise AttributionError(f"unknown attribution method {quoted(method)}; one of {', '.join(METHODS)}")
    check_ig_options(steps if method == "ig" else None, budget, batch)
    dev = next(model.parameters()).device
    if target is None:
        target = greedy_target(model, tokenizer, prompt)
    else:
        prompt_tokens(model, tokenizer, prompt)  # a long prompt refused before the target is tokenized
    ex = encode(tokenizer, prompt, target, masked_lm=_is_masked_lm(model), baseline_id=baseline_id)
    if max(ex.ids) >= model.get_input_embeddings().num_embeddings:
        raise AttributionError("the tokenizer produced ids outside the model's vocabulary")
    limit = position_limit(model)
    if len(ex.ids) > limit:
        raise AttributionError(f"prompt and target are {len(ex.ids):,} tokens; the model reads at most {limit:,}")
    runs = (budget if steps in (None, "auto") else steps) if method == "ig" else len(ex.features) + 1
    batch = batch or max(1, min(runs, BATCH_TOKENS.get(dev.type, 4096) // len(ex.ids)))
    t0 = time.perf_counter()
    if method in RELEVANCE_METHODS:  # its pass gives the logit and log-probability too
        res = _relevance(model, ex, method, progress)
    else:
        with torch.no_grad():
            logits = target_logits(model, ex, input_ids=torch.tensor([ex.ids], device=dev))
        res = {"target_logit": float(logit_of(logits, ex)[0]), "target_logprob": float(logprob_of(logits, ex)[0]),
               **_captum(model, ex, method, steps, budget, batch, progress)}
    seconds = time.perf_counter() - t0
    rel = res.pop("token_relevance")
    info = {"features": ex.features, "baseline_token": ex.baseline_id, "unknown": ex.unknown,
            "other_positions": [float(v) for v in rel[ex.n_prompt:]]}
    if "ig" in res:
        info["ig"] = res.pop("ig")
    scores = [float(v) for v in rel[:ex.n_prompt]]
    out = Attribution(method=method, explains="target logit" if method in RELEVANCE_METHODS else "log p(target)",
                      tokens=ex.tokens, scores=scores, target=target, target_tokens=ex.target_tokens,
                      seconds=seconds, device=str(dev), **res, info=info)
    if with_faithfulness:
        out.faithfulness = faithfulness(model, ex, scores)
    return out


def compare(a: Attribution, b: Attribution, *, top: int = 10) -> dict:
    """The same prompt, target and method on two checkpoints: b − a per token, layer and head, and
    the heads whose relevance moved most.

    Raises:
        AttributionError: the two results are of different methods or tokenizations.
    """
    if a.method != b.method:
        raise AttributionError(f"cannot compare {a.method} with {b.method}")
    if a.tokens != b.tokens or a.target_tokens != b.target_tokens:
        raise AttributionError("the two checkpoints tokenize the prompt or target differently; "
                               "a difference map needs the same tokens")
    out = {"scores": [y - x for x, y in zip(a.scores, b.scores)],
           "target_logit": b.target_logit - a.target_logit,
           "target_logprob": b.target_logprob - a.target_logprob}
    if a.layers is not None and b.layers is not None and len(a.layers) == len(b.layers):
        out["layers"] = [y - x for x, y in zip(a.layers, b.layers)]
    if a.heads is not None and b.heads is not None and len(a.heads) == len(b.heads):
        d = [[y - x for x, y in zip(ra, rb)] for ra, rb in zip(a.heads, b.heads)]
        out["heads"] = d
        moved = sorted(((abs(v), L, h, v) for L, row in enumerate(d) for h, v in enumerate(row)), reverse=True)
        out["heads_moved"] = [{"layer": L, "head": h, "delta": v} for _, L, h, v in moved[:top]]
    return out


def head_weight_change(base, tuned, *, tol: float = PAPER_TOL) -> list[dict]:
    """Per query head, the fraction of its q/k/v/o weights a fine-tune changed at τ (from the
    streaming diff's per-unit counts; GQA: a kv head's k/v counts serve each of its query heads).

    Returns:
        list[dict]: ``{layer, head, changed, numel, fraction}`` sorted by fraction, largest first.
    """
    from analysis.sparsity.diff import diff_checkpoints

    res = diff_checkpoints(base, tuned, tol=tol)
    H, KV = res.arch.num_heads, res.arch.num_kv_heads or res.arch.num_heads
    acc: dict[tuple[int, int], list[int]] = {}
    for row in res.by_unit():
        if row["unit"] not in ("head", "kv_head"):
            continue
        for i, c in enumerate(row["changed"]):
            query_heads = [i] if row["unit"] == "head" else range(i * (H // KV), (i + 1) * (H // KV))
            for h in query_heads:
                a = acc.setdefault((row["layer"], h), [0, 0])
                a[0] += int(c)
                a[1] += int(row["numel"])
    rows = [{"layer": L, "head": h, "changed": c, "numel": n, "fraction": c / n if n else 0.0}
            for (L, h), (c, n) in acc.items()]
    return sorted(rows, key=lambda r: (-r["fraction"], r["layer"], r["head"]))
