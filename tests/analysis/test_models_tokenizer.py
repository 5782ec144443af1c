"""load_model's tokenizer: none when the directory has no tokenizer files, and a one-line error
naming the files and the problem when they are there but do not load (it used to read as "no
tokenizer", which then surfaced as a misleading "needs the checkpoint's tokenizer")."""

from __future__ import annotations

import json

import pytest

from analysis.families.demo import make_tokenizer
from analysis.checkpoints.models import ModelLoadError, load_model
from conftest import tiny_llama


@pytest.fixture
def with_tokenizer(llama_dir):
    make_tokenizer().save_pretrained(llama_dir)
    return llama_dir


def test_no_tokenizer_files_is_no_tokenizer(llama_dir):
    _, tok = load_model(llama_dir, device="cpu")
    assert tok is None


def test_a_tokenizer_loads(with_tokenizer):
    _, tok = load_model(with_tokenizer, device="cpu")
    assert tok is not None and tok("1+2")["input_ids"][0] == tok.bos_token_id


def test_a_damaged_tokenizer_is_an_error(with_tokenizer):
    (with_tokenizer / "tokenizer.json").write_text('{"version": "1.0", "model": ')  # cut short
    with pytest.raises(ModelLoadError) as ei:
        load_model(with_tokenizer, device="cpu")
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"{with_tokenizer}: the tokenizer (tokenizer.json, tokenizer_config.json) cannot be loaded: ")


def test_a_tokenizer_config_naming_an_unknown_class_is_an_error(tmp_path):
    d = tmp_path / "llama"
    tiny_llama().save_pretrained(d)
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "NoSuchTokenizerFast"}))
    with pytest.raises(ModelLoadError, match=r"the tokenizer \(tokenizer_config.json\) cannot be loaded: "):
        load_model(d, device="cpu")
