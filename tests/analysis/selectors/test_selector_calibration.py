"""Calibration data (demo task, .txt, .jsonl, dataset names) and loading a checkpoint as a model."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import save_file

from analysis.importance.calibration import CalibrationError, calibration_batches
from analysis.checkpoints import CheckpointError
from analysis.families.demo_task import EOS, lm_batch, make_tokenizer, qa_examples
from analysis.checkpoints.models import ModelLoadError, load_model, resolve_device


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _rows(batches):
    """Each sequence's real token ids, as tuples."""
    return [tuple(b["input_ids"][r][b["attention_mask"][r].bool()].tolist())
            for b in batches for r in range(b["input_ids"].shape[0])]


def test_demo_task_matches_the_demo_training_batches(tok):
    batches = calibration_batches("demo", tok, samples=5, batch_size=5, seq_len=64, seed=7)
    examples = qa_examples("train")
    random.Random(7).shuffle(examples)
    inputs, labels = lm_batch(examples[:5])  # <bos> Q:ab+cd\nA: answer <eos>, loss on answer and <eos>
    assert torch.equal(batches[0]["input_ids"], inputs) and torch.equal(batches[0]["labels"], labels)
    assert torch.equal(batches[0]["attention_mask"].bool(), inputs != 0)


def test_offsets_give_disjoint_sets_and_batch_sizes(tok):
    a = calibration_batches("demo", tok, samples=10, batch_size=4, seq_len=32)
    b = calibration_batches("demo", tok, samples=10, batch_size=4, seq_len=32, offset=10)
    assert [x["input_ids"].shape[0] for x in a] == [4, 4, 2]
    assert not set(_rows(a)) & set(_rows(b))


def test_txt_lines_and_chunks(tmp_path, tok):
    path = tmp_path / "lines.txt"
    path.write_text("12+3=15\n\n4-4=0\n7+7=14\n")
    lines = calibration_batches(path, tok, samples=3, seq_len=6, batch_size=8)
    ids = {tuple(tok(t)["input_ids"][:6]) for t in ("12+3=15", "4-4=0", "7+7=14")}
    assert set(_rows(lines)) == ids  # one example per non-empty line, truncated to seq_len
    b = lines[0]
    assert torch.equal(b["labels"][b["attention_mask"].bool()], b["input_ids"][b["attention_mask"].bool()])
    # fewer lines than samples: the text is cut into seq_len-token chunks (no <bos>)
    chunks = calibration_batches(path, tok, samples=10, seq_len=4, batch_size=8)
    text_ids = tok(path.read_text(), add_special_tokens=False)["input_ids"]
    assert sorted(_rows(chunks)) == sorted(tuple(text_ids[i:i + 4]) for i in range(0, len(text_ids) - 3, 4))


def test_jsonl_prompt_completion_and_text(tmp_path, tok):
    path = tmp_path / "data.jsonl"
    records = [json.dumps({"prompt": "Q:1+1\nA:", "completion": "2"}), "", json.dumps({"text": "3-1=2"})]
    path.write_text("\n".join(records) + "\n")
    b = calibration_batches(path, tok, samples=2, batch_size=2, seq_len=32, seed=1)[0]
    by_len = {int(m.sum()): r for r, m in enumerate(b["attention_mask"])}
    qa = by_len[1 + 8 + 1 + 1]  # <bos> Q:1+1\nA: 2 <eos>
    assert b["labels"][qa][:9].eq(-100).all()
    assert b["labels"][qa][9:11].tolist() == [tok.convert_tokens_to_ids("2"), EOS]
    text = by_len[1 + 5]
    assert b["labels"][text][:6].tolist() == b["input_ids"][text][:6].tolist()


def test_bad_calibration_data_is_a_one_line_error(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "1+1=2"}\n{oops\n')
    with pytest.raises(CalibrationError, match="bad.jsonl:2: not valid JSON"):
        calibration_batches(bad, tok)
    bad.write_text('{"question": "1+1"}\n')
    with pytest.raises(CalibrationError, match="'text' field, or 'prompt' and 'completion'"):
        calibration_batches(bad, tok)
    with pytest.raises(CalibrationError, match="no such calibration file"):
        calibration_batches(tmp_path / "missing.txt", tok)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(CalibrationError, match=".txt or .jsonl"):
        calibration_batches(tmp_path / "data.csv", tok)
    with pytest.raises(CalibrationError, match="datasets"):  # not installed here, or offline
        calibration_batches("wikitext:wikitext-2-raw-v1", tok)
    with pytest.raises(CalibrationError, match="no tokenizer"):
        calibration_batches("demo", None)
    with pytest.raises(CalibrationError, match="samples"):
        calibration_batches("demo", tok, samples=0)
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "1+1=2"}\n')
    with pytest.raises(CalibrationError, match="no calibration examples at offset 5"):
        calibration_batches(one, tok, offset=5)


def test_load_model_and_its_errors(tmp_path, llama_dir):
    make_tokenizer().save_pretrained(llama_dir)
    model, tokenizer = load_model(llama_dir, device="cpu")
    assert not model.training and type(model).__name__ == "LlamaForCausalLM"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ref = tiny_llama()
    assert all(torch.equal(p, ref.state_dict()[n]) for n, p in model.state_dict().items())
    assert tokenizer is not None and tokenizer("1+1")["input_ids"] == make_tokenizer()("1+1")["input_ids"]
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nothing")
    single = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(2)}, single)
    with pytest.raises(ModelLoadError, match="needs a Hugging Face model directory"):
        load_model(single)
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelLoadError, match="unknown device"):
        resolve_device("gpu0")
