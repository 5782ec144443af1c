"""The prompt an attribution starts from when the user has not written one: one the model can
answer. The demo family's models know only the demo task's characters (a factual English prompt is
all unknown tokens to them), an instruct model answers through its chat template, any other causal
LM completes a factual sentence."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from analysis.jobs.progress import read_json  # the one reader of small JSON files

FACTUAL = ("The capital of France is", " Paris")
CHAT = ("What is the capital of France?", "The capital of France is Paris.")


@dataclass(frozen=True)
class DefaultPrompt:
    prompt: str
    target: str
    why: str  # said under the fields: where the default came from


def is_demo_tokenizer(folder: str | Path) -> bool:
    """True when ``folder``'s ``tokenizer.json`` has exactly the demo task's vocabulary (its four
    special tokens and its characters) — a demo model wherever it was copied."""
    from analysis.families.demo_task import CHARS, SPECIALS

    tok = read_json(Path(folder) / "tokenizer.json")
    vocab = ((tok or {}).get("model") or {}).get("vocab") if isinstance(tok, dict) else None
    return isinstance(vocab, dict) and set(vocab) == set(SPECIALS) | set(CHARS)


def default_prompt(folder: str | Path) -> DefaultPrompt:
    """The default prompt and target for the checkpoint in ``folder`` (see the module's docstring)."""
    from analysis.families.demo_task import qa_examples

    folder = Path(folder)
    folder = folder if folder.is_dir() else folder.parent
    if is_demo_tokenizer(folder):
        prompt, answer = qa_examples("held_out")[0]
        return DefaultPrompt(prompt, answer, "the demo task's first held-out problem (the model's own vocabulary)")
    cfg = read_json(folder / "tokenizer_config.json")
    # transformers keeps the template in tokenizer_config.json, or (newer) in chat_template.jinja / .json
    if (isinstance(cfg, dict) and cfg.get("chat_template")) or any(
            (folder / f).is_file() for f in ("chat_template.jinja", "chat_template.json")):
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(folder)
            text = tok.apply_chat_template([{"role": "user", "content": CHAT[0]}], tokenize=False,
                                           add_generation_prompt=True)
            bos = tok.bos_token
            if bos and text.startswith(bos) and tok("x").input_ids[:1] == [tok.bos_token_id]:
                text = text[len(bos):]  # the tokenizer adds it again when the prompt is encoded
            return DefaultPrompt(text, CHAT[1], "a question through the model's chat template")
        except Exception:  # noqa: BLE001 — a template that does not render: the plain completion below
            pass
    return DefaultPrompt(*FACTUAL, "a factual completion")
