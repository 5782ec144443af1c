"""The core loop's verdict: a masked run against a random mask at the same budget, the paired 95%
interval of the per-problem accuracy gap, its sign in words, and the chance value of "identical to
full" beside the masked run's."""

import json

import pytest

from analysis.cli import main
from analysis.finetune.compare import _words, compare_runs, mean_ci, same_budget
from analysis.finetune.config import FinetuneConfig
from analysis.finetune.experiments import block_density
from analysis.finetune.run import run_finetune


def test_words_follow_the_interval():
    assert _words([0.01, 0.2], "the random mask") == "beat the random mask"
    assert _words([-0.2, -0.01], "the random mask") == "did worse than the random mask"
    assert _words([-0.1, 0.1], "x") == "no detectable difference from x (the 95% interval contains 0)"
    assert _words(None, "x") == "no paired evaluation to compare"


def _run(cfg, trainable):
    return {"config": cfg, "summary": {"trainable": trainable}}


def test_same_budget():
    c = {"checkpoint": "/a", "task": "demo-rl", "steps": 50, "batch_size": 16}
    assert same_budget(_run(c, 1000), _run(c, 1010))  # within 1%
    assert not same_budget(_run(c, 1000), _run(c, 1011))
    assert not same_budget(_run(c, 1000), _run({**c, "steps": 51}, 1000))
    assert not same_budget(_run(c, 1000), _run({**c, "checkpoint": "/b"}, 1000))
    assert not same_budget(_run(c, None), _run(c, None))


@pytest.mark.slow
def test_a_diff_mask_against_a_random_mask_of_the_same_density(demo, tmp_path):
    sft, rl = str(demo / "sft"), str(demo / "rl-seed1")
    common = dict(checkpoint=sft, task="demo-sft", steps=4, batch_size=8, lr=1e-3, eval_every=2)
    density = block_density(sft, rl)
    runs = {"diff": FinetuneConfig(diff=[sft, rl], **common),
            "random": FinetuneConfig(random=round(density, 4), **common),
            "full": FinetuneConfig(full=True, **common), "small": FinetuneConfig(random=0.01, **common)}
    for name, cfg in runs.items():
        assert run_finetune(cfg, tmp_path / name)["status"] == "finished"
    d = compare_runs([tmp_path / n for n in ("diff", "random", "small")], reference=tmp_path / "full")
    [v] = d["verdicts"]  # the 1% random mask is another budget: no verdict against it
    assert (v["run"], v["random"]) == (str(tmp_path / "diff"), str(tmp_path / "random"))
    ev = {n: json.loads((tmp_path / n / "eval.json").read_text())["per_problem_accuracy"] for n in ("diff", "random")}
    want = mean_ci([a - b for a, b in zip(ev["diff"], ev["random"])])
    assert v["accuracy_gap"] == pytest.approx(want["mean"]) and v["accuracy_gap_ci"] == pytest.approx(want["ci"])
    assert v["problems"] == len(ev["diff"]) > 0
    assert v["verdict"] == _words(want["ci"], "the random mask")
    rows = {r["run"]: r for r in d["runs"]}
    assert v["identical_to_reference"] == rows[str(tmp_path / "diff")]["to_reference_identical_fraction"]
    assert v["random_identical_to_reference"] == rows[str(tmp_path / "random")]["to_reference_identical_fraction"]
    # the CLI says it in words
    out = tmp_path / "cmp.json"
    assert main(["compare-runs", str(tmp_path / "diff"), str(tmp_path / "random"), "--reference",
                 str(tmp_path / "full"), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["verdicts"][0]["verdict"] == v["verdict"]


@pytest.mark.slow
def test_the_matched_random_control_is_at_the_same_budget(demo, tmp_path):
    """The page's "Queue its random control": the masked run's recipe with a random mask of as many
    trainable elements, so the verdict pairs the two."""
    from analysis.finetune.experiments import matched_random
    from analysis.jobs import RunDir

    sft = str(demo / "sft")
    cfg = FinetuneConfig(checkpoint=sft, task="demo-sft", selector="magnitude", density=0.03, steps=2, batch_size=8,
                         lr=1e-3, eval_every=1)
    s = run_finetune(cfg, tmp_path / "sel")
    control = matched_random(RunDir(tmp_path / "sel").config(), s["trainable"])
    assert (control.source, control.steps, control.lr, control.batch_size, control.task, control.checkpoint) == (
        "random", 2, 1e-3, 8, "demo-sft", sft)
    run_finetune(control, tmp_path / "rnd")
    [v] = compare_runs([tmp_path / "sel", tmp_path / "rnd"])["verdicts"]
    assert v["random"] == str(tmp_path / "rnd") and abs(v["random_trainable"] - v["trainable"]) <= 0.01 * v["trainable"]
