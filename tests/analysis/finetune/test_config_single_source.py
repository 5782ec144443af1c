"""The fine-tune options are declared once (FinetuneConfig's fields): the CLI's arguments, their
help and defaults, and the page's form all come from there, and this test holds them together."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

import pytest
from streamlit.testing.v1 import AppTest

from analysis.cli import build_parser
from analysis.cli.finetune import config_from_args
from analysis.finetune.config import (DEMO_RL_RECIPE, LORA_LR_FACTOR, FinetuneConfig, FinetuneConfigError,
                                      eval_every_for)
from conftest import ROOT


def _finetune_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["finetune"]


def test_cli_arguments_are_the_config_fields():
    actions = {a.dest: a for a in _finetune_parser()._actions}
    for f in fields(FinetuneConfig):
        a = actions[f.name]  # every field is an argument
        assert a.default is None, f.name  # not given: the dataclass's default applies
        if f.default is not MISSING and f.default not in (None, False):
            assert a.help.endswith(f"Default: {f.default}."), (f.name, a.help)
        assert tuple(a.choices or ()) == tuple(f.metadata.get("choices", ())), f.name
    assert set(actions) - {f.name for f in fields(FinetuneConfig)} == {
        "help", "resume", "config", "out", "overwrite", "quiet", "progress_file"}


def test_cli_defaults_are_the_dataclass_defaults(tmp_path):
    args = build_parser().parse_args(["finetune", "ckpt", "--full", "--out", str(tmp_path)])
    assert config_from_args(args) == FinetuneConfig(checkpoint="ckpt", full=True)
    args = build_parser().parse_args(["finetune", "ckpt", "--random", "0.1", "--eval-every", "7", "--combine",
                                      "intersect", "--diff-tol", "0", "--out", str(tmp_path)])
    c = config_from_args(args)
    assert (c.random, c.eval_every, c.mask_combine, c.diff_tol, c.steps) == (0.1, 7, "intersect", 0.0, 50)


@pytest.mark.parametrize("argv, message", [
    (["--random", "1.5"], "density must be in (0, 1]"),
    (["--diff-tol", "-1"], "tolerance must be finite and >= 0"),
    (["--task", "nope"], "invalid choice: 'nope'"),
    (["--full", "--lora", "4"], "not allowed with argument"),
])
def test_cli_refuses_what_the_fields_refuse(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["finetune", "ckpt", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_pydantic_type_checks_name_the_field():
    with pytest.raises(FinetuneConfigError, match=r"^steps must be int, got '3'$"):
        FinetuneConfig(checkpoint="c", full=True, steps="3")
    with pytest.raises(FinetuneConfigError, match=r"^mask must be list\[str\], got 5$"):
        FinetuneConfig.from_dict({"checkpoint": "c", "mask": 5})
    with pytest.raises(FinetuneConfigError, match=r"^full must be bool, got 1$"):
        FinetuneConfig(checkpoint="c", full=1)


def test_demo_rl_recipe_is_the_demo_builds():
    from analysis.families.demo import RECIPE

    stage = next(s for s in RECIPE if s.name == "rl-seed1")
    assert (stage.steps, stage.lr, stage.batch, stage.seed) == (
        DEMO_RL_RECIPE["steps"], DEMO_RL_RECIPE["lr"], DEMO_RL_RECIPE["batch_size"], DEMO_RL_RECIPE["seed"])


def test_page_form_defaults_are_the_dataclass_defaults(demo):
    at = AppTest.from_file(str(ROOT / "app_pages" / "finetune.py"), default_timeout=120)
    at.session_state["base_ref"] = str(demo / "base")
    at.session_state["tuned_refs"] = [str(demo / "sft")]
    at.run()
    assert not at.exception, at.exception
    d = FinetuneConfig.defaults()
    at.selectbox[1].set_value("demo-sft").run()
    number = {w.label: w.value for w in at.number_input}
    # the evaluation interval follows the steps (about ten evaluations a run: eval_every_for, in config.py)
    assert (number["Steps"], number["Learning rate"], number["Batch size"], number["Seed"],
            number["Evaluate every"]) == (d["steps"], d["lr"], d["batch_size"], d["seed"], eval_every_for(d["steps"]))
    assert next(w for w in at.selectbox if w.label == "Optimizer").value == d["optimizer"]
    at.selectbox[1].set_value("demo-rl").run()  # the demo's RL recipe, the form's preset for demo-rl
    number = {w.label: w.value for w in at.number_input}
    r = {**d, **DEMO_RL_RECIPE}
    assert (number["Steps"], number["Learning rate"], number["Batch size"], number["Seed"],
            number["Evaluate every"]) == (r["steps"], r["lr"], r["batch_size"], r["seed"], eval_every_for(r["steps"]))
    at.radio[0].set_value("lora").run()  # LoRA's own recipe: its tenfold learning rate
    assert next(w for w in at.number_input if w.label == "Learning rate").value == pytest.approx(
        r["lr"] * LORA_LR_FACTOR)
