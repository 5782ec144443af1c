"""The embedded demo family: tiny Llama (GQA) causal LMs trained offline on 2-digit arithmetic.

``build_demo`` trains, deterministically and in about 1.5 minutes on two CPU cores:

- ``base``: pretrained from scratch on lines such as ``12+07=19`` (loss on the result);
- ``sft``: a full fine-tune of ``base`` on a question/answer format, ``Q:12+07\\nA:19``;
- ``rl-seed1``, ``rl-seed2``: policy gradient from ``sft`` with exact-match reward, two seeds;
  ``rl-seed1``'s run is also saved at five points along the way (``rl-seed1-steps/step-10`` …
  ``step-50``, the last equal to ``rl-seed1``): a short trajectory for ``trajectory`` and the app;

each saved as a bf16 safetensors Hugging Face directory with a character tokenizer. At this toy
scale it reproduces the qualitative findings of Mukherjee et al., *Reinforcement Learning
Finetunes Small Subnetworks in Large Language Models* (arXiv 2505.11711): RL updates are far
sparser than the SFT update, and the two RL subnetworks overlap more than chance. Much of both
comes from bf16 storage absorbing small updates (docs/design.md §9) — the app shows that.

The task itself (tokenizer, problems, prompts, generation, reward) is :mod:`analysis.families.demo_task`;
the SmolLM2 conversion (``demo --real``) is :mod:`analysis.families.smollm2`.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from analysis.families.demo_task import (BOS, CHARS, EOS, N_HELD_OUT, PAD, SPECIALS, evaluate, lm_batch, make_tokenizer,
                                         qa_prompt, rl_loss, split_problems)
from analysis.errors import SubnetscopeError
from analysis.io import replace_dir
from analysis.paths import default_demo_dir
from analysis.training import lm_loss, scheduler

RECIPE_VERSION = "4"  # bump whenever anything below changes what is built (4: rl-seed1's trajectory)
MODEL_NAMES = ("base", "sft", "rl-seed1", "rl-seed2")
TRAJECTORY_OF = "rl-seed1"  # the run saved along the way
TRAJECTORY_POINTS = 5  # checkpoints of it, evenly spaced, the last at its final step


def trajectory_steps(steps: int) -> list[int]:
    """The steps at which the trajectory run is saved: every ``steps // 5``, and the last."""
    every = max(1, steps // TRAJECTORY_POINTS)
    return sorted({s for s in range(every, steps + 1, every)} | {steps})


def trajectory_dirs(out_dir: Path) -> list[Path]:
    """The demo run's checkpoints in training order (``rl-seed1-steps/step-N``), from the manifest;
    [] when the family has none."""
    try:
        entry = json.loads((Path(out_dir) / "manifest.json").read_text())["models"][TRAJECTORY_OF]
        return [Path(out_dir) / p for p in entry["trajectory"]["paths"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


class DemoError(SubnetscopeError):
    """A demo family or SmolLM2 conversion that cannot be built, explained in one line."""


@dataclass(frozen=True)
class Stage:
    """One model of the family and how it is trained from its parent."""

    name: str
    parent: str | None
    steps: int
    lr: float
    seed: int
    batch: int  # sequences per step; for RL, prompts per step (each sampled RL_GROUP times)


RECIPE = (
    Stage("base", None, steps=600, lr=3e-3, seed=0, batch=128),
    Stage("sft", "base", steps=300, lr=1e-3, seed=0, batch=128),
    Stage("rl-seed1", "sft", steps=50, lr=1e-5, seed=1, batch=16),
    Stage("rl-seed2", "sft", steps=50, lr=1e-5, seed=2, batch=16),
)


def demo_is_current(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a complete family built by the current recipe.

    Args:
        out_dir (Path): a directory written by :func:`build_demo`.

    Returns:
        bool: True iff ``manifest.json`` parses, names :data:`RECIPE_VERSION`, and every model
        directory has ``config.json``, ``model.safetensors`` and the tokenizer files.
    """
    try:
        manifest = json.loads((Path(out_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("recipe_version") != RECIPE_VERSION:
        return False
    files = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    dirs = [Path(out_dir) / name for name in MODEL_NAMES] + trajectory_dirs(out_dir)
    return len(dirs) > len(MODEL_NAMES) and all((d / f).is_file() for d in dirs for f in files)


# --- model, training, evaluation -------------------------------------------------------------

def _new_model(seed: int):
    """A 4-layer Llama with GQA (4 query heads, 2 kv heads), hidden 64, untied: 184,512 params."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(SPECIALS) + len(CHARS), hidden_size=64, intermediate_size=172,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=32, tie_word_embeddings=False,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _lr_factor(steps: int):
    """The demo's schedule as a multiplier of 1-based step ``s``: linear warm-up over 50 steps,
    constant, then linear decay to 0 over the last 20%."""
    decay_from = int(0.8 * steps)

    def factor(s: int) -> float:
        peak = min(1.0, s / 50)
        return peak if s - 1 < decay_from else peak * (steps - s + 1) / (steps - decay_from)

    return factor


def train_lm(model, examples: Callable[[], list[tuple[str, str]]], stage: Stage, *,
             progress: bool = False, should_stop: Callable[[], bool] | None = None) -> None:
    """Supervised next-token training with AdamW (β₂ 0.98, no weight decay), in place.

    Args:
        model (LlamaForCausalLM): an fp32 model.
        examples (Callable): returns one batch of ``(prompt, target)`` texts; the loss is taken
            on the target and ``<eos>`` only (loss on the random operands slowed learning ~10×).
        stage (Stage): steps and peak learning rate of :func:`_lr_factor`'s schedule.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=stage.lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = scheduler(opt, _lr_factor(stage.steps))
    model.train()
    for _ in tqdm(range(stage.steps), desc=stage.name, disable=not progress, file=sys.stderr):
        _check_stop(should_stop)
        inputs, labels = lm_batch(examples())
        loss = lm_loss(model(input_ids=inputs, use_cache=False).logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def train_rl(model, problems: list[tuple[str, str]], stage: Stage, *, progress: bool = False,
             should_stop: Callable[[], bool] | None = None,
             after_step: Callable[[int], None] | None = None) -> None:
    """Policy gradient with exact-match reward and a group-mean baseline, in place.

    Each step samples ``stage.batch`` prompts and ``RL_GROUP`` completions of each; advantage =
    reward − the group's mean reward; loss = −mean(advantage · log p(completion)). AdamW without
    weight decay on fp32 master weights (the caller loads them from the bf16 parent).

    Args:
        model (LlamaForCausalLM): an fp32 model.
        problems (list[tuple[str, str]]): the training problems prompts are drawn from.
        stage (Stage): steps, learning rate, seed and prompts per step.
        after_step (callable, optional): called with the 1-based step after each optimizer step
            (it must not touch the model's weights or the random state).
    """
    rng = random.Random(stage.seed)
    gen = torch.Generator().manual_seed(stage.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=stage.lr, weight_decay=0.0)
    for step in tqdm(range(1, stage.steps + 1), desc=stage.name, disable=not progress, file=sys.stderr):
        _check_stop(should_stop)
        loss, _, _ = rl_loss(model, rng.sample(problems, stage.batch), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(step)


def _check_stop(should_stop) -> None:
    if should_stop is not None and should_stop():
        raise DemoError("demo build cancelled")


# --- building ---------------------------------------------------------------------------------

def save_bf16(model, tokenizer, out: Path) -> None:
    """Saves ``model`` in bf16 safetensors with its tokenizer; a full disk is one line."""
    from analysis.io import os_error, write_errors

    try:
        model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    except write_errors() as e:  # a full disk: one line (the temporary directory is removed by the caller)
        raise os_error(out, e) from None


def is_demo_dir(d: Path) -> bool:
    """A demo family directory (its manifest says so): a rebuild may replace it."""
    try:
        return json.loads((Path(d) / "manifest.json").read_text()).get("format") == "subnetscope.demo/1"
    except (OSError, ValueError, AttributeError):
        return False


def _load_fp32(path: Path):
    """fp32 master weights, upcast from a saved bf16 checkpoint."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def build_demo(out_dir: Path | None = None, *, scale: float = 1.0, progress: bool = True,
               should_stop: Callable[[], bool] | None = None) -> Path:
    """Builds the demo family offline and deterministically (bit-identical on one machine).

    The family is written to a temporary sibling directory, ``manifest.json`` last, and renamed
    into place at the end, so a cancelled or failed build leaves nothing half-written.

    Args:
        out_dir (Path, optional): destination. Default: :func:`default_demo_dir`.
        scale (float, optional): multiplies every step count (tests build a tiny family).
            Default: 1.0.
        progress (bool, optional): one tqdm bar per phase on stderr. Default: True.
        should_stop (Callable[[], bool], optional): polled every step; True cancels the build
            with :class:`DemoError`. Default: None.

    Returns:
        Path: ``out_dir``, holding ``base``, ``sft``, ``rl-seed1``, ``rl-seed2`` and
        ``manifest.json`` (recipe version, build seconds, and per model: path, parent, steps,
        lr, seed, and greedy exact-match accuracy on the same held-out problems).
    """
    from analysis.io import check_output_dir

    out_dir = Path(out_dir) if out_dir is not None else default_demo_dir()
    check_output_dir(out_dir, ours=is_demo_dir)  # never replaces a directory of someone else's files
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    from transformers.utils import logging as hf_logging

    threads, hf_bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(1)  # one thread was 10-40x faster than two on a loaded 2-core machine
    hf_logging.disable_progress_bar()  # ours suffice; not one per save and load
    try:
        t0 = time.perf_counter()
        models = _train_family(tmp, scale, progress, should_stop)
        manifest = {"format": "subnetscope.demo/1", "recipe_version": RECIPE_VERSION,
                    "build_seconds": round(time.perf_counter() - t0, 1), "scale": scale,
                    "task": "2-digit addition/subtraction", "held_out_problems": N_HELD_OUT,
                    "models": models}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(tmp, out_dir)
    finally:
        torch.set_num_threads(threads)
        if hf_bars:
            hf_logging.enable_progress_bar()
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _train_family(tmp: Path, scale: float, progress: bool, should_stop) -> dict[str, dict]:
    """Trains and saves every stage of :data:`RECIPE` under ``tmp``; returns the manifest entries."""
    tokenizer = make_tokenizer()
    train, held_out = split_problems()
    formats = {"base": lambda p, a: (f"{p}=", a), "sft": lambda p, a: (qa_prompt(p), a)}
    entries = {}
    for stage in RECIPE:
        stage = replace(stage, steps=max(1, round(stage.steps * scale)))
        if stage.parent is None:
            model = _new_model(stage.seed)
        else:
            model = _load_fp32(tmp / stage.parent)
        if stage.name in formats:
            rng, fmt = random.Random(stage.seed), formats[stage.name]
            batch = lambda fmt=fmt, rng=rng, stage=stage: [  # noqa: E731
                fmt(p, a) for p, a in rng.choices(train, k=stage.batch)]
            train_lm(model, batch, stage, progress=progress, should_stop=should_stop)
        else:
            points = trajectory_steps(stage.steps) if stage.name == TRAJECTORY_OF else []

            def save_point(step, model=model, points=points, name=stage.name):
                if step in points:  # a bf16 copy: the fp32 master weights train on untouched
                    save_bf16(copy.deepcopy(model), tokenizer, tmp / f"{name}-steps" / f"step-{step}")

            train_rl(model, train, stage, progress=progress, should_stop=should_stop, after_step=save_point)
        save_bf16(model, tokenizer, tmp / stage.name)
        accuracy = evaluate(_load_fp32(tmp / stage.name), held_out)  # the saved bf16 weights
        entries[stage.name] = {"path": stage.name, "parent": stage.parent, "steps": stage.steps,
                               "lr": stage.lr, "seed": stage.seed, "accuracy": round(accuracy, 4)}
        if stage.name == TRAJECTORY_OF:
            entries[stage.name]["trajectory"] = {"steps": points,
                                                 "paths": [f"{stage.name}-steps/step-{s}" for s in points]}
    return entries
