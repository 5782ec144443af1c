"""The prompts a behaviour comparison runs on: given as text, read from a file, or the demo task's
held-out problems.

A prompts file is UTF-8 ``.txt`` (one prompt per line; blank lines skipped; ``\\n`` inside a prompt
written as the two characters ``\\n``) or ``.jsonl`` (one JSON object per line with a string field
``prompt`` or ``text``; blank lines skipped). ``demo`` is the demo task's 256 held-out problems in
its Q/A format (:func:`analysis.families.demo_task.qa_examples`). Anything else is one line naming
the file, the line and the problem.
"""

from __future__ import annotations

import json
from pathlib import Path

from analysis.errors import SubnetscopeError, one_line, quoted

MAX_PROMPTS = 100_000
DEMO = "demo"


class PromptsError(SubnetscopeError):
    """Prompts that cannot be used, in one line."""


def parse_prompts(text: str, *, jsonl: bool, where: str) -> list[str]:
    """The prompts of a file's text.

    Raises:
        PromptsError: a line that is not a JSON object with a string ``prompt`` / ``text`` (``.jsonl``),
            no prompt at all, or more than :data:`MAX_PROMPTS`.
    """
    out: list[str] = []
    for n, line in enumerate(text.split("\n"), 1):  # only \n ends a line (a JSON string may hold U+2028)
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        if jsonl:
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise PromptsError(f"{where}: line {n} is not JSON: {one_line(e)}") from None
            if not isinstance(obj, dict):
                raise PromptsError(f"{where}: line {n} is not a JSON object")
            value = obj.get("prompt", obj.get("text"))
            if not isinstance(value, str):
                raise PromptsError(f"{where}: line {n} has no string field 'prompt' or 'text'")
            out.append(value)
        else:
            out.append(line.replace("\\n", "\n"))
        if len(out) > MAX_PROMPTS:
            raise PromptsError(f"{where}: more than {MAX_PROMPTS:,} prompts")
    if not out:
        raise PromptsError(f"{where}: no prompts in the file")
    return out


def read_prompts(path: str) -> list[str]:
    """The prompts of a ``.txt`` or ``.jsonl`` file, or the demo's held-out problems for ``demo``.

    Raises:
        PromptsError: a file that is missing, unreadable, not UTF-8, of another kind, or malformed.
    """
    if path == DEMO:
        return demo_prompts()
    p = Path(path).expanduser()
    if p.suffix.lower() not in (".txt", ".jsonl"):
        raise PromptsError(f"{path}: a prompts file is .txt (one per line) or .jsonl (a 'prompt' field per line)")
    try:
        text = p.read_bytes().decode("utf-8-sig")  # a byte-order mark is not part of line 1
    except FileNotFoundError:
        raise PromptsError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PromptsError(f"{path}: a directory, not a prompts file") from None
    except UnicodeDecodeError as e:
        raise PromptsError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise PromptsError(f"{path}: cannot read: {e.strerror or one_line(e)}") from None
    return parse_prompts(text, jsonl=p.suffix.lower() == ".jsonl", where=path)


def demo_prompts() -> list[str]:
    """The demo task's held-out problems as prompts (``Q:12+07\\nA:``): the ones its manifest's
    accuracies are measured on."""
    from analysis.families.demo_task import qa_examples

    return [p for p, _ in qa_examples("held_out")]


def gather(prompt: list[str] | tuple[str, ...] | None, prompts: str | None) -> list[str]:
    """``--prompt TEXT ...`` and ``--prompts FILE`` together, in that order.

    Raises:
        PromptsError: neither given, or an empty ``--prompt``.
    """
    out = list(prompt or ())
    for i, p in enumerate(out):
        if not p.strip():
            raise PromptsError(f"--prompt {quoted(p)} (number {i + 1}): an empty prompt")
    if prompts:
        out += read_prompts(prompts)
    if not out:
        raise PromptsError("give --prompt TEXT (one or more) or --prompts FILE (or --prompts demo)")
    return out
