"""Calibration data for the data-driven selectors, tokenized with the checkpoint's tokenizer.

Sources (``data``):

- ``"demo"``: the demo task (2-digit arithmetic, ``Q:12+07\\nA:`` → ``19``), loss on the answer
  and ``<eos>`` — what the SFT and RL models of the demo family are trained on;
- a local ``.txt`` file: one example per non-empty line (loss on every token), or, when the file
  has fewer lines than needed (``text_mode="auto"``) or ``text_mode="chunks"``, the whole text
  tokenized and cut into ``seq_len``-token chunks (as Wanda / SparseGPT calibrate);
- a local ``.jsonl`` file: one JSON object per line, with ``"text"`` (loss on every token) or
  ``"prompt"`` and ``"completion"`` (loss on the completion and ``<eos>`` only);
- any other string: a Hugging Face dataset name (``name`` or ``name:config``, split ``train``,
  the same fields), which needs the ``datasets`` package and a network or a local cache.

Examples are shuffled with ``seed`` and ``samples`` of them taken from position ``offset``, so two
calls with ``offset=0`` and ``offset=samples`` give disjoint calibration sets (selector stability).
Batches are right-padded ``{"input_ids", "attention_mask", "labels"}`` ``# [batch, pos]`` with
labels −100 where no loss is taken.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from analysis.errors import SubnetscopeError
from analysis.importance.selectors.base import Batch

DEMO = "demo"
TEXT_MODES = ("auto", "lines", "chunks")
Example = tuple[str, str | None]  # (prompt, completion); completion None: plain text, loss everywhere


class CalibrationError(SubnetscopeError):
    """Calibration data that cannot be read or used, in one line."""


def calibration_batches(data: str | os.PathLike, tokenizer, *, samples: int = 32, seq_len: int = 128,
                        batch_size: int = 8, offset: int = 0, seed: int = 0,
                        text_mode: str = "auto") -> list[Batch]:
    """Calibration batches from the demo task, a local file or a dataset name.

    Args:
        data (str or PathLike): ``"demo"``, a ``.txt`` / ``.jsonl`` path, or a dataset name.
        tokenizer: the checkpoint's tokenizer (``PreTrainedTokenizerBase``).
        samples (int): sequences wanted; fewer when the source has fewer. Default: 32.
        seq_len (int): tokens per sequence at most (the chunk length in chunk mode). Default: 128.
        batch_size (int): sequences per batch. Default: 8.
        offset (int): skip this many shuffled examples (disjoint sets). Default: 0.
        seed (int): shuffle seed. Default: 0.
        text_mode (str): ``auto``, ``lines`` or ``chunks``, for ``.txt`` files. Default: ``auto``.
    Returns:
        list[Batch]: ``ceil(samples / batch_size)`` batches.
    Raises:
        CalibrationError: no tokenizer, a missing or malformed file, no examples, bad numbers.
    """
    for name, value, low in (("samples", samples, 1), ("seq_len", seq_len, 2), ("batch_size", batch_size, 1),
                             ("offset", offset, 0)):
        if not (isinstance(value, int) and value >= low):
            raise CalibrationError(f"calibration {name} must be an integer ≥ {low}, got {value!r}")
    if text_mode not in TEXT_MODES:
        raise CalibrationError(f"text_mode must be one of {', '.join(TEXT_MODES)}, got {text_mode!r}")
    if tokenizer is None:
        raise CalibrationError("the checkpoint has no tokenizer; calibration data needs one")
    sequences = token_sequences(str(data), tokenizer, samples, seq_len, offset, seed, text_mode)
    if not sequences:
        raise CalibrationError(f"{data}: no calibration examples at offset {offset}")
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    return [collate(sequences[i:i + batch_size], pad) for i in range(0, len(sequences), batch_size)]


def token_sequences(data, tokenizer, samples, seq_len, offset, seed, text_mode) -> list[tuple[list, list]]:
    """The tokenized examples of :func:`calibration_batches`, before batching (the fine-tuning ``lm``
    task draws its own batches from them).

    Args:
        data (str): ``"demo"``, a ``.txt`` / ``.jsonl`` path, or a dataset name.
        tokenizer: the checkpoint's tokenizer.
        samples, seq_len, offset, seed, text_mode: as in :func:`calibration_batches` (not checked here).
    Returns:
        list[tuple[list, list]]: (input ids, labels) per sequence, labels −100 where no loss is taken.
    Raises:
        CalibrationError: a missing or malformed file.
    """
    if data == DEMO:
        from analysis.families.demo_task import qa_examples

        return [tokenize_example(e, tokenizer, seq_len) for e in _take(qa_examples("train"), samples, offset, seed)]
    path = Path(data).expanduser()
    if path.is_file():
        if path.suffix == ".jsonl":
            examples = _read_jsonl(path)
        elif path.suffix == ".txt":
            lines = [line for line in _read_text(path).splitlines() if line.strip()]
            if text_mode == "lines" or (text_mode == "auto" and len(lines) >= offset + samples):
                examples = [(line, None) for line in lines]
            else:
                return _take(_chunks(_read_text(path), tokenizer, seq_len), samples, offset, seed)
        else:
            raise CalibrationError(f"{path}: calibration files must be .txt or .jsonl")
        return [tokenize_example(e, tokenizer, seq_len) for e in _take(examples, samples, offset, seed)]
    if path.exists():
        raise CalibrationError(f"{path}: not a file (calibration data is a .txt or .jsonl file)")
    if path.suffix in (".txt", ".jsonl", ".json") or os.sep in data:
        raise CalibrationError(f"{path}: no such calibration file")
    return [tokenize_example(e, tokenizer, seq_len) for e in _dataset_examples(data, samples + offset)[offset:]]


def _take(items: list, samples: int, offset: int, seed: int) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items[offset:offset + samples]


def tokenize_example(example: Example, tokenizer, seq_len: int) -> tuple[list, list]:
    """(input ids, labels) of one record, at most ``seq_len`` tokens: the loss on every token of a
    text, on the completion and ``<eos>`` of a prompt and completion (labels -100 elsewhere)."""
    prompt, completion = example
    ids = tokenizer(prompt)["input_ids"]
    if completion is None:
        ids = ids[:seq_len]
        return ids, list(ids)
    head = len(ids)
    ids = ids + tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    ids = ids[:seq_len]
    return ids, [-100] * min(head, len(ids)) + ids[head:]


def _chunks(text: str, tokenizer, seq_len: int) -> list[tuple[list, list]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [(ids[i:i + seq_len], ids[i:i + seq_len]) for i in range(0, len(ids) - seq_len + 1, seq_len)]


def collate(sequences: list[tuple[list, list]], pad: int) -> Batch:
    """Right-pads (input ids, labels) sequences into one batch.

    Args:
        sequences (list[tuple[list, list]]): from :func:`token_sequences`.
        pad (int): the id put after each sequence's end.
    Returns:
        Batch: ``input_ids`` (``pad`` after the end), ``attention_mask`` (1 on real tokens) and
        ``labels`` (−100 after the end), each ``# [batch, longest sequence]``.
    """
    length = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    labels = torch.full((len(sequences), length), -100, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, (ids, lab) in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, :len(lab)] = torch.tensor(lab, dtype=torch.long)
        mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"{path}: cannot read as UTF-8 text ({type(e).__name__})") from None


def _read_jsonl(path: Path) -> list[Example]:
    out = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise CalibrationError(f"{path}:{lineno}: not valid JSON") from None
        out.append(_record(record, f"{path}:{lineno}"))
    return out


def _record(record, where: str) -> Example:
    if isinstance(record, dict):
        if isinstance(record.get("text"), str):
            return record["text"], None
        if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
            return record["prompt"], record["completion"]
    raise CalibrationError(f"{where}: expected a 'text' field, or 'prompt' and 'completion'")


def _dataset_examples(name: str, count: int) -> list[Example]:
    """The first ``count`` usable records of a Hugging Face dataset (``name`` or ``name:config``)."""
    try:
        import datasets
    except ImportError:
        raise CalibrationError(f"{name}: not a calibration file, and loading a dataset by name needs the "
                               f"'datasets' package (pip install datasets)") from None
    repo, _, config = name.partition(":")
    try:
        stream = datasets.load_dataset(repo, config or None, split="train", streaming=True)
        out = []
        for record in stream:
            try:
                out.append(_record(record, name))
            except CalibrationError:
                continue
            if len(out) >= count:
                break
    except Exception as e:  # offline, unknown name, gated ... : one line for the user
        from analysis.errors import one_line

        raise CalibrationError(f"{name}: cannot load the dataset: {one_line(e)}") from None
    return out
