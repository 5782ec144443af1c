"""The demo task, public: 2-digit addition and subtraction as a character-level language task.

The tokenizer, the problems and their fixed train / held-out split, the Q/A prompt format, the
batches, greedy and sampled generation, the exact-match reward and the policy-gradient loss. The
demo build (:mod:`analysis.families.demo`) trains the family on it; the fine-tuning lab's ``demo-sft`` and
``demo-rl`` tasks (:mod:`analysis.finetune.tasks`) and the calibration data use the same
definitions, so every number they report is on the same problems.
"""

from __future__ import annotations

import random

import torch

CHARS = "0123456789+-=QA:\n"
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3, then CHARS: 21 symbols in all
PAD, BOS, EOS = 0, 1, 2
DATA_SEED = 1234
N_HELD_OUT = 256  # problems never trained on; every model is evaluated on the same ones
MAX_ANSWER = 5  # generated tokens: room for "-99" or "198" and <eos>
RL_GROUP = 8  # samples per prompt; the advantage baseline is the group's mean reward


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


IDS = {c: len(SPECIALS) + i for i, c in enumerate(CHARS)}


def encode(text: str) -> list[int]:
    return [IDS[c] for c in text]


def split_problems() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """All 20,000 problems such as ``("12+07", "19")``, split once into (train, held_out)."""
    probs = [(f"{a:02d}{op}{b:02d}", str(a + b if op == "+" else a - b))
             for a in range(100) for op in "+-" for b in range(100)]
    random.Random(DATA_SEED).shuffle(probs)
    return probs[N_HELD_OUT:], probs[:N_HELD_OUT]


def qa_prompt(problem: str) -> str:
    return f"Q:{problem}\nA:"


def qa_examples(split: str = "train") -> list[tuple[str, str]]:
    """The demo task as ``(prompt, answer)`` texts in the Q/A format the SFT and RL models learn.

    Args:
        split (str): ``train`` (19,744 problems) or ``held_out`` (the 256 every model is evaluated
            on). Default: ``train``.

    Returns:
        list[tuple[str, str]]: e.g. ``("Q:12+07\\nA:", "19")``, in the fixed shuffled order.
    """
    train, held_out = split_problems()
    return [(qa_prompt(p), a) for p, a in (train if split == "train" else held_out)]


def lm_batch(examples: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, target) texts -> ``<bos> prompt target <eos>`` ids and labels, right-padded.

    Returns:
        tuple[Tensor, Tensor]: input ids and labels, ``# [batch, pos]``; the labels are -100
        except on the target and ``<eos>``.
    """
    length = max(len(p) + len(t) for p, t in examples) + 2
    inputs = torch.full((len(examples), length), PAD)
    labels = torch.full((len(examples), length), -100)
    for row, (prompt, target) in enumerate(examples):
        seq = [BOS] + encode(prompt + target) + [EOS]
        inputs[row, :len(seq)] = torch.tensor(seq)
        labels[row, 1 + len(prompt):len(seq)] = inputs[row, 1 + len(prompt):len(seq)]
    return inputs, labels



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
    return new.masked_fill(after_eos(new), PAD)


def after_eos(tokens: torch.Tensor) -> torch.Tensor:
    """``# [batch, len]`` True strictly after each row's first ``<eos>``."""
    eos = (tokens == EOS).int()
    return eos.cumsum(1) - eos > 0


def qa_prompts(problems: list[tuple[str, str]]) -> torch.Tensor:
    return torch.tensor([[BOS] + encode(qa_prompt(p)) for p, _ in problems])


def rewards(completions: torch.Tensor, answers: list[str]) -> torch.Tensor:
    """1.0 where a completion is exactly its answer followed by ``<eos>``, else 0.0."""
    targets = [encode(a) + [EOS] for a in answers]
    return torch.tensor([float(c[:len(t)].tolist() == t) for c, t in zip(completions, targets)])


def evaluate(model, problems: list[tuple[str, str]]) -> float:
    """Exact-match greedy accuracy on the Q/A format.

    Args:
        problems (list[tuple[str, str]]): ``(problem, answer)`` pairs such as ``("12+07", "19")``.

    Returns:
        float: the fraction of problems whose greedy answer is exactly right.
    """
    model.eval()
    return rewards(generate(model, qa_prompts(problems)), [a for _, a in problems]).mean().item()


def rl_loss(model, batch: list[tuple[str, str]], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One policy-gradient loss: ``RL_GROUP`` sampled completions per prompt, exact-match reward,
    advantage = reward − the group's mean, loss = −mean(advantage · log p(completion)).

    Args:
        model (LlamaForCausalLM): the policy (left in train mode).
        batch (list[tuple[str, str]]): ``(problem, answer)`` pairs.
        gen (torch.Generator): the sampling generator.
    Returns:
        tuple[Tensor, Tensor, int]: the loss (scalar, with grad), the rewards ``# [prompts, RL_GROUP]``
        and the tokens of the forward trained on (non-pad ids of prompts and completions).
    """
    prompts = qa_prompts(batch).repeat_interleave(RL_GROUP, dim=0).to(next(model.parameters()).device)
    model.eval()
    completions = generate(model, prompts, generator=gen)  # [n, MAX_ANSWER]
    reward = rewards(completions, [a for _, a in batch for _ in range(RL_GROUP)]).view(-1, RL_GROUP)
    advantage = (reward - reward.mean(1, keepdim=True)).flatten().to(prompts.device)  # [n]
    model.train()
    seqs = torch.cat([prompts, completions], 1)  # completions are padded after their <eos>
    logits = model(input_ids=seqs, use_cache=False).logits
    logp = logits[:, prompts.shape[1] - 1:-1].log_softmax(-1)  # [n, MAX_ANSWER, vocab]
    logp = logp.gather(-1, completions[..., None]).squeeze(-1)
    logp = logp.masked_fill(after_eos(completions), 0.0).sum(1)  # up to the first <eos>
    return -(advantage * logp).mean(), reward, int((seqs != PAD).sum())


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
    prompts = qa_prompts(problems).repeat_interleave(samples, dim=0)  # [problems · samples, prompt_len]
    answers = [a for _, a in problems for _ in range(samples)]
    out = [rewards(generate(model, prompts[i:i + chunk], generator=gen), answers[i:i + chunk])
           for i in range(0, prompts.shape[0], chunk)]
    return torch.cat(out).view(len(problems), samples)
