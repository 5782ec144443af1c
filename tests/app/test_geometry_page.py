"""AppTest of the Geometry page on the demo family: SFT against the base and the RL runs against SFT,
side by side, with the numbers the geometry API gives; a bad k is an st.error."""

from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

from analysis.geometry import geometry
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
