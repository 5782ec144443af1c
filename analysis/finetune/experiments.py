"""Ready-made experiments of the fine-tuning lab.

:func:`paper_experiment` is the experiment of Mukherjee et al. (arXiv 2505.11711 §4) on the demo
family: retrain the RL update from SFT with only the subnetwork the RL run changed, against a
random mask of the same density, the full model, and LoRA.
"""

from __future__ import annotations

from analysis.finetune.config import DEMO_RL_RECIPE, LORA_LR_FACTOR, FinetuneConfig
from analysis.definitions import PAPER_TOL


def block_density(base: str, tuned: str, tol: float = PAPER_TOL) -> float:
    """The fraction of the transformer blocks' weight matrices that ``base`` → ``tuned`` changed at
    τ: the density a random control mask must have to match a diff mask's size.

    Raises:
        SubnetscopeError: the checkpoints cannot be read or compared (one line).
    """
    from analysis.sparsity.diff import diff_checkpoints

    res = diff_checkpoints(base, tuned, tol=tol)
    blocks = [t for t in res.tensors if t.layer is not None and len(t.shape) == 2]
    total = sum(t.numel for t in blocks)
    return sum(t.changed for t in blocks) / total if total else 0.0


def paper_experiment(sft: str, rl: str, *, tol: float = PAPER_TOL) -> list[FinetuneConfig]:
    """Four runs from ``sft`` with the demo's RL training (:data:`DEMO_RL_RECIPE`): the ``sft`` →
    ``rl`` diff mask, a random mask of the same block density, all parameters, and LoRA r=4
    (at lr 1e-4, LoRA's usual tenfold rate)."""
    rl_args = dict(checkpoint=sft, task="demo-rl", **DEMO_RL_RECIPE)
    density = block_density(sft, rl, tol)
    return [FinetuneConfig(diff=[sft, rl], diff_tol=tol, **rl_args),
            FinetuneConfig(random=round(density, 4), **rl_args),
            FinetuneConfig(full=True, **rl_args),
            FinetuneConfig(lora=4, **{**rl_args, "lr": rl_args["lr"] * LORA_LR_FACTOR})]


def matched_random(config: dict, trainable: int) -> FinetuneConfig:
    """The random-mask control of a finished masked run: its recipe (start, task, steps, batch, lr,
    seed, evaluation) with a random mask of the same number of trainable elements — the density
    ``trainable`` over the blocks' weight matrices of the start checkpoint (read from its headers), so
    :func:`analysis.finetune.compare.same_budget` pairs the two.

    Raises:
        SubnetscopeError: the start checkpoint cannot be read, or has no block matrices.
    """
    import math
    from dataclasses import replace

    from analysis.checkpoints import open_checkpoint
    from analysis.errors import SubnetscopeError
    from analysis.importance.scores import in_scope

    cfg = FinetuneConfig.from_dict(config)
    ck = open_checkpoint(cfg.checkpoint, local_only=True)
    blocks = sum(math.prod(t.shape) for t in ck.tensors.values() if in_scope(t.name, t.shape, ck.arch.family, "blocks"))
    if not blocks:
        raise SubnetscopeError(f"{cfg.checkpoint}: no block matrices to draw a random mask from")
    sources = dict(mask=None, selector=None, diff=None, id3=None, full=False, lora=None, granularity=None,
                   budget=None, density=None)
    return replace(cfg, **sources, random=round(max(trainable, 1) / blocks, 6))
