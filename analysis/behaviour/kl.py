"""Per-token KL between a fine-tune and its base, and the tokens whose probability moved most
(docs/design.md §15; RL's Razor, arXiv 2509.04259, for the KL on the task; the KL method of the
science-of-finetuning diffing toolkit for the tokens).

At every position i of a prompt as the tokenizer encodes it (special tokens included),
KL(p₁ ‖ p₀) = Σ_v p₁(v | x≤i) (log p₁(v | x≤i) − log p₀(v | x≤i)) in nats over the whole vocabulary,
p₁ the tune, p₀ the base, from log-softmax in float32 (the sum in float64).

Both models are kept in memory only when both fit (:func:`both_fit`); otherwise the base's
log-probabilities are computed and kept (on the CPU, float32), the base freed, then the tune's.
"""

from __future__ import annotations

import gc
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from analysis.behaviour.prompts import PromptsError
from analysis.errors import quoted

LOGIT_BYTES = 1 << 28  # the log-probabilities of one batch stay under 256 MiB
MAX_BATCH_TOKENS = 8192


def encode(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Every prompt's ids as the tokenizer encodes it, special tokens included.

    Raises:
        PromptsError: a prompt that tokenizes to nothing, or a checkpoint without a tokenizer.
    """
    if tokenizer is None:
        raise PromptsError("the checkpoint has no tokenizer: prompts cannot be encoded")
    out = []
    for i, p in enumerate(prompts):
        ids = list(tokenizer(p, add_special_tokens=True)["input_ids"])
        if not ids:
            raise PromptsError(f"prompt {i + 1} ({quoted(p[:40])}) tokenizes to nothing")
        out.append(ids)
    return out


def batches(ids: list[list[int]], vocab: int) -> list[list[int]]:
    """Prompt indices in batches of similar length, each batch's padded tokens × vocabulary under
    :data:`LOGIT_BYTES` of float32 (one prompt alone when it is longer)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    budget = max(1, min(MAX_BATCH_TOKENS, LOGIT_BYTES // (4 * max(1, vocab))))
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * len(ids[i]) <= budget:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def pad_id(tokenizer) -> int:
    return next((t for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                 if t is not None), 0)


def forward_log_probs(model, ids: list[list[int]], batch: list[int], pad: int) -> list[torch.Tensor]:
    """The next-token log-probabilities at every position of the prompts ``batch`` (right-padded,
    masked), each ``# [len, vocab]`` float32 on the model's device; differentiable (see
    :func:`log_probs` for the no-grad pass)."""
    dev = next(model.parameters()).device
    length = max(len(ids[i]) for i in batch)
    x = torch.full((len(batch), length), pad, dtype=torch.long)
    att = torch.zeros((len(batch), length), dtype=torch.long)
    for r, i in enumerate(batch):
        x[r, :len(ids[i])] = torch.tensor(ids[i])
        att[r, :len(ids[i])] = 1
    logits = model(input_ids=x.to(dev), attention_mask=att.to(dev), use_cache=False).logits
    lp = logits.float().log_softmax(-1)
    return [lp[r, :len(ids[i])] for r, i in enumerate(batch)]


log_probs = torch.no_grad()(forward_log_probs)


def token_kl(lp_tuned: torch.Tensor, lp_base: torch.Tensor) -> torch.Tensor:
    """KL(p_tuned ‖ p_base) per position of ``# [len, vocab]`` log-probabilities, in nats (float64;
    a token the tune gives probability 0 adds nothing)."""
    p = lp_tuned.double().exp()
    terms = torch.where(p > 0, p * (lp_tuned.double() - lp_base.double()), torch.zeros((), dtype=torch.float64,
                                                                                           device=p.device))
    return terms.sum(-1).clamp_min(0.0)  # ≥ 0 in exact arithmetic; rounding may leave −1e-17


@dataclass
class Moved:
    """What one position's distribution did: the candidates (the top ``top`` tokens of either model)
    sorted by the change of their log-probability."""

    position: int
    token: int
    delta: float  # log p_tuned − log p_base
    p_base: float
    p_tuned: float

    def to_json(self, tokenizer) -> dict:
        return {"position": self.position, "id": self.token, "token": token_text(tokenizer, self.token),
                "delta_logp": self.delta, "p_base": self.p_base, "p_tuned": self.p_tuned}


def token_text(tokenizer, i: int) -> str:
    return tokenizer.convert_ids_to_tokens(int(i)) if tokenizer is not None else str(i)


def moved(lp_tuned: torch.Tensor, lp_base: torch.Tensor, top: int) -> list[list[Moved]]:
    """Per position, the candidate tokens (either model's top ``top``) with their change, largest
    rise first."""
    k = min(top, lp_tuned.shape[-1])
    cand = torch.cat([lp_tuned.topk(k, -1).indices, lp_base.topk(k, -1).indices], -1)  # [len, 2k]
    out = []
    for pos in range(lp_tuned.shape[0]):
        ids = torch.unique(cand[pos])
        a, b = lp_tuned[pos, ids].double(), lp_base[pos, ids].double()
        d = a - b
        order = torch.argsort(d, descending=True)
        out.append([Moved(pos, int(ids[j]), float(d[j]), float(b[j].exp()), float(a[j].exp())) for j in order])
    return out


def compare_prompt(lp_tuned, lp_base, ids: list[int], tokenizer, top: int) -> dict:
    """One prompt's JSON: its tokens, the KL at every position and their mean, the ``top`` tokens
    whose log-probability rose and fell most over its positions (among the candidates)."""
    kl = token_kl(lp_tuned, lp_base).cpu()
    per = moved(lp_tuned.cpu(), lp_base.cpu(), top)
    flat = [m for row in per for m in row]
    rose = sorted((m for m in flat if m.delta > 0), key=lambda m: -m.delta)[:top]
    fell = sorted((m for m in flat if m.delta < 0), key=lambda m: m.delta)[:top]
    return {"ids": ids, "tokens": [token_text(tokenizer, i) for i in ids], "kl": kl.tolist(),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "rose": [m.to_json(tokenizer) for m in rose], "fell": [m.to_json(tokenizer) for m in fell],
            "_most": [(row[0].token, row[0].delta, row[-1].token, row[-1].delta) for row in per]}


def summarize(rows: list[dict], tokenizer, top: int) -> dict:
    """The dataset: the mean KL over all positions of all prompts, the per-prompt means' distribution,
    and the tokens that were most often the one that rose (fell) most at a position."""
    import numpy as np

    kls = np.concatenate([np.asarray(r["kl"], dtype=np.float64) for r in rows])
    means = np.asarray([r["kl_mean"] for r in rows], dtype=np.float64)
    counts: dict[str, Counter] = {"rose": Counter(), "fell": Counter()}
    sums: dict[str, dict] = {"rose": defaultdict(float), "fell": defaultdict(float)}
    for r in rows:
        for up, dup, down, ddown in r.pop("_most"):
            if dup > 0:
                counts["rose"][up] += 1
                sums["rose"][up] += dup
            if ddown < 0:
                counts["fell"][down] += 1
                sums["fell"][down] += ddown
    tokens = {w: [{"id": t, "token": token_text(tokenizer, t), "positions": n, "mean_delta_logp": sums[w][t] / n}
                  for t, n in counts[w].most_common(top)] for w in counts}
    q = np.quantile(means, [0.0, 0.25, 0.5, 0.75, 1.0]).tolist()
    return {"kl_mean": float(kls.mean()), "kl_prompt_mean": float(means.mean()), "positions": int(kls.size),
            "kl_quantiles": dict(zip(("min", "q25", "median", "q75", "max"), q)),
            "rose": tokens["rose"], "fell": tokens["fell"]}


def both_fit(*refs: str, dtype_bytes: int = 4, device: str = "cpu") -> bool:
    """Whether two models of these checkpoints' sizes fit in memory at once (with half of what is
    available to spare), judged from their headers."""
    from analysis.specs.common import parameters_of

    need = sum(parameters_of(r) for r in refs) * dtype_bytes
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return need <= free // 2
    import psutil

    return need <= psutil.virtual_memory().available // 2


def behaviour(base_ref: str, tuned_ref: str, prompts: list[str], *, top: int = 10, device: str = "auto",
              keep_both: bool | None = None, progress: Callable | None = None) -> dict:
    """Per-token KL of ``tuned_ref`` against ``base_ref`` on ``prompts``, and the tokens that moved.

    Args:
        keep_both (bool, optional): hold both models (True) or the base's log-probabilities (False).
            Default: both when :func:`both_fit`.
        progress (callable, optional): ``progress(done, total, what)`` per batch.

    Returns:
        dict: ``prompts`` (per prompt: ``tokens``, ``kl`` per position, ``kl_mean``, ``rose``,
        ``fell``), the dataset's ``kl_mean`` and distribution.
    """
    import time

    from analysis.checkpoints import align, open_checkpoint
    from analysis.checkpoints.models import load_model, resolve_device

    al = align([open_checkpoint(base_ref), open_checkpoint(tuned_ref)])  # another architecture: one line, no model
    if al.resized:
        r = al.resized[0]
        raise PromptsError(f"{tuned_ref}: its vocabulary was resized from {base_ref}'s ({r['key']}: "
                           f"{' vs '.join(map(str, r['shapes']))}); KL needs one vocabulary")
    dev = resolve_device(device)
    half = dev.type == "cuda"
    keep = both_fit(base_ref, tuned_ref, dtype_bytes=2 if half else 4, device=dev.type) if keep_both is None \
        else keep_both
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if half else torch.float32
    base, tokenizer = load_model(base_ref, device=dev, dtype=dtype)
    if tokenizer is None:  # the tune's tokenizer then (a base saved without one)
        if _has_tokenizer(tuned_ref):
            tokenizer = _load_tokenizer(tuned_ref)
    ids = encode(tokenizer, prompts)
    pad = pad_id(tokenizer)
    groups = batches(ids, base.config.get_text_config().vocab_size)
    total = 2 * len(groups)
    rows: list[dict | None] = [None] * len(ids)
    if keep:
        tuned, _ = load_model(tuned_ref, device=dev, dtype=dtype)
        for n, g in enumerate(groups):
            for i, b, a in zip(g, log_probs(base, ids, g, pad), log_probs(tuned, ids, g, pad)):
                rows[i] = compare_prompt(a, b, ids[i], tokenizer, top)
            if progress:
                progress(2 * (n + 1), total, "prompts")
    else:  # the base's log-probabilities kept (CPU, float32), the base freed, then the tune's
        kept: dict[int, torch.Tensor] = {}
        for n, g in enumerate(groups):
            for i, b in zip(g, log_probs(base, ids, g, pad)):
                kept[i] = b.cpu()
            if progress:
                progress(n + 1, total, "base")
        del base
        gc.collect()
        tuned, _ = load_model(tuned_ref, device=dev, dtype=dtype)
        for n, g in enumerate(groups):
            for i, a in zip(g, log_probs(tuned, ids, g, pad)):
                rows[i] = compare_prompt(a.cpu(), kept.pop(i), ids[i], tokenizer, top)
            if progress:
                progress(len(groups) + n + 1, total, "tune")
    out_rows = [r for r in rows if r is not None]
    for r, p in zip(out_rows, prompts):
        r["prompt"] = p
    summary = summarize(out_rows, tokenizer, top)
    return {"schema": "subnetscope.behaviour/1", "base": str(base_ref), "tuned": str(tuned_ref),
            "device": str(dev), "both_in_memory": bool(keep), "top": top, "prompts": out_rows, **summary,
            "seconds": time.perf_counter() - t0}


def _load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    from analysis.checkpoints import open_checkpoint
    from analysis.checkpoints.models import ModelLoadError
    from analysis.errors import one_line

    path = open_checkpoint(ref).path
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types: one line
        raise ModelLoadError(f"{path}: the tokenizer cannot be loaded: {type(e).__name__}: {one_line(e)}") from None


def _has_tokenizer(ref: str) -> bool:
    from analysis.checkpoints import open_checkpoint
    from analysis.checkpoints.models import TOKENIZER_FILES

    path = open_checkpoint(ref).path
    return any((path / f).exists() for f in TOKENIZER_FILES)


def iter_log_probs(model, tokenizer, prompts: list[str]) -> Iterator[tuple[int, torch.Tensor]]:
    """(prompt index, ``# [len, vocab]`` log-probabilities) of every prompt, batch by batch."""
    ids = encode(tokenizer, prompts)
    for g in batches(ids, model.config.get_text_config().vocab_size):
        yield from zip(g, log_probs(model, ids, g, pad_id(tokenizer)))
