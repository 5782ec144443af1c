"""The training tasks of a run: one loss per step, and the task's held-out metric.

- ``demo-sft``: the demo's Q/A arithmetic, loss on the answer and ``<eos>``; metric: exact-match
  greedy accuracy on the 256 held-out problems;
- ``demo-rl``: the demo's policy gradient (:func:`analysis.families.demo_task.rl_loss`, 8 samples a prompt,
  exact-match reward), so a full run reproduces the demo's RL runs; same metric, and at the end
  the sampled reward over ``reward_samples`` completions a problem;
- ``lm``: causal-LM loss on a ``.txt`` / ``.jsonl`` file or dataset (the formats of calibration
  data, :mod:`analysis.importance.calibration`), read in bounded pieces and only as far as the run needs
  (:func:`lm_sequences`); ``eval_samples`` sequences are held out; metric: held-out loss per token
  and its perplexity.

Every process draws the same global batch from the same seeded order and trains on its slice
(``batch[rank::world]``), so N processes see the data one process would.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import torch

from analysis.families import demo_task
from analysis.importance.calibration import tokenize_example
from analysis.finetune.config import FinetuneConfig, FinetuneConfigError
from analysis.finetune.distributed import Distributed
from analysis.training import IGNORE, lm_loss


class Task:
    name = ""
    metric = ""  # the metric that the runs table shows ("accuracy" or "perplexity")

    def __init__(self, config: FinetuneConfig, tokenizer, dist: Distributed, device: torch.device):
        self.config, self.tokenizer, self.dist, self.device = config, tokenizer, dist, device
        if config.batch_size < dist.world:
            raise FinetuneConfigError(f"batch_size {config.batch_size} is smaller than the {dist.world} processes")
        self.rng = random.Random(config.seed)

    def local(self, batch: list) -> list:
        return batch[self.dist.rank::self.dist.world]

    def loss(self, model) -> tuple[torch.Tensor, int, dict]:
        """(loss on this rank's slice, tokens processed, extra metrics) for one step."""
        raise NotImplementedError

    def evaluate(self, model) -> dict:
        raise NotImplementedError

    def final_evaluate(self, model) -> dict:
        return {}

    def calibration(self, samples: int = 32, seq_len: int = 64, batch_size: int = 8) -> list:
        """Calibration batches for a selector mask, from the task's own training data."""
        from analysis.importance.calibration import calibration_batches

        data = self.config.data if self.name == "lm" else "demo"
        return calibration_batches(data, self.tokenizer, samples=samples, seq_len=min(seq_len, self.config.seq_len),
                                   batch_size=batch_size, seed=self.config.seed)

    def state(self) -> dict:
        return {"rng": _jsonable(self.rng.getstate())}

    def load_state(self, state: dict) -> None:
        self.rng.setstate(tupled(state["rng"]))


class DemoSFT(Task):
    name, metric = "demo-sft", "accuracy"

    def __init__(self, *a):
        super().__init__(*a)
        self.examples = demo_task.qa_examples("train")
        self.held_out = demo_task.split_problems()[1]
        if self.config.batch_size > len(self.examples):
            raise FinetuneConfigError(f"batch_size {self.config.batch_size} is more than the demo task's "
                                      f"{len(self.examples)} training examples")

    def loss(self, model):
        ids, labels = demo_task.lm_batch(self.local(self.rng.sample(self.examples, self.config.batch_size)))
        ids, labels = ids.to(self.device), labels.to(self.device)
        loss = lm_loss(model(input_ids=ids, use_cache=False).logits, labels)
        return loss, int((ids != demo_task.PAD).sum()), {}

    def evaluate(self, model):
        return {"accuracy": demo_task.evaluate(model, self.held_out)}

    def final_evaluate(self, model):
        """Greedy correctness per held-out problem and, with ``eval_samples``, the sampled reward per
        problem (the mean of its samples), for confidence intervals across runs."""
        model.eval()
        greedy = demo_task.rewards(demo_task.generate(model, demo_task.qa_prompts(self.held_out)),
                                   [a for _, a in self.held_out])
        out = {"accuracy": greedy.mean().item(), "per_problem_accuracy": greedy.tolist()}
        if self.config.reward_samples:
            r = demo_task.sampled_rewards(model, self.held_out, self.config.reward_samples, seed=self.config.seed)
            out.update(reward_sampled=r.mean().item(), samples_per_problem=self.config.reward_samples,
                       per_problem_reward=r.mean(1).tolist())
        return out


class DemoRL(DemoSFT):
    name = "demo-rl"

    def __init__(self, *a):
        super().__init__(*a)
        self.problems = demo_task.split_problems()[0]
        # rank 0 samples as the demo's own RL runs did (a one-process full run reproduces them)
        self.gen = torch.Generator().manual_seed(self.config.seed + 7919 * self.dist.rank)

    def loss(self, model):
        """The policy-gradient loss; the tokens counted are those trained on, as demo-sft counts
        them: the non-pad ids of the forward run with autograd (the prompts and the sampled
        completions up to their ``<eos>``; the no-grad sampling passes are not counted)."""
        loss, reward, tokens = demo_task.rl_loss(
            model, self.local(self.rng.sample(self.problems, self.config.batch_size)), self.gen)
        return loss, tokens, {"reward": reward.mean().item()}

    def state(self):
        return {**super().state(), "gen": self.gen.get_state()}

    def load_state(self, state):
        super().load_state(state)
        self.gen.set_state(state["gen"])


class LanguageModeling(Task):
    name, metric = "lm", "perplexity"

    def __init__(self, *a):
        super().__init__(*a)
        from analysis.importance.calibration import collate as _collate

        if self.tokenizer is None:
            raise FinetuneConfigError(f"{self.config.checkpoint}: the lm task needs the checkpoint's tokenizer")
        seqs, note = lm_sequences(self.config, self.tokenizer)
        if note and self.dist.main:
            print(f"note: {note}", file=sys.stderr)
        seqs = [s for s in seqs if any(t != -100 for t in s[1][1:])]
        held = min(self.config.eval_samples, len(seqs) // 5) if self.config.eval_samples else 0
        if len(seqs) - held < 1:
            raise FinetuneConfigError(f"{self.config.data}: no training sequences (found {len(seqs)})")
        self.held_out, self.train = seqs[:held], seqs[held:]
        pad = next((t for t in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if t is not None), 0)
        self.collate = lambda s: _collate(s, pad)

    def _batch_loss(self, model, seqs) -> tuple[torch.Tensor, int]:
        """(summed next-token loss, tokens with a label) of some sequences."""
        b = {k: v.to(self.device) for k, v in self.collate(seqs).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        return lm_loss(logits, b["labels"], reduction="sum"), int((b["labels"][:, 1:] != IGNORE).sum())

    def loss(self, model):
        batch = self.local([self.train[self.rng.randrange(len(self.train))] for _ in range(self.config.batch_size)])
        total, n = self._batch_loss(model, batch)
        return total / max(n, 1), n, {}

    @torch.no_grad()
    def evaluate(self, model):
        if not self.held_out:
            return {}
        model.eval()
        total, n = 0.0, 0
        for i in range(0, len(self.held_out), 16):
            loss, count = self._batch_loss(model, self.held_out[i:i + 16])
            total, n = total + float(loss), n + count
        return {"eval_loss": total / n, "perplexity": math.exp(min(total / n, 700))}


# the bounds of the lm task's data reading
PIECE_CHARS = 2**18  # text tokenized at a time (a longer line is cut there)
MIN_TOKENS = 2**18  # a .txt file is read at least this far (every small file whole)
MIN_RECORDS = 10_000  # a .jsonl file: at least this many records
MAX_JSONL_LINE = 16 * 2**20  # bytes of one .jsonl record
CHARS_PER_TOKEN = 64  # a record's text is cut at seq_len × this many characters before tokenizing


def lm_sequences(config: FinetuneConfig, tokenizer) -> tuple[list[tuple[list, list]], str | None]:
    """The lm task's (input ids, labels) sequences of ``config.data``, in a seeded order, and a
    note when a file was not read whole.

    A run draws ``steps × batch_size`` training sequences and holds ``eval_samples`` out (at most
    a fifth), so it reads no further than it needs: ``steps × batch_size + 5 × eval_samples``
    sequences (and at least :data:`MIN_TOKENS` tokens of a ``.txt``, :data:`MIN_RECORDS` records of
    a ``.jsonl``). A ``.txt`` file is tokenized :data:`PIECE_CHARS` characters at a time, cut at a
    line end where there is one (a line longer than that is cut), then into ``seq_len``-token
    chunks, as calibration's chunk mode; a ``.jsonl`` record's text is cut at ``seq_len ×``
    :data:`CHARS_PER_TOKEN` characters (only ``seq_len`` tokens are kept) and a line longer than
    :data:`MAX_JSONL_LINE` bytes is refused. A dataset name is streamed as far as needed.

    Raises:
        FinetuneConfigError: a file that cannot be read, a malformed or oversized record (one line).
    """
    from analysis.importance.calibration import CalibrationError, token_sequences

    c = config
    need = c.steps * c.batch_size + 5 * c.eval_samples
    path = Path(c.data).expanduser()
    try:
        if path.is_file() and path.suffix == ".txt":
            seqs, note = _txt_chunks(path, tokenizer, c.seq_len, max(need * c.seq_len, MIN_TOKENS))
        elif path.is_file() and path.suffix == ".jsonl":
            seqs, note = _jsonl_records(path, tokenizer, c.seq_len, max(need, MIN_RECORDS))
        else:  # a dataset name (or a file calibration refuses, in its words)
            return token_sequences(c.data, tokenizer, need, c.seq_len, 0, c.seed, "auto"), None
    except CalibrationError as e:
        raise FinetuneConfigError(str(e)) from None
    random.Random(c.seed).shuffle(seqs)  # the order calibration's data takes (one seeded shuffle)
    return seqs, note


def _txt_chunks(path: Path, tokenizer, seq_len: int, want: int) -> tuple[list, str | None]:
    ids: list[int] = []
    read, whole = 0, True
    try:
        with open(path, encoding="utf-8") as f:
            for piece in _pieces(f):
                ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
                read += len(piece)
                if len(ids) >= want:
                    whole = not f.read(1)
                    break
    except (OSError, UnicodeDecodeError) as e:
        raise FinetuneConfigError(f"{path}: cannot read as UTF-8 text ({type(e).__name__})") from None
    chunks = [(ids[i:i + seq_len], ids[i:i + seq_len]) for i in range(0, len(ids) - seq_len + 1, seq_len)]
    note = None if whole else (f"{path}: read the first {read:,} characters ({len(ids):,} tokens), as many as "
                               "the run's steps, batch size and held-out sequences use")
    return chunks, note


def _pieces(f):
    """The text of ``f`` in pieces of at most :data:`PIECE_CHARS` characters, each ending at a line
    end where the piece has one (so tokenizing them one by one splits no line that fits)."""
    carry = ""
    while True:
        block = f.read(PIECE_CHARS)
        text = carry + block
        while len(text) >= PIECE_CHARS:
            cut = text.rfind("\n", 0, PIECE_CHARS) + 1 or PIECE_CHARS
            yield text[:cut]
            text = text[cut:]
        if not block:
            if text:
                yield text
            return
        carry = text


def _jsonl_records(path: Path, tokenizer, seq_len: int, want: int) -> tuple[list, str | None]:
    cap = seq_len * CHARS_PER_TOKEN
    out, lineno, whole = [], 0, True
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.readline(MAX_JSONL_LINE + 1)
                if not raw:
                    break
                lineno += 1
                if len(raw) > MAX_JSONL_LINE:
                    raise FinetuneConfigError(f"{path}:{lineno}: a line longer than {MAX_JSONL_LINE // 2**20} MiB; "
                                              "the lm task reads .jsonl records of at most that size")
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise FinetuneConfigError(f"{path}:{lineno}: not UTF-8 text") from None
                except ValueError:
                    raise FinetuneConfigError(f"{path}:{lineno}: not valid JSON") from None
                if isinstance(record, dict) and isinstance(record.get("text"), str):
                    example = (record["text"][:cap], None)
                elif (isinstance(record, dict) and isinstance(record.get("prompt"), str)
                      and isinstance(record.get("completion"), str)):
                    example = (record["prompt"][:cap], record["completion"][:cap])
                else:
                    raise FinetuneConfigError(f"{path}:{lineno}: expected a 'text' field, or 'prompt' and 'completion'")
                out.append(tokenize_example(example, tokenizer, seq_len))
                if len(out) >= want:
                    whole = not f.read(1)
                    break
    except OSError as e:
        raise FinetuneConfigError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    note = None if whole else (f"{path}: read the first {len(out):,} records, as many as the run's steps, batch "
                               "size and held-out sequences use")
    return out, note


TASK_CLASSES = {"demo-sft": DemoSFT, "demo-rl": DemoRL, "lm": LanguageModeling}


def make_task(config: FinetuneConfig, tokenizer, dist: Distributed, device: torch.device) -> Task:
    return TASK_CLASSES[config.task](config, tokenizer, dist, device)


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def tupled(x):
    return tuple(tupled(v) for v in x) if isinstance(x, list) else x
