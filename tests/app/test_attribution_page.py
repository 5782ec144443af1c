"""AppTest of the Attribution page on the demo family: the numbers it draws are the API's, the
base/fine-tune comparison and its head table, IG's "more steps", a large model through a job,
and a checkpoint that cannot be attributed."""

from __future__ import annotations

import time

import pytest
from streamlit.testing.v1 import AppTest

from analysis.attribution.methods import attribute, compare, head_weight_change
from analysis.families.demo_task import qa_examples
from analysis.jobs import JobDir
from analysis.checkpoints.models import load_model
from conftest import ROOT, tiny_llama
from plotly_data import traces

PROMPT, ANSWER = qa_examples("held_out")[0]


def _page(base, tuned) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app_pages" / "attribution.py"), default_timeout=300)
    at.session_state["base_ref"] = str(base)
    at.session_state["tuned_refs"] = [str(t) for t in tuned]
    return at



def test_attribution_page_base_against_sft(demo):
    at = _page(demo / "base", [demo / "sft"])
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert at.text_area[0].value == PROMPT and at.text_input[0].value == ANSWER  # the demo task's defaults
    assert at.selectbox[1].value == str(demo / "sft")  # compared with its fine-tune by default
    a = attribute(*load_model(demo / "base", device="cpu"), PROMPT, ANSWER, "lrp-attn")
    b = attribute(*load_model(demo / "sft", device="cpu"), PROMPT, ANSWER, "lrp-attn")
    bars = traces(at.get("plotly_chart")[0].proto.spec)
    assert [t["name"] for t in bars] == ["demo/base", "demo/sft"]
    assert bars[0]["y"] == pytest.approx(a.scores, rel=1e-6, abs=1e-9)
    assert bars[1]["y"] == pytest.approx(b.scores, rel=1e-6, abs=1e-9)
    diff = traces(at.get("plotly_chart")[1].proto.spec)[0]["y"]
    assert diff == pytest.approx(compare(a, b)["scores"], abs=1e-9)
    assert any("Conservation error" in c.value for c in at.caption)
    # the heads table: the heads whose relevance moved most, with their weight change base -> sft
    table = at.dataframe[0].value
    change = {(r["layer"], r["head"]): r["fraction"] for r in head_weight_change(demo / "base", demo / "sft")}
    moved = compare(a, b)["heads_moved"]
    assert [(r.layer, r.head) for r in table.itertuples()] == [(m["layer"], m["head"]) for m in moved]
    for r in table.itertuples():
        assert r._4 == pytest.approx(change[(r.layer, r.head)])  # "weights changed"
    assert "Faithfulness" in [s.value for s in at.subheader]


def test_ig_warns_and_offers_more_steps(demo):
    at = _page(demo / "base", [demo / "sft"])
    at.run()
    at.selectbox[1].set_value(None)  # one checkpoint
    at.selectbox[0].set_value(str(demo / "sft"))
    at.selectbox[2].set_value("ig").run()
    at.checkbox(key="ig_auto").uncheck().run()  # one Gauss-Legendre rule of N steps
    at.number_input[0].set_value(4).run()
    assert not at.exception, at.exception
    assert at.warning and "not converged" in at.warning[0].value
    more = next(b for b in at.button if b.label.startswith("Run with"))
    assert more.label == "Run with 16 steps"
    more.click().run()
    assert not at.exception, at.exception
    assert at.number_input[0].value == 16
    assert any("with 16 steps" in c.value for c in at.caption)


def test_ig_is_adaptive_by_default_and_shows_its_steps(demo):
    """the default IG refines the path until it is complete within 1%, and the page
    says how many steps it took of which budget; a budget that ends first is a warning with a
    button for a larger one."""
    at = _page(demo / "base", [demo / "sft"])
    at.run()
    at.selectbox[1].set_value(None)
    at.selectbox[0].set_value(str(demo / "sft"))
    at.selectbox[2].set_value("ig").run()
    assert not at.exception, at.exception
    assert at.checkbox(key="ig_auto").value and at.number_input[0].value == 4096
    r = attribute(*load_model(demo / "sft", device="cpu"), PROMPT, ANSWER, "ig")
    assert r.converged and r.completeness_error <= 0.01 and 64 < r.steps_used <= 4096
    cap = next(c.value for c in at.caption if c.value.startswith("IG completeness error"))
    assert f"{r.steps} steps, {r.steps_used} evaluated of a budget of 4096" in cap and "; converged at 1%" in cap
    assert not at.warning
    bars = traces(at.get("plotly_chart")[0].proto.spec)
    assert bars[0]["y"] == pytest.approx(r.scores, rel=1e-6, abs=1e-9)

    at.number_input[0].set_value(192).run()  # the first segments and their halves only
    assert not at.exception, at.exception
    assert at.warning and "did not converge within its budget of 192 steps" in at.warning[0].value
    assert any("192 evaluated of a budget of 192" in c.value and "not converged" in c.value for c in at.caption)
    more = next(b for b in at.button if b.label.startswith("Run with a budget"))
    assert more.label == "Run with a budget of 768 steps"
    more.click().run()
    assert not at.exception, at.exception
    assert at.number_input[0].value == 768


def test_prompt_with_unknown_characters_is_a_warning_and_an_unknown_target_an_error(demo):
    at = _page(demo / "sft", [])
    at.run()
    at.text_area[0].set_value("Q:12+07?\nA:").run()  # "?" is not in the demo's vocabulary
    assert not at.exception, at.exception
    assert not at.error and any("does not know ('?')" in w.value for w in at.warning)
    at.text_input[0].set_value("€€€").run()
    assert not at.exception, at.exception
    assert at.error and "does not know ('€')" in at.error[0].value and "explained as" in at.error[0].value


def test_large_model_runs_as_a_job(demo, tmp_path, monkeypatch):
    monkeypatch.setenv("SUBNETSCOPE_JOBS_IN_PROCESS", "1")  # the job in-process: its directory and result as a process
    home = tmp_path / "home"
    home.mkdir()
    (home / "demo").symlink_to(demo)
    monkeypatch.setenv("SUBNETSCOPE_HOME", str(home))
    monkeypatch.setenv("SUBNETSCOPE_INLINE_LIMIT", "1")  # every model is "large"
    at = _page(home / "demo" / "base", [home / "demo" / "sft"])
    at.run()
    assert not at.exception, at.exception
    assert not at.get("plotly_chart") and not (home / "jobs").exists()  # nothing before the user asks
    next(b for b in at.button if b.label == "Run lrp-attn attribution in the background").click().run()
    deadline = time.time() + 300
    (job,) = list((home / "jobs").iterdir())
    while JobDir(job).state().status == "running":
        assert time.time() < deadline
        time.sleep(0.3)
    assert JobDir(job).state().status == "done", JobDir(job).state().error
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    a = attribute(*load_model(demo / "base", device="cpu"), PROMPT, ANSWER, "lrp-attn")
    bars = traces(at.get("plotly_chart")[0].proto.spec)
    assert bars[0]["y"] == pytest.approx(a.scores, rel=1e-6, abs=1e-9)
    assert len(bars) == 2  # the job ran the comparison too


def test_checkpoint_without_tokenizer_is_an_error_not_a_crash(tmp_path):
    d = tmp_path / "llama"
    tiny_llama().save_pretrained(d)
    at = _page(d, [])
    at.run()
    assert not at.exception, at.exception
    assert at.error and "tokenizer" in at.error[0].value
