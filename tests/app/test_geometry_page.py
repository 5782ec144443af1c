"""AppTest of the Geometry page on the demo family: SFT against the base and the RL runs against SFT,
side by side, with the numbers the geometry API gives; a bad k is an st.error."""

from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

from analysis.sparsity.geometry import geometry
from conftest import ROOT
from plotly_data import traces


def test_geometry_page_on_the_demo(demo):
    at = AppTest.from_file(str(ROOT / "app_pages" / "geometry.py"), default_timeout=300)
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    heatmaps = at.get("plotly_chart")
    titles = [json.loads(h.proto.spec)["layout"]["title"]["text"] for h in heatmaps[:3]]
    assert titles == ["demo/sft (from demo/base)", "demo/rl-seed1 (from demo/sft)", "demo/rl-seed2 (from demo/sft)"]
    want = geometry(demo / "sft", demo / "rl-seed1").to_json()
    z = traces(heatmaps[1].proto.spec)[0]["z"]  # default field: spectral drift, layer × kind
    assert z[0][0] == pytest.approx(want["tensors"][0]["spectral_drift"], rel=1e-6)  # layer 0, q
    table = at.dataframe[0].value
    rl = table[(table["run"] == "demo/rl-seed1 (from demo/sft)") & (table["kind"] == "up")].iloc[0]
    up = next(r for r in want["kinds"] if r["kind"] == "up")
    assert rl["principal o1"] == pytest.approx(up["principal_o1"]) and rl["α tuned"] == pytest.approx(up["alpha_tuned"])
    assert at.metric[0].value == "1"  # k = 1% of a rank-32/64 matrix, at least 1
    at.text_input(key="geometry_k").set_value("0").run()
    assert not at.exception and at.error and "k must be" in at.error[0].value


def _pair_with_bad_matrices(tmp_path, every: bool = False):
    """base: +inf in layer 0's q_proj (every block matrix's first element with ``every``) and
    layer 1's o_proj all zeros; tuned: that o_proj's first 4 rows written."""
    import math

    import torch

    from conftest import tiny_llama

    refs = []
    for name in ("base", "tuned"):
        m = tiny_llama()
        with torch.no_grad():
            m.model.layers[1].self_attn.o_proj.weight.zero_()
            if name == "tuned":
                m.model.layers[1].self_attn.o_proj.weight[:4] = 1e-2
            else:
                for p in m.parameters() if every else [m.model.layers[0].self_attn.q_proj.weight]:
                    if p.dim() == 2 and p is not m.model.embed_tokens.weight and p is not m.lm_head.weight:
                        p[0, 0] = math.inf
        m.save_pretrained(tmp_path / name)
        refs.append(str(tmp_path / name))
    return refs


def _shown(markdown: str) -> str:
    """The text a Markdown body shows: its backslash escapes resolved (CommonMark)."""
    import re

    return re.sub(r"\\(.)", r"\1", markdown)


def _page(tmp_path, monkeypatch, refs):
    monkeypatch.setenv("SUBNETSCOPE_HOME", str(tmp_path / "home"))  # no demo: the pair given is all there is
    at = AppTest.from_file(str(ROOT / "app_pages" / "geometry.py"), default_timeout=120)
    at.session_state["base_ref"], at.session_state["tuned_refs"] = refs[0], [refs[1]]
    return at.run()


def test_a_non_finite_matrix_is_a_warning_and_a_zero_one_says_what_is_undefined(tmp_path, monkeypatch):
    """the matrix with an inf is named with its reason in an st.warning (no
    exception, no error), and left out of the heatmap, the table and the matrix list; a base matrix of
    zeros shows "—" and says why its angles are undefined."""
    at = _page(tmp_path, monkeypatch, _pair_with_bad_matrices(tmp_path))
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    [w] = [_shown(w.value) for w in at.warning if "skipped" in w.value]
    # 1% of a rank-64 matrix is one direction: said, not silent
    assert any("of the rank is k = 1 for the" in _shown(w.value) for w in at.warning)
    label = "tuned (from base)"  # short names: the last path part tells them apart
    assert w.startswith(f"{label}: 1 block matrix skipped, left out of the heatmaps, the table and α")
    assert w.endswith("layers.0.self_attn.q_proj.weight: base holds 1 non-finite element (inf)")
    z = traces(at.get("plotly_chart")[0].proto.spec)[0]["z"]
    assert z[0][0] is None and z[1][0] is not None  # layer 0, q: left out; layer 1, q: measured
    q = at.dataframe[0].value.set_index("kind").loc["q"]
    assert (q["matrices"], q["skipped"]) == (1, 1)
    names = at.selectbox(key="geometry_matrix").options
    assert "layers.0.self_attn.q_proj.weight" not in names and len(names) == 13
    at.selectbox(key="geometry_matrix").set_value("layers.1.self_attn.o_proj.weight").run()
    assert not at.exception and not at.error
    assert at.metric[2].value == "—" and at.metric[1].value == "—"
    assert any("the base is all zeros: it has no top-1 singular subspace" in _shown(c.value) for c in at.caption)


def test_every_matrix_non_finite_is_one_st_error(tmp_path, monkeypatch):
    at = _page(tmp_path, monkeypatch, _pair_with_bad_matrices(tmp_path, every=True))
    assert not at.exception, at.exception
    [e] = [_shown(e.value) for e in at.error]
    assert e.startswith("tuned (from base): no block matrix of")
    assert "could be compared" in e
    assert "layers.0.self_attn.q_proj.weight: base holds 1 non-finite element (inf)" in e and "\n" not in e
