"""Where a run's mask comes from: mask files, a diff, a selector, a random draw, or ID3's growing
mask (its D3 scores), and the checks that a mask fits the model it trains.

A mask is ``{parameter name: BoolTensor}`` in the parameter's shape; None means every parameter,
an empty dict ID3's mask before it grows.
"""

from __future__ import annotations

import hashlib

import torch

from analysis.finetune.config import FinetuneConfig, FinetuneConfigError

Mask = dict[str, torch.Tensor]


def block_weights(model) -> list[str]:
    """The 2-D attention and MLP weights inside the transformer blocks (the universe of random and
    ID3 masks; the same ``blocks`` scope as the selectors' budgets, for every supported family)."""
    from analysis.importance.scores import in_scope

    return [n for n, p in model.named_parameters() if in_scope(n, p.shape, None, "blocks")]


def build_mask(config: FinetuneConfig, model, calibration=None) -> Mask | None:
    """The elements to train (None: all of them; an empty dict: ID3's mask, grown during the run).

    Args:
        config (FinetuneConfig): the run; its source says which mask.
        model (nn.Module): the model the mask must fit.
        calibration (Callable[[], list], optional): the task's calibration batches (a selector
            mask scores on them).

    Raises:
        FinetuneConfigError: a mask that names none of the model's parameters or another shape, a
            selector mask without calibration data.
    """
    params = dict(model.named_parameters())
    source = config.source
    if source in ("full", "lora"):
        return None
    if source == "id3":
        return {}
    if source == "mask":
        return fit_mask(combine_mask_files(config.mask, config.mask_combine), params, " ".join(config.mask))
    if source == "diff":
        from analysis.sparsity.diff import diff_checkpoints

        masks: Mask = {}
        diff_checkpoints(config.diff[0], config.diff[1], tol=config.diff_tol, on_mask=masks.__setitem__)
        return fit_mask(masks, params, f"the diff {config.diff[0]} -> {config.diff[1]}")
    if source == "selector":
        from analysis.importance.scores import compute_scores, scores_to_mask

        if calibration is None:
            raise FinetuneConfigError("a selector mask needs the task's calibration data")
        scores = compute_scores(model, config.selector, calibration(), granularity=config.granularity,
                                seed=config.seed)
        return fit_mask(scores_to_mask(scores, config.density, budget=config.budget), params, config.selector)
    return random_mask(model, config.random, config.seed)


def combine_mask_files(paths: list[str], combine: str) -> Mask:
    """Mask files read and combined: ``union``, ``intersect``, ``minus`` (the first without the
    others) or ``consensus:K``."""
    from analysis.sparsity import masks as M

    loaded = [M.load_mask(p) for p in paths]
    if len(loaded) == 1:
        return loaded[0]
    if combine == "union":
        return M.union(*loaded)
    if combine == "intersect":
        return M.intersect(*loaded)
    if combine == "minus":
        rest = M.union(*loaded[1:])
        M.intersect(loaded[0], rest)  # the same compatibility check
        return {n: loaded[0][n] & ~rest[n] for n in loaded[0]}
    return M.consensus(loaded, int(combine.split(":")[1]))


def random_mask(model, density: float, seed: int) -> Mask:
    """Exactly ``round(density · n)`` elements of the blocks' weight matrices, uniformly at random."""
    params = dict(model.named_parameters())
    names = block_weights(model)
    sizes = [params[n].numel() for n in names]
    n = sum(sizes)
    g = torch.Generator().manual_seed(seed)
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.randperm(n, generator=g)[: round(density * n)]] = True
    return {name: part.reshape(params[name].shape) for name, part in zip(names, flat.split(sizes))}


def fit_mask(mask: Mask, params: dict, what: str) -> Mask:
    """Keeps the entries of the model's parameters; a mask naming none of them is an error."""
    kept = {n: m for n, m in mask.items() if n in params}
    if mask and not kept:
        raise FinetuneConfigError(f"{what}: the mask names none of the checkpoint's parameters "
                                  f"(e.g. {next(iter(mask))})")
    for n, m in kept.items():
        if tuple(m.shape) != tuple(params[n].shape):
            raise FinetuneConfigError(f"{what}: mask {n} has shape {tuple(m.shape)}, the parameter "
                                      f"{tuple(params[n].shape)}")
    return kept


def check_mask_fits(path: str, ck) -> None:
    """A mask file must name tensors of the checkpoint, each with that tensor's shape (checked
    before a run directory exists)."""
    from analysis.sparsity.masks import load_mask
    from analysis.checkpoints.structure import normalize_name

    mask = load_mask(path)  # a missing, foreign or damaged file is a MaskError
    shapes = {t.key: t.shape for t in ck.tensors.values()}
    foreign = [n for n in mask if normalize_name(n) not in shapes]
    if foreign:
        raise FinetuneConfigError(f"{path}: names {len(foreign)} tensor(s) that {ck.path} does not hold "
                                  f"(e.g. {foreign[0]}); a mask of another model?")
    for n, m in mask.items():
        if tuple(m.shape) != tuple(shapes[normalize_name(n)]):
            raise FinetuneConfigError(f"{path}: {n} has shape {tuple(m.shape)}, the checkpoint's tensor "
                                      f"{tuple(shapes[normalize_name(n)])}")


def mask_digest(mask: Mask) -> str:
    """SHA-256 of a mask's names and bits (the processes of a run must build the same mask)."""
    h = hashlib.sha256()
    for n in sorted(mask):
        h.update(n.encode())
        h.update(mask[n].cpu().numpy().tobytes())
    return h.hexdigest()


def d3_scores(param: torch.nn.Parameter, exp: float, eps: float) -> torch.Tensor:
    """ID3's D3 importance of each element: |g| / (|θ| + ε)^exp (float32, shaped like the parameter)."""
    g = param.grad.float().abs()
    return g if exp == 0 else g / (param.detach().float().abs() + eps).pow(exp)


def with_lora(model, rank: int):
    """PEFT LoRA on the attention and MLP projections (the LoRA control of docs/design.md §8), chosen by
    module kind (:func:`analysis.checkpoints.structure.lora_targets`). GPT-2's ``Conv1D`` stores its weight
    [in, out]: PEFT is told so (``fan_in_fan_out``)."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    from analysis.checkpoints.structure import lora_targets

    targets = lora_targets(model)
    if not targets:
        raise FinetuneConfigError(f"--lora: no attention or MLP projection found in this {type(model).__name__} "
                                  "(the supported families: Llama, GPT-2, BERT naming)")
    conv1d = any(isinstance(model.get_submodule(n), Conv1D) for n in targets)
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets,
                                            fan_in_fan_out=conv1d))
