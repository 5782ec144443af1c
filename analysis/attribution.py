"""Relevance of prompt tokens, layers and heads for a target continuation (DESIGN.md §7).

Six methods on one encoded example (:func:`encode`):

- ``ig``, ``saliency``, ``ablation`` — captum's ``IntegratedGradients``, ``Saliency`` and
  ``FeatureAblation`` on the input embeddings, explaining the target's log-probability
  ``log p(target | prompt)`` (summed over the target tokens, teacher-forced, as captum's
  ``LLMAttribution`` does). IG reports its convergence delta as the completeness error
  |Σ scores − (f(x) − f(x′))| / |f(x) − f(x′)|; x′ replaces every prompt token (not the special
  tokens) by the baseline token.
- ``ixg``, ``lrp-cp``, ``lrp-attn`` — activation × gradient in one forward and one backward,
  explaining the target logit (summed over the target tokens): plain gradients for ``ixg``, the
  modified gradients of :func:`analysis.lrp.lrp_rules` for the two LRP variants. The same pass
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

from analysis.errors import SubnetscopeError

METHODS = {
    "ig": "Integrated Gradients",
    "saliency": "Saliency |∇|",
    "ixg": "Input × Gradient",
    "ablation": "Feature Ablation",
    "lrp-cp": "CP-LRP",
    "lrp-attn": "AttnLRP",
}
LRP_VARIANT = {"lrp-cp": "cp", "lrp-attn": "attn"}
RELEVANCE_METHODS = ("ixg", "lrp-cp", "lrp-attn")  # one pass, target logit, layers and heads
DEFAULT_STEPS = 50
COMPLETENESS_WARN = 0.1  # the page warns (and offers more steps) above this relative error
DEFAULT_TARGET_TOKENS = 4  # a greedy continuation of at most this many tokens when no target is given
# tokens per forward when IG's steps or the ablations are batched (batch = budget // sequence length):
# one batch of all 50 steps of a short prompt is the fastest IG on CPU too (measured: SmolLM2-135M,
# 6 tokens, IG-50 2.65 s in one batch, 3.39 s in batches of 16)
BATCH_TOKENS = {"cpu": 4096, "cuda": 16384}


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
    steps: int | None = None
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


def encode(tokenizer, prompt: str, target: str, *, masked_lm: bool = False,
           baseline_id: int | None = None) -> Example:
    """Tokenizes a prompt (with the tokenizer's special tokens) and a target continuation.

    A causal LM reads ``prompt + target[:-1]`` and the logit at the last prompt position scores
    the first target token (teacher forcing). A masked LM reads ``prompt [MASK]… [SEP]``, one
    mask per target token.

    Raises:
        AttributionError: an empty prompt or target, or a tokenizer without a mask token for a
            masked LM.
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
        raise AttributionError(f"the target {target!r} has no tokens")
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
                   baseline_id=baseline_token(tokenizer) if baseline_id is None else int(baseline_id))


def greedy_target(model, tokenizer, prompt: str, max_tokens: int = DEFAULT_TARGET_TOKENS) -> str:
    """The model's greedy continuation of ``prompt`` (at most ``max_tokens`` tokens, up to EOS)."""
    if tokenizer is None:
        raise AttributionError("attribution needs the checkpoint's tokenizer; this directory has none")
    if _is_masked_lm(model):
        raise AttributionError("a masked language model needs a --target")
    ids = list(tokenizer(prompt)["input_ids"])
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
    """Calls of a forward function reported as progress (captum has no progress callback)."""

    def __init__(self, fn, total: int, progress, what: str):
        self.fn, self.total, self.progress, self.what, self.done = fn, max(total, 1), progress, what, 0

    def __call__(self, *args):
        out = self.fn(*args)
        self.done += 1
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

def _captum(model, ex: Example, method: str, steps: int, batch: int, progress) -> dict:
    from captum.attr import FeatureAblation, IntegratedGradients, Saliency

    embeds, base = embeddings(model, ex)

    def logprob(e):
        return logprob_of(target_logits(model, ex, inputs_embeds=e), ex)

    out: dict = {}
    if method == "ig":
        fwd = _Counter(logprob, math.ceil(steps / batch) + 2, progress, "ig")
        attr, delta = IntegratedGradients(fwd).attribute(
            embeds, baselines=base, n_steps=steps, internal_batch_size=batch, return_convergence_delta=True)
        with torch.no_grad():
            diff = float(logprob(embeds)[0] - logprob(base)[0])
        d = float(delta.reshape(-1)[0])
        out.update(steps=steps, convergence_delta=d, baseline_difference=diff,
                   completeness_error=abs(d) / abs(diff) if diff else None)
    elif method == "saliency":
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
    from analysis.selectors.base import architecture, block_modules, modules_of_kind

    if model not in _STRUCTURE:
        _STRUCTURE[model] = (block_modules(model), {L: m for L, (m, _, _) in modules_of_kind(model, "o").items()},
                             architecture(model).num_heads)
    return _STRUCTURE[model]


def _relevance(model, ex: Example, method: str, progress) -> dict:
    """Activation × (modified) gradient of the target logit at the embeddings, after every block and
    at every head's output, from one forward and one backward."""
    from analysis.lrp import lrp_rules
    from analysis.selectors.base import hooks

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
              steps: int = DEFAULT_STEPS, batch: int | None = None, with_faithfulness: bool = True,
              progress=None, baseline_id: int | None = None) -> Attribution:
    """Relevance of each prompt token (and, for ixg / LRP, of each layer and head) for the target.

    Args:
        model: a causal LM (Llama, Qwen2, GPT-2 ...) or a BERT-family ``…ForMaskedLM``, in eval mode,
            on the device to run on (never modified; LRP rules are undone on exit).
        tokenizer: its tokenizer.
        prompt (str): the prompt text (the tokenizer adds its special tokens).
        target (str, optional): the continuation to explain. Default: the model's greedy continuation.
        method (str): one of :data:`METHODS`. Default: ``lrp-cp``.
        steps (int): IG's integration steps. Default: 50.
        batch (int, optional): IG steps / ablations per forward. Default: as many as fit
            :data:`BATCH_TOKENS` (all 50 steps of a prompt under 80 tokens on CPU).
        with_faithfulness (bool): also compute the perturbation curves. Default: True.
        progress (callable, optional): ``progress(done, total, method)``.
        baseline_id (int, optional): the token a removed prompt token becomes. Default: pad / unk / eos.
    Returns:
        Attribution: the scores, target logit and log-probability, completeness / conservation
        error, layers and heads where the method gives them, and the perturbation curves.
    Raises:
        AttributionError: an unknown method, a bad prompt or target, IG steps < 1.
    """
    if method not in METHODS:
        raise AttributionError(f"unknown attribution method {method!r}; one of {', '.join(METHODS)}")
    if method == "ig" and (not isinstance(steps, int) or steps < 1):
        raise AttributionError(f"IG needs at least 1 step, got {steps!r}")
    dev = next(model.parameters()).device
    if target is None:
        target = greedy_target(model, tokenizer, prompt)
    ex = encode(tokenizer, prompt, target, masked_lm=_is_masked_lm(model), baseline_id=baseline_id)
    if max(ex.ids) >= model.get_input_embeddings().num_embeddings:
        raise AttributionError("the tokenizer produced ids outside the model's vocabulary")
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit and len(ex.ids) > limit:
        raise AttributionError(f"prompt and target are {len(ex.ids)} tokens; the model reads at most {limit}")
    runs = steps if method == "ig" else len(ex.features) + 1
    batch = batch or max(1, min(runs, BATCH_TOKENS.get(dev.type, 4096) // len(ex.ids)))
    t0 = time.perf_counter()
    if method in RELEVANCE_METHODS:  # its pass gives the logit and log-probability too
        res = _relevance(model, ex, method, progress)
    else:
        with torch.no_grad():
            logits = target_logits(model, ex, input_ids=torch.tensor([ex.ids], device=dev))
        res = {"target_logit": float(logit_of(logits, ex)[0]), "target_logprob": float(logprob_of(logits, ex)[0]),
               **_captum(model, ex, method, steps, batch, progress)}
    seconds = time.perf_counter() - t0
    rel = res.pop("token_relevance")
    scores = [float(v) for v in rel[:ex.n_prompt]]
    out = Attribution(method=method, explains="target logit" if method in RELEVANCE_METHODS else "log p(target)",
                      tokens=ex.tokens, scores=scores, target=target, target_tokens=ex.target_tokens,
                      seconds=seconds, device=str(dev), **res,
                      info={"features": ex.features, "baseline_token": ex.baseline_id,
                            "other_positions": [float(v) for v in rel[ex.n_prompt:]]})
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


def head_weight_change(base, tuned, *, tol: float = 1e-5) -> list[dict]:
    """Per query head, the fraction of its q/k/v/o weights a fine-tune changed at τ (from the
    streaming diff's per-unit counts; GQA: a kv head's k/v counts serve each of its query heads).

    Returns:
        list[dict]: ``{layer, head, changed, numel, fraction}`` sorted by fraction, largest first.
    """
    from analysis.diff import diff_checkpoints

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
