"""The attribution's default prompt fits the model: the demo task for a demo model wherever it lies,
the chat template for an instruct model, a factual completion otherwise."""

import shutil

from analysis.attribution.prompts import CHAT, FACTUAL, default_prompt, is_demo_tokenizer
from analysis.families.demo_task import qa_examples


def _word_tokenizer(d, chat: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "<unk>", "user", "assistant", "What", "is", "the", "capital", "of", "France?"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>")
    if chat:
        tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                             "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    tok.save_pretrained(d)


def test_a_copied_demo_model_gets_the_demo_task(demo, tmp_path):
    copy = tmp_path / "anywhere" / "my-tune"
    shutil.copytree(demo / "rl-seed2", copy)
    assert is_demo_tokenizer(copy)
    p = default_prompt(copy)
    assert (p.prompt, p.target) == qa_examples("held_out")[0] and "demo task" in p.why


def test_an_instruct_model_gets_its_chat_template(tmp_path):
    _word_tokenizer(tmp_path / "chat", chat=True)
    p = default_prompt(tmp_path / "chat")
    assert p.prompt == f"<|user|> {CHAT[0]} <|assistant|> " and p.target == CHAT[1] and "chat template" in p.why
    _word_tokenizer(tmp_path / "plain", chat=False)
    assert (default_prompt(tmp_path / "plain").prompt, default_prompt(tmp_path / "plain").target) == FACTUAL
    assert not is_demo_tokenizer(tmp_path / "plain") and default_prompt(tmp_path / "nothing-here").target == FACTUAL[1]
