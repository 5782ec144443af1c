"""A real model's fine-tune family, built offline: SmolLM2-135M-Instruct, an SFT run and two RL runs.

``python -m analysis demo --real --finetunes`` converts SmolLM2-135M-Instruct (:mod:`analysis.families.smollm2`)
when needed, then trains on the demo's task — 2-digit addition and subtraction, the same problems
and held-out split (:mod:`analysis.families.demo_task`), asked as ``Q:12+07\\nA:`` and answered ``19`` then
the model's end-of-turn token. A 135M instruct model gets a few of these right out of the box, so
SFT has something to teach and RL a reward to climb; the answers are 2-4 tokens, which keeps a
policy-gradient step affordable on two CPU cores.

- ``sft`` from the base: next-token loss on the answer, AdamW, :data:`RECIPE`'s steps and rate;
- ``rl-seed1`` / ``rl-seed2`` from ``sft``: the demo's policy gradient — ``RL_GROUP`` sampled
  answers per prompt (temperature 1), exact-match reward, advantage = reward − the group's mean,
  loss = −mean(advantage · log p(answer)) — two seeds, a small learning rate as RL recipes use.

Every stage trains fp32 master weights loaded from its parent's bf16 files and is saved in bf16,
as real releases are stored (so the RL runs' small steps meet bf16's rounding, the paper's
setting). The manifest holds each model's greedy exact-match accuracy on the 256 held-out
problems with a 95% interval. Logits are computed only at the answer positions (the 49,152-token
head on every prompt position was most of a step).

Resumable: the family is built in ``<out>.partial``; each finished stage leaves ``stage.json``
there, and a rerun after an interruption skips the finished stages (a stage cut short restarts
from its parent). The finished family is renamed into place with its manifest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from collections.abc import Callable

import torch
from tqdm import tqdm

from analysis.families.demo import DemoError, save_bf16
from analysis.families.demo_task import RL_GROUP, qa_prompt, split_problems

FORMAT = "subnetscope.real-family/1"
RECIPE_VERSION = "1"


@dataclass(frozen=True)
class RealStage:
    name: str
    parent: str
    steps: int
    lr: float
    seed: int
    batch: int  # SFT: examples per step; RL: prompts per step (each sampled RL_GROUP times)


RECIPE = (
    RealStage("sft", "base", steps=120, lr=5e-5, seed=0, batch=16),
    RealStage("rl-seed1", "sft", steps=60, lr=2e-6, seed=1, batch=4),
    RealStage("rl-seed2", "sft", steps=60, lr=2e-6, seed=2, batch=4),
)
MODEL_NAMES = ("base", *(s.name for s in RECIPE))
MAX_NEW = 4  # up to 3 answer tokens ("-99", "198") and the end-of-turn token


def real_family_dir() -> Path:
    from analysis.paths import subnetscope_home

    return subnetscope_home() / "smollm2-family"


def is_real_family_dir(d: Path) -> bool:
    try:
        return json.loads((Path(d) / "manifest.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def family_refs(d: Path | None = None) -> dict[str, str]:
    """label -> path of a built family (``smollm2/base`` …), {} when there is none."""
    d = Path(d) if d is not None else real_family_dir()
    if not is_real_family_dir(d):
        return {}
    return {f"smollm2/{n}": str(d / n) for n in MODEL_NAMES if (d / n / "config.json").is_file()}


class _Task:
    """The demo problems through a real tokenizer: prompt ids (all of one length), answer ids + eos."""

    def __init__(self, tokenizer):
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.train, self.held_out = split_problems()
        self.tok = tokenizer
        lengths = {len(self.prompt(p)) for p, _ in self.train[:200] + self.held_out}
        if len(lengths) != 1:
            raise DemoError(f"the tokenizer gives prompts of {sorted(lengths)} tokens; "
                            "the family recipe needs one length")
        self.P = lengths.pop()

    def prompt(self, problem: str) -> list[int]:
        return self.tok(qa_prompt(problem), add_special_tokens=False)["input_ids"]

    def answer(self, a: str) -> list[int]:
        return self.tok(a, add_special_tokens=False)["input_ids"] + [self.eos]

    def prompts(self, problems) -> torch.Tensor:
        return torch.tensor([self.prompt(p) for p, _ in problems])


def _answer_logits(model, seqs: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Logits predicting tokens start … start+n−1 of ``seqs`` (the LM head only there)."""
    hidden = model.model(input_ids=seqs, use_cache=False).last_hidden_state
    return model.lm_head(hidden[:, start - 1:start - 1 + n]).float()


def _sft_loss(model, task: _Task, batch) -> torch.Tensor:
    answers = [task.answer(a) for _, a in batch]
    A = max(map(len, answers))
    seqs = torch.full((len(batch), task.P + A), task.pad)
    labels = torch.full((len(batch), A), -100)
    seqs[:, :task.P] = task.prompts(batch)
    for i, ans in enumerate(answers):
        seqs[i, task.P:task.P + len(ans)] = torch.tensor(ans)
        labels[i, :len(ans)] = torch.tensor(ans)
    logits = _answer_logits(model, seqs, task.P, A)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


@torch.no_grad()
def _generate(model, task: _Task, prompts: torch.Tensor, *, sample: bool) -> torch.Tensor:
    """``# [n, MAX_NEW]`` new tokens (greedy, or temperature-1 sampling from the global generator),
    padded after the first end-of-turn token."""
    model.eval()
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=MAX_NEW,
                         do_sample=sample, temperature=1.0 if sample else None, top_k=0 if sample else None,
                         top_p=1.0 if sample else None, pad_token_id=task.pad, eos_token_id=task.eos)
    new = out[:, prompts.shape[1]:]
    if new.shape[1] < MAX_NEW:
        new = torch.cat([new, torch.full((new.shape[0], MAX_NEW - new.shape[1]), task.pad)], 1)
    eos = (new == task.eos).int()
    return new.masked_fill(eos.cumsum(1) - eos > 0, task.pad)


def _rewards(task: _Task, completions: torch.Tensor, answers: list[str]) -> torch.Tensor:
    return torch.tensor([float(c[:len(t)].tolist() == t) for c, t in
                         zip(completions, (task.answer(a) for a in answers))])


def evaluate(model, task: _Task, problems, *, chunk: int = 64) -> list[float]:
    """Per-problem greedy exact match (1.0 / 0.0) on ``problems``."""
    out: list[float] = []
    for i in range(0, len(problems), chunk):
        part = problems[i:i + chunk]
        out += _rewards(task, _generate(model, task, task.prompts(part), sample=False), [a for _, a in part]).tolist()
    return out


def _rl_loss(model, task: _Task, batch) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = task.prompts(batch).repeat_interleave(RL_GROUP, dim=0)
    completions = _generate(model, task, prompts, sample=True)
    reward = _rewards(task, completions, [a for _, a in batch for _ in range(RL_GROUP)]).view(-1, RL_GROUP)
    advantage = (reward - reward.mean(1, keepdim=True)).flatten()
    model.train()
    logits = _answer_logits(model, torch.cat([prompts, completions], 1), task.P, MAX_NEW)
    logp = logits.log_softmax(-1).gather(-1, completions[..., None]).squeeze(-1)
    eos = (completions == task.eos).int()
    logp = logp.masked_fill(eos.cumsum(1) - eos > 0, 0.0).sum(1)  # up to and with the first end-of-turn
    return -(advantage * logp).mean(), reward


def _train(model, task: _Task, stage: RealStage, progress: bool, should_stop) -> list[float]:
    """Trains in place; returns the per-step loss (SFT) or mean reward (RL)."""
    rng = random.Random(stage.seed)
    torch.manual_seed(stage.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=stage.lr, betas=(0.9, 0.98), weight_decay=0.0)
    rl = stage.parent != "base"
    curve = []
    bar = tqdm(range(stage.steps), desc=f"smollm2 {stage.name}", disable=not progress, file=sys.stderr)
    for _ in bar:
        if should_stop is not None and should_stop():
            raise DemoError("real family build cancelled")
        if rl:
            loss, reward = _rl_loss(model, task, rng.sample(task.train, stage.batch))
            curve.append(reward.mean().item())
        else:
            model.train()
            loss = _sft_loss(model, task, rng.choices(task.train, k=stage.batch))
            curve.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix({"reward" if rl else "loss": f"{curve[-1]:.3f}"})
    return curve


def _interval(scores: list[float]) -> dict:
    from analysis.finetune.compare import mean_ci

    m = mean_ci(scores)
    return {"accuracy": round(m["mean"], 4), "ci95": [round(m["ci"][0], 4), round(m["ci"][1], 4)], "n": m["n"]}


def _link_tree(src: Path, dst: Path) -> None:
    """A copy of a model directory by hard links where the filesystem allows (the base is 270 MB)."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, dst, copy_function=link)


def build_real_family(out_dir: Path | None = None, *, source: Path | None = None, scale: float = 1.0,
                      eval_problems: int | None = None, progress: bool = True,
                      should_stop: Callable[[], bool] | None = None) -> Path:
    """Builds (or finishes) the SmolLM2 family: base, sft, rl-seed1, rl-seed2 and ``manifest.json``.

    Args:
        out_dir (Path, optional): destination. Default: ``$SUBNETSCOPE_HOME/smollm2-family``.
        source (Path, optional): the converted SmolLM2 directory. Default: ``smollm2_dir()``,
            converted first when missing.
        scale (float): multiplies every stage's steps (tests build with a few). Default: 1.0.
        eval_problems (int, optional): evaluate on the first N held-out problems. Default: all 256.
        progress (bool): tqdm bars on stderr. Default: True.
        should_stop (callable, optional): polled every step; True cancels (finished stages are kept
            in ``<out>.partial`` for the next run).
    Returns:
        Path: ``out_dir``.
    Raises:
        DemoError: SmolLM2 unavailable, cancelled, or an output that is not ours.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from analysis.io import replace_dir
    from analysis.io import check_output_dir
    from analysis.paths import smollm2_dir
    from analysis.families.smollm2 import build_real, is_converted_dir

    out_dir = Path(out_dir) if out_dir is not None else real_family_dir()
    check_output_dir(out_dir, ours=is_real_family_dir)
    src = Path(source) if source is not None else smollm2_dir()
    if source is None and not is_converted_dir(src):
        build_real(src)
    work = out_dir.parent / f"{out_dir.name}.partial"
    if work.is_dir() and any(work.iterdir()) and not (work / "recipe.json").is_file():
        raise DemoError(f"{work}: exists and is not a partial family build; move it away")
    recipe = {"recipe_version": RECIPE_VERSION, "scale": scale, "eval_problems": eval_problems,
              "stages": [asdict(s) for s in RECIPE]}
    if work.exists() and json.loads((work / "recipe.json").read_text() if (work / "recipe.json").is_file()
                                    else "{}") != recipe:
        shutil.rmtree(work)  # another recipe's partial build: start over
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.json").write_text(json.dumps(recipe, indent=2))
    t0 = time.perf_counter()
    hf_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
        task = _Task(tokenizer)
        held_out = task.held_out[:eval_problems] if eval_problems else task.held_out
        if not (work / "base" / "stage.json").is_file():
            shutil.rmtree(work / "base", ignore_errors=True)
            _link_tree(src, work / "base")
            model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.float32)
            (work / "base" / "stage.json").write_text(json.dumps(
                {"path": "base", "parent": None, "source": str(src), **_interval(evaluate(model, task, held_out))}))
        for stage in RECIPE:
            stage = replace(stage, steps=max(1, round(stage.steps * scale)))
            done = work / stage.name / "stage.json"
            if done.is_file():
                continue
            shutil.rmtree(work / stage.name, ignore_errors=True)
            model = AutoModelForCausalLM.from_pretrained(work / stage.parent, dtype=torch.float32)
            s0 = time.perf_counter()
            curve = _train(model, task, stage, progress, should_stop)
            save_bf16(model, tokenizer, work / stage.name)
            saved = AutoModelForCausalLM.from_pretrained(work / stage.name, dtype=torch.float32)  # the bf16 weights
            entry = {"path": stage.name, **asdict(stage), "seconds": round(time.perf_counter() - s0, 1),
                     "curve": [round(c, 4) for c in curve], **_interval(evaluate(saved, task, held_out))}
            done.write_text(json.dumps(entry))
        models = {n: json.loads((work / n / "stage.json").read_text()) for n in MODEL_NAMES}
        manifest = {"format": FORMAT, "recipe_version": RECIPE_VERSION, "scale": scale,
                    "build_seconds_last_run": round(time.perf_counter() - t0, 1),
                    "task": "2-digit addition/subtraction, asked as 'Q:12+07\\nA:'",
                    "held_out_problems": len(held_out), "models": models}
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (work / "recipe.json").unlink()
        replace_dir(work, out_dir)
    finally:
        if hf_bars:
            hf_logging.enable_progress_bar()
    return out_dir
