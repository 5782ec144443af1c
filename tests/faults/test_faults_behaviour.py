"""Behaviour and patch: pairs that cannot be patched (another architecture, a tensor only the tune has,
a resized vocabulary), masks, prompt files and evaluation files that cannot be read, outputs that
would replace what is not ours, and a tokenizer-less checkpoint asked for KL — each one line, exit 2,
nothing written.

Checkpoints: ``tiny_llama()`` (no tokenizer) and ``demo_like()`` with the demo tokenizer, saved by
save_pretrained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import demo_like, tiny_gpt2, tiny_llama
from fault_corpus import Case, params, run_case


def _save(tmp: Path, name: str, model) -> Path:
    model.save_pretrained(tmp / name)
    return tmp / name


def _demo(tmp: Path, name: str, seed: int = 0) -> Path:
    from analysis.families.demo_task import make_tokenizer

    d = _save(tmp, name, demo_like(seed=seed))
    make_tokenizer().save_pretrained(d)
    return d


def _moved(model):
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.view(-1)[:100] += 1e-2
    return model


def _patch(tuned=None, *extra, base=None):
    def setup(tmp):
        b = (base or (lambda t: _save(t, "base", tiny_llama())))(tmp)
        t = (tuned or (lambda t: _save(t, "tuned", _moved(tiny_llama()))))(tmp)
        return ["patch", b, t, *(e(tmp) if callable(e) else e for e in extra), "--quiet", "--json", tmp / "o.json"]
    return setup


def _kl(*extra, base=None, tuned=None):
    def setup(tmp):
        b = (base or (lambda t: _demo(t, "base")))(tmp)
        t = (tuned or (lambda t: _demo(t, "tuned", seed=1)))(tmp)
        return ["behaviour", b, t, *(e(tmp) if callable(e) else e for e in extra), "--quiet", "--json", tmp / "o.json"]
    return setup


def _no_json(tmp, out, err):
    assert not (tmp / "o.json").exists()


def _file(name: str, data: bytes | str):
    def make(tmp):
        p = tmp / name
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return p
    return make


def _extra_tensor(tmp):
    m = _moved(tiny_llama())
    m.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    return _save(tmp, "tuned", m)


def _not_ours(tmp):
    d = tmp / "notes"
    d.mkdir()
    (d / "paper.md").write_text("mine")
    return d


def _notes_intact(tmp, out, err):
    assert (tmp / "notes" / "paper.md").read_text() == "mine"
    _no_json(tmp, out, err)


def _wrong_mask(tmp):
    from analysis.sparsity.masks import save_mask

    p = tmp / "m.safetensors"
    save_mask(p, {"model.layers.0.mlp.up_proj.weight": torch.ones(3, 3, dtype=torch.bool)})
    return f"mask:{p}"


CASES = [
    Case("patch-other-architecture", _patch(lambda t: _save(t, "tuned", tiny_gpt2())),
         says=("different architecture",), check=_no_json),
    Case("patch-tensor-only-in-base", _patch(lambda t: _save(t, "tuned", tiny_llama(tie=True))),
         says=("the tune", "lacks"), check=_no_json),
    Case("patch-tensor-only-in-tune", _patch(_extra_tensor), says=("the base", "lacks"), check=_no_json),
    Case("patch-resized-vocabulary", _patch(lambda t: _save(t, "tuned", tiny_llama(vocab=60))),
         says=("another shape", "equal shapes"), check=_no_json),
    Case("patch-mask-of-other-shapes", _patch(None, "--subset", _wrong_mask),
         says=("in the mask and",), check=_no_json),
    Case("patch-mask-missing", _patch(None, "--subset", lambda t: f"mask:{t / 'none.safetensors'}"),
         says=("none.safetensors",), check=_no_json),
    Case("patch-mask-not-a-mask", _patch(None, "--subset", lambda t: f"mask:{_file('m.safetensors', b'junk')(t)}"),
         says=("m.safetensors",), check=_no_json),
    Case("patch-out-not-ours", _patch(None, "--out", _not_ours), says=("did not write",), check=_notes_intact),
    Case("patch-out-is-a-file", _patch(None, "--out", _file("f.txt", "x")), says=("not a directory",),
         check=_no_json),
    Case("patch-eval-prompts-missing", _patch(None, "--eval", lambda t: f"kl:{t / 'p.txt'}"),
         says=("p.txt: no such file",), check=_no_json),
    Case("patch-eval-demo-on-another-model", _patch(None, "--eval", "demo"),
         says=("demo task's evaluation needs a checkpoint of the demo family",), check=_no_json),
    Case("patch-eval-lm-csv", _patch(None, "--eval", lambda t: f"lm:{_file('d.csv', 'a,b')(t)}"),
         says=("d.csv",), check=_no_json),
    Case("patch-kl-without-tokenizer", _patch(None, "--eval", lambda t: f"kl:{_file('p.txt', 'hi')(t)}"),
         says=("no tokenizer",), check=_no_json),
    Case("patch-sweep-with-out", _patch(None, "--eval", "demo", "--sweep", "alpha", "--out", lambda t: t / "h"),
         says=("a --sweep writes none",), check=_no_json),
    Case("behaviour-jsonl-bad-line", _kl("--prompts", _file("p.jsonl", '{"prompt": "Q:1"}\n[1, 2]\n')),
         says=("p.jsonl: line 2 is not a JSON object",), check=_no_json),
    Case("behaviour-jsonl-no-field", _kl("--prompts", _file("p.jsonl", '{"question": "Q:1"}\n')),
         says=("line 1 has no string field",), check=_no_json),
    Case("behaviour-prompts-not-utf8", _kl("--prompts", _file("p.txt", b"Q:\xff\xfe\n")),
         says=("not utf-8",), check=_no_json),
    Case("behaviour-prompts-a-directory", _kl("--prompts", lambda t: (t / "d.txt").mkdir() or t / "d.txt"),
         says=("a directory",), check=_no_json),
    Case("behaviour-without-tokenizer", _kl("--prompt", "hi", base=lambda t: _save(t, "base", demo_like()),
                                            tuned=lambda t: _save(t, "tuned", demo_like(seed=1))),
         says=("no tokenizer",), check=_no_json),
    Case("behaviour-json-onto-input", lambda t: [*_kl("--prompt", "Q:1")(t)[:-1], t / "tuned" / "config.json"],
         says=("input",)),
]


@pytest.mark.parametrize("case", params(CASES))
def test_fault(case, tmp_path, capsys):
    run_case(case, tmp_path, capsys)
