"""AppTest of the Update sparsity and Overlap pages on a crafted family of tiny checkpoints."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest

from analysis.sparsity.diff import diff_checkpoints
from analysis.sparsity.overlap import overlap
from conftest import ROOT, tiny_llama
from plotly_data import traces


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base + two runs, changes planted in known places (run 2 also changes 5 of run 1's)."""
    d = tmp_path_factory.mktemp("family")
    model = tiny_llama()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    paths = {}
    plants = {"r1": [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, 7)],
              "r2": [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (40, 1), (41, 2)]}
    q = "model.layers.1.self_attn.q_proj.weight"
    for name, sd_t in [("base", sd)] + [(n, None) for n in plants]:
        p = d / name
        p.mkdir()
        if sd_t is None:
            sd_t = {k: v.clone() for k, v in sd.items()}
            for i, j in plants[name]:
                sd_t[q][i, j] += 0.1
        save_file(sd_t, p / "model.safetensors")
        model.config.to_json_file(p / "config.json")
        paths[name] = str(p)
    return paths


def _run(page, base, tuned):
    at = AppTest.from_file(str(ROOT / "app_pages" / page), default_timeout=120)
    at.session_state["base_ref"] = base
    at.session_state["tuned_refs"] = tuned
    return at.run()


def test_update_sparsity_page(family):
    at = _run("update_sparsity.py", family["base"], [family["r1"], family["r2"]])
    assert not at.exception, at.exception
    assert not at.error
    metrics = [m.value for m in at.metric]
    n = 68_160
    assert metrics == [f"{(n - 8) / n:.2%}", f"{(n - 7) / n:.2%}"]
    # the caption says changed and counts the changed elements (it once said "unchanged" over a changed count)
    captions = [c.value for c in at.caption]
    assert "changed at τ = 1e-5: 8 of 68,160 elements" in captions
    assert "changed at τ = 1e-5: 7 of 68,160 elements" in captions
    assert not any("unchanged at" in c for c in captions) and not any("exact bits" in c for c in captions)
    charts = at.get("plotly_chart")
    sweep = traces(charts[0].proto.spec)
    assert len(sweep) == 2
    xs, ys = sweep[0]["x"], sweep[0]["y"]
    assert ys[xs.index(1e-5)] == pytest.approx((n - 8) / n)
    assert ys[xs.index(1.0)] == pytest.approx(1.0)
    # layer × kind heatmap: layer 1, q has 8 changed of 4096
    heat = traces(charts[1].proto.spec)[0]
    q = heat["x"].index("q")
    assert heat["z"][1][q] == pytest.approx(1 - 8 / 4096)
    assert heat["z"][0][q] == pytest.approx(1.0)
    # head heatmap (q): row 40, 41 -> head 2 of layer 1; rows 0..7 -> head 0
    heads = traces(charts[2].proto.spec)[0]
    assert heads["z"][1][0] == pytest.approx(1 - 8 / 1024) and heads["z"][1][2] == pytest.approx(1.0)


def test_update_sparsity_tolerance_changes_counts(family):
    at = _run("update_sparsity.py", family["base"], [family["r1"]])
    at.select_slider[0].set_value(1.0).run()
    assert not at.exception
    assert at.metric[0].value == "100.00%"


@pytest.mark.parametrize("how", ["family.json", "url", "model card"])
def test_update_sparsity_compares_each_fine_tune_with_its_parent(family, how, tmp_path):
    """r2's parent is r1 — kept by the user (family.json), carried by a link (?parent=r2::r1), or read
    from a model card (a copy of r2 whose README names r1): the page compares r1 → r2."""
    import shutil

    from analysis.families.lineage import set_parent

    r2 = family["r2"]
    if how == "model card":
        r2 = str(tmp_path / "r2-copy")
        shutil.copytree(family["r2"], r2)
        (tmp_path / "r2-copy" / "README.md").write_text(f"---\nbase_model: {family['r1']}\n---\n")
    at = AppTest.from_file(str(ROOT / "app_pages" / "update_sparsity.py"), default_timeout=120)
    at.session_state["base_ref"] = family["base"]
    at.session_state["tuned_refs"] = [family["r1"], r2]
    if how == "family.json":
        set_parent(r2, family["r1"])
    elif how == "url":
        at.query_params["parent"] = f"{r2}::{family['r1']}"
    at.run()
    assert not at.exception
    # r1 -> r2: r1's 8 changes minus the 5 shared, plus r2's own 2 elsewhere = 5 elements differ
    expected = diff_checkpoints(family["r1"], r2, tol=1e-5)
    assert expected.changed_params == 5
    assert at.metric[1].value == f"{expected.update_sparsity:.2%}"
    assert at.metric[1].label == ("r1 → r2-copy" if how == "model card" else "r1 → r2")
    assert at.metric[0].label == "base → r1"  # no parent in its files: the sidebar base, said in a caption
    assert any("r1: no parent in the files" in c.value for c in at.caption)


def test_update_sparsity_bad_fine_tune(family, tmp_path):
    at = _run("update_sparsity.py", family["base"], [str(tmp_path / "missing"), family["r1"]])
    assert not at.exception
    assert any("missing: no such file or directory" in e.value for e in at.error)
    assert len(at.metric) == 1


def test_overlap_page(family):
    at = _run("overlap.py", family["base"], [family["r1"], family["r2"]])
    assert not at.exception, at.exception
    assert not at.error
    ref = overlap(family["base"], [family["r1"], family["r2"]], tol=1e-5).pairs()[0]
    assert (ref["intersection"], ref["o1"], ref["o2"]) == (5, 5 / 8, 5 / 7)
    matrix = traces(at.get("plotly_chart")[0].proto.spec)[0]
    assert matrix["z"][0][1] == pytest.approx(5 / 8) and matrix["z"][1][0] == pytest.approx(5 / 7)
    consensus = traces(at.get("plotly_chart")[2].proto.spec)[0]
    assert consensus["y"] == [68_160 - 10, 5, 5]
    assert diff_checkpoints(family["base"], family["r2"]).changed_params == 7
    vectors = traces(at.get("plotly_chart")[3].proto.spec)  # runs as vectors: the page shows the pass's values
    by_layer = {q["layer"]: q for q in ref["by_layer"]}
    assert vectors[0]["y"] == [by_layer[L]["cosine"] for L in vectors[0]["x"]]
    assert vectors[1]["y"] == [by_layer[L]["sign_agreement"] for L in vectors[1]["x"]]
    assert ref["cosine"] is not None and -1 <= ref["cosine"] <= 1 and vectors[2]["y"][0] == 0.5


def test_overlap_page_needs_two_runs(family):
    at = _run("overlap.py", family["base"], [family["r1"]])
    assert not at.exception
    assert "at least two fine-tunes" in at.info[0].value


def test_large_checkpoint_runs_as_background_job(family, tmp_path, monkeypatch):
    """Above the inline limit the page never diffs in the rerun: a button starts a job (the CLI in
    a subprocess); while it runs the page shows progress; once done, its result."""
    import time

    from analysis.jobs import JobDir

    monkeypatch.setenv("SUBNETSCOPE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SUBNETSCOPE_INLINE_LIMIT", "0")
    at = _run("update_sparsity.py", family["base"], [family["r1"]])
    assert not at.exception and not at.metric
    (button,) = [b for b in at.button if b.label == "Run diff in the background"]
    button.click().run()
    assert not at.exception
    job_dirs = list((tmp_path / "home" / "jobs").iterdir())
    assert len(job_dirs) == 1
    deadline = time.time() + 120
    while JobDir(job_dirs[0]).state().status == "running" and time.time() < deadline:
        time.sleep(0.3)
    assert JobDir(job_dirs[0]).state().status == "done"
    at.run()
    assert not at.exception
    assert at.metric[0].value == f"{(68_160 - 8) / 68_160:.2%}"


def test_update_sparsity_page_shows_exact_bit_tensors(tmp_path):
    """An int8 (quantized) q_proj: counted by exact bits, said so in a caption and a column."""
    model = tiny_llama()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    q = "model.layers.0.self_attn.q_proj.weight"
    sd[q] = (sd[q] * 100).round().to(torch.int8)
    tuned = {k: v.clone() for k, v in sd.items()}
    tuned[q][0, :3] += 1
    tuned["model.layers.1.mlp.up_proj.weight"][0, :2] += 0.1
    paths = []
    for name, s in (("base", sd), ("tuned", tuned)):
        (tmp_path / name).mkdir()
        save_file(s, tmp_path / name / "model.safetensors")
        model.config.to_json_file(tmp_path / name / "config.json")
        paths.append(str(tmp_path / name))
    at = _run("update_sparsity.py", paths[0], [paths[1]])
    assert not at.exception, at.exception
    assert not at.error
    n = 68_160
    assert at.metric[0].value == f"{(n - 5) / n:.2%}"
    captions = [c.value for c in at.caption]
    assert "changed at τ = 1e-5: 5 of 68,160 elements" in captions
    assert ("of which compared by exact bits (integer / bool / packed tensors, τ does not apply): "
            "3 of 4,096 elements in 1 tensors changed") in captions
    table = next(df.value for df in at.dataframe if "compare" in df.value.columns)
    rows = dict(zip(table["name"], table["compare"]))
    assert rows[q] == "exact_bits" and rows["model.layers.1.mlp.up_proj.weight"] == "tolerance"


def test_slider_reaggregates_without_a_new_job(family, tmp_path, monkeypatch):
    """Above the inline limit one background diff serves every τ: moving the slider starts no job
    and shows the counts a fresh diff at that τ gives, heads included; details (MLP channels,
    absorption) at the new τ are one button away."""
    import time

    from analysis.jobs import JobDir

    monkeypatch.setenv("SUBNETSCOPE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SUBNETSCOPE_INLINE_LIMIT", "0")
    at = _run("update_sparsity.py", family["base"], [family["r2"]])
    next(b for b in at.button if b.label == "Run diff in the background").click().run()
    job = JobDir(next((tmp_path / "home" / "jobs").iterdir()))
    deadline = time.time() + 120
    while job.state().status == "running" and time.time() < deadline:
        time.sleep(0.3)
    at.run()
    import analysis.sparsity.diff

    took = []

    def timed(d, tol, _f=analysis.sparsity.diff.at_tolerance):
        t0 = time.perf_counter()
        out = _f(d, tol)
        took.append(time.perf_counter() - t0)
        return out

    monkeypatch.setattr(analysis.sparsity.diff, "at_tolerance", timed)  # the page imports it on each rerun
    for tol in (0.0, 1e-2, 1e-1, 1.0):
        at.select_slider(key="sparsity_tol").set_value(tol).run()
        assert took and max(took) < 0.1, took  # a move re-aggregates in < 100 ms
        assert not at.exception, at.exception
        want = diff_checkpoints(family["base"], family["r2"], tol=tol)
        assert at.metric[0].value == f"{want.update_sparsity:.2%}", tol
        heads = next(c for c in at.get("plotly_chart") if "per head" in c.proto.spec)
        z = traces(heads.proto.spec)[0]["z"]
        want_q = sorted((u for u in want.by_unit() if u["component"] == at.radio(key="head_comp").value),
                        key=lambda u: u["layer"])
        assert z == [[1 - c / u["numel"] for c in u["changed"]] for u in want_q], tol  # heads at this τ
        assert len(list((tmp_path / "home" / "jobs").iterdir())) == 1  # still the one job
    assert any("recomputing them reads the weights again" in c.value for c in at.caption)


def test_an_8b_sized_pair_asks_first_and_says_what_it_will_read(tmp_path, monkeypatch):
    """Llama-3-8B shapes (sparse files: real headers, data holes): the page reads headers only, starts
    nothing, and the job button says the size and a time at disk speed."""
    from bench.first_view import make_8b_pair

    monkeypatch.setenv("SUBNETSCOPE_HOME", str(tmp_path / "home"))
    base, tuned = make_8b_pair(tmp_path / "big")
    at = _run("update_sparsity.py", str(base), [str(tuned)])
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any(b.label == "Run diff in the background" for b in at.button) and not at.metric
    note = next(c.value for c in at.caption if c.value.startswith("Reads "))
    assert note.startswith("Reads 29.9 GiB of weights (8,030,261,248 parameter reads by its cost) — at least 80 s")
    assert not (tmp_path / "home" / "jobs").exists()
