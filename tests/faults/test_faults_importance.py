"""Fault cases of ``importance`` and ``evaluate-selectors``: odd ``--option`` pairs, ``--selectors``
lists, densities, calibration sizes and data. Each is one line on stderr, exit code 2, and no
output written; the checkpoints are the tiny Llama of ``tests/conftest.py`` (``llama_dir``), with
the demo task's character tokenizer where calibration data is read."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_llama
from fault_corpus import Case, params, run_case


def _llama(tmp: Path, tokenizer: bool = False, positions: int | None = None) -> Path:
    """The ``llama_dir`` checkpoint (no tokenizer), or with the demo tokenizer (ids < its vocabulary
    of 50); ``positions``: its ``max_position_embeddings`` (2048)."""
    d = tmp / ("llama-tok" if tokenizer else "llama")
    model = tiny_llama()
    if positions is not None:
        model.config.max_position_embeddings = positions
    model.save_pretrained(d)
    if tokenizer:
        from analysis.families.demo_task import make_tokenizer

        make_tokenizer().save_pretrained(d)
    return d


def _importance(*extra, tokenizer: bool = False, selector: str = "magnitude"):
    return lambda tmp: ["importance", _llama(tmp, tokenizer), "--selector", selector, *extra,
                        "--json", tmp / "out.json", "--quiet"]


def _evaluate(selectors: str, *extra, tokenizer: bool = False, density: str = "0.1"):
    return lambda tmp: ["evaluate-selectors", _llama(tmp, tokenizer), "--selectors", selectors, "--density", density,
                        *extra, "--json", tmp / "out.json", "--quiet"]


def _nothing_written(tmp: Path, out: str, err: str) -> None:
    assert not (tmp / "out.json").exists()
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"] == []


def _data(kind: str):
    """--data that a data selector cannot use: a missing file, an empty .jsonl, a directory."""
    def make(tmp: Path) -> Path:
        if kind == "missing":
            return tmp / "missing.jsonl"
        if kind == "empty":
            (tmp / "empty.jsonl").write_text("")
            return tmp / "empty.jsonl"
        (tmp / "adir").mkdir()
        return tmp / "adir"
    return make


def _evaluate_data(kind: str):
    return lambda tmp: [*_evaluate("magnitude,wanda", tokenizer=True)(tmp), "--data", _data(kind)(tmp)]


def _diff_json_into_tuned(tmp: Path) -> list:
    """The diff selector's TUNED checkpoint (an --option) is an input: --json inside it is refused."""
    base = _llama(tmp)
    tuned = tmp / "tuned"
    tiny_llama(seed=1).save_pretrained(tuned)
    return ["importance", base, "--selector", "diff", "--option", f"base={base}", "--option", f"tuned={tuned}",
            "--json", tuned / "config.json", "--quiet"]


def _tuned_intact(tmp: Path, out: str, err: str) -> None:
    import json

    assert json.loads((tmp / "tuned" / "config.json").read_text())["model_type"] == "llama"


def _case(id, setup, *says):
    return Case(id, setup=setup, says=says, check=_nothing_written)


CASES = [
    # --selectors lists: a repeat is refused (it used to be an IndexError while printing)
    _case("importance-eval-duplicate", _evaluate("magnitude,magnitude"), "'magnitude' is listed twice"),
    _case("importance-eval-duplicate-later", _evaluate("random,magnitude,random"), "'random' is listed twice"),
    _case("importance-eval-empty-item", _evaluate("magnitude,,random"), "item 2 is empty"),
    _case("importance-eval-trailing-comma", _evaluate("magnitude,"), "item 2 is empty"),
    _case("importance-eval-empty-list", _evaluate(""), "item 1 is empty"),
    _case("importance-eval-unknown", _evaluate("magnitude,nope"), "unknown selector 'nope'", "one of magnitude"),
    # --option: a key the command sets by a flag is refused (it was passed twice: TypeError)
    _case("importance-option-seed-abc", _importance("--option", "seed=abc", selector="random"),
          "'seed' is set by --seed", "random"),
    _case("importance-option-seed-int", _importance("--option", "seed=3", selector="random"), "--seed"),
    _case("importance-option-granularity", _importance("--option", "granularity=row", "--granularity", "head",
                                                       selector="random"), "'granularity' is set by --granularity"),
    _case("importance-option-samples", _importance("--option", "samples=4", selector="wanda"),
          "'samples' is set by --samples"),
    _case("importance-option-seq-len", _importance("--option", "seq_len=4", selector="wanda"),
          "'seq_len' is set by --seq-len"),
    Case("importance-option-diff-output-into-tuned", setup=_diff_json_into_tuned, says=("tuned",),
         check=_tuned_intact),
    # --option: unknown keys, wrong types, broken pairs
    _case("importance-option-unknown", _importance("--option", "modes=uniform", selector="lisa"),
          "lisa has no option 'modes'", "its options: mode, active_layers"),
    _case("importance-option-unknown-none", _importance("--option", "k=1"), "magnitude has no option 'k'",
          "it takes none"),
    _case("importance-option-random-none", _importance("--option", "foo=1", selector="random"),
          "random has no option 'foo'; it takes none"),
    _case("importance-option-int-type", _importance("--option", "active_layers=two", selector="lisa"),
          "lisa: option active_layers must be an integer, got 'two'"),
    _case("importance-option-int-fraction", _importance("--option", "micro_batch=1.5", selector="fisher"),
          "option micro_batch must be an integer, got '1.5'"),
    _case("importance-option-bool-type", _importance("--option", "normalize=yes", selector="head_importance"),
          "option normalize must be true or false, got 'yes'"),
    _case("importance-option-float-nan", _importance("--option", "beta1=nan", selector="sensitivity"),
          "option beta1 must be a finite number, got 'nan'"),
    _case("importance-option-union-type", _importance("--option", "k=abc", selector="principal"),
          "option k must be an integer or a finite number, got 'abc'"),
    _case("importance-option-no-equals", _importance("--option", "foo"), "--option 'foo': expected KEY=VALUE"),
    _case("importance-option-no-key", _importance("--option", "=3"), "--option '=3': no option name"),
    _case("importance-option-no-value", _importance("--option", "mode=", selector="lisa"),
          "--option 'mode=': no value"),
    _case("importance-option-twice", _importance("--option", "mode=uniform", "--option", "mode=weight_norm",
                                                 selector="lisa"), "--option 'mode' given twice"),
    # densities
    _case("importance-density-zero", _importance("--density", "0"), "--density must be a fraction in (0, 1], got 0"),
    _case("importance-density-above-one", _importance("--density", "1.5"), "(0, 1], got 1.5"),
    _case("importance-density-nan", _importance("--density", "nan"), "(0, 1], got nan"),
    _case("importance-density-inf", _importance("--density", "inf"), "(0, 1], got inf"),
    _case("importance-eval-density-zero", _evaluate("magnitude,random", density="0"), "--density", "got 0"),
    _case("importance-eval-density-above-one", _evaluate("magnitude,random", density="2"), "--density", "got 2"),
    _case("importance-eval-density-nan", _evaluate("magnitude,random", density="nan"), "--density", "got nan"),
    # calibration sizes
    _case("importance-samples-zero", _importance("--samples", "0", selector="wanda", tokenizer=True),
          "--samples must be at least 1, got 0"),
    _case("importance-samples-negative", _importance("--samples", "-3", selector="wanda", tokenizer=True),
          "--samples must be at least 1, got -3"),
    _case("importance-eval-samples-zero", _evaluate("magnitude,wanda", "--samples", "0", tokenizer=True),
          "--samples must be at least 1, got 0"),
    _case("importance-seq-len-zero", _importance("--seq-len", "0", selector="wanda", tokenizer=True),
          "--seq-len must be at least 2, got 0"),
    _case("importance-seq-len-one", _importance("--seq-len", "1", selector="wanda", tokenizer=True),
          "--seq-len must be at least 2, got 1"),
    _case("importance-batch-size-zero", _importance("--batch-size", "0", selector="wanda", tokenizer=True),
          "--batch-size must be at least 1, got 0"),
    Case("importance-seq-len-absurd", setup=_importance("--seq-len", str(10**9), selector="wanda", tokenizer=True),
         says=("--seq-len 1,000,000,000 is more than the 2,048 positions", "llama-tok",
               "max_position_embeddings"), check=_nothing_written),
    _case("importance-seq-len-short-model", lambda tmp: ["importance", _llama(tmp, True, positions=32), "--selector",
                                                         "wanda", "--seq-len", "33", "--json", tmp / "out.json"],
          "--seq-len 33 is more than the 32 positions", "llama-tok"),
    _case("importance-eval-seq-len-absurd", _evaluate("magnitude,wanda", "--seq-len", "5000", tokenizer=True),
          "--seq-len 5,000 is more than the 2,048 positions"),
    # a selector that needs data, and data it cannot use
    Case("importance-data-no-tokenizer", setup=_importance(selector="wanda"),
         says=("wanda needs calibration data (--data demo)", "llama has no tokenizer"), check=_nothing_written),
    _case("importance-eval-data-no-tokenizer", _evaluate("magnitude,taylor,wanda"),
          "taylor, wanda need calibration data", "has no tokenizer"),
    _case("importance-eval-data-missing", _evaluate_data("missing"), "wanda needs calibration data",
          "missing.jsonl: no such calibration file"),
    _case("importance-eval-data-empty", _evaluate_data("empty"), "wanda needs calibration data",
          "empty.jsonl: no calibration examples"),
    _case("importance-eval-data-directory", _evaluate_data("dir"), "wanda needs calibration data", "adir: not a file"),
]


@pytest.mark.parametrize("case", params(CASES))
def test_fault(case, tmp_path, capsys):
    run_case(case, tmp_path, capsys)
