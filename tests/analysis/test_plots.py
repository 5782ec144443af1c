"""Figure builders of ui/plots.py, checked on the figure data (decoded as a browser gets it)."""

from __future__ import annotations

import json
import math

import pytest

from ui import plots
from ui.plots import sparsity_sweep
from plotly_data import traces

ROWS = [{"tolerance": 0.0, "update_sparsity": 0.25}, {"tolerance": 1e-8, "update_sparsity": 0.5},
        {"tolerance": 1e-5, "update_sparsity": 0.75}, {"tolerance": 1.0, "update_sparsity": 1.0}]


def test_sparsity_sweep_draws_tau_zero():
    """The τ = 0 row is not dropped from the log axis: a marker one decade left of the smallest τ,
    on a tick labelled 0, cut off from the line by a gap."""
    fig = json.loads(sparsity_sweep({"sft → rl": ROWS, "other": ROWS[1:]}, tol=1e-6).to_json())
    line, other = traces(fig)
    assert line["x"][0] == pytest.approx(1e-9) and line["x"][1:] == [None, 1e-8, 1e-5, 1.0]
    assert line["y"] == [0.25, None, 0.5, 0.75, 1.0]
    assert line["connectgaps"] is False
    assert line["marker"]["size"][0] > 0 and set(line["marker"]["size"][1:]) == {0}  # a marker at τ = 0 only
    assert line["text"][0].startswith("τ = 0")
    axis = fig["layout"]["xaxis"]
    assert axis["type"] == "log"
    assert axis["tickvals"][0] == line["x"][0] and axis["ticktext"][0] == "0"
    assert axis["tickvals"][1:] == [1e-8, 1e-6, 1e-4, 1e-2, 1.0]
    assert axis["ticktext"][1:] == ["1e-8", "1e-6", "1e-4", "1e-2", "1e0"]
    # a fine-tune whose sweep has no τ = 0 row draws its line only
    assert other["x"] == [1e-8, 1e-5, 1.0] and None not in other["y"]


def test_sparsity_sweep_without_tau_zero_keeps_the_default_axis():
    fig = json.loads(sparsity_sweep({"a": ROWS[1:]}).to_json())
    (line,) = traces(fig)
    assert line["x"] == [1e-8, 1e-5, 1.0]
    assert "tickvals" not in fig["layout"]["xaxis"]


def test_heatmaps_keep_their_height_and_show_the_data_range():
    """A heatmap that grows with its layers keeps that height (it used to be reset to 320 px), and
    a score heatmap's colour range is exactly the data's, printed at both ends of the bar."""
    from ui import plots

    z = [[0.0002, 0.005], [0.003, None]] * 15  # 30 layers
    fig = plots.score_heatmap(z, ["mlp", "k"], list(range(30)), "t", "kind")
    assert fig.layout.height == 28 * 30 + 90
    hm = fig.data[0]
    assert (hm.zmin, hm.zmax) == (0.0002, 0.005) and list(hm.colorbar.ticktext) == ["0.0002", "0.005"]
    # a sequential scale: luminance rises from the minimum to the maximum (no diverging midpoint)
    from plotly.colors import hex_to_rgb, unlabel_rgb

    def luminance(c):
        r, g, b = hex_to_rgb(c) if c.startswith("#") else unlabel_rgb(c)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    lum = [luminance(c) for _, c in hm.colorscale]
    assert len(lum) >= 3 and all(a < b for a, b in zip(lum, lum[1:])), lum


def test_absorption_marks_tau_in_the_legend_not_on_the_bars():
    """τ is a dotted trace on the half-ulp axis named in the legend (no annotation text that could
    sit on the bars), spanning the binades shown; the half-ulp axis spans them and τ."""
    from ui.plots import absorption

    rows = [{"exponent": e, "abs_base_low": 2.0 ** (e - 127), "bf16_half_ulp": 2.0 ** (e - 135), "numel": 10,
             "unchanged": 4, "unchanged_fraction": 0.4} for e in (110, 118, 122)]
    fig = absorption(rows, 1e-5)
    assert not fig.layout.annotations
    tau = next(t for t in fig.data if t.name == "τ = 1e-5")
    assert list(tau.y) == [1e-5, 1e-5] and tau.yaxis == "y2"
    assert list(tau.x) == [2.0 ** -17, 2.0 ** -5]
    lo, hi = fig.layout.yaxis2.range
    assert lo <= math.log10(2.0 ** -25) and hi >= math.log10(2.0 ** -13)


def test_names_and_labels_are_shown_as_text_not_html():
    """A run or token named like HTML (a crafted directory name) is drawn as written: plotly renders
    <a href>, <b> ... in titles, legend names and category labels, so &, < and > become entities."""
    from ui import plots

    evil = '<a href="javascript:alert(1)">x</a> & <b>y</b>'
    fig = plots.training_curves({evil: [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]}, "loss", evil)
    assert fig.layout.title.text == '&lt;a href="javascript:alert(1)"&gt;x&lt;/a&gt; &amp; &lt;b&gt;y&lt;/b&gt;'
    name = fig.data[0].name
    assert "<" not in name and ">" not in name and name.startswith("&lt;a href=")
    fig = plots.token_scores(["<s>", "1", "+"], {"ig": [0.1, 0.2, 0.3]}, "t")
    assert list(fig.data[0].x) == ["0:&lt;s&gt;", "1:1", "2:+"]
    assert plots.plain_text("plain/run-1 (from base)") == "plain/run-1 (from base)"  # ordinary names unchanged


def test_hover_texts_show_a_crafted_name_as_text():
    """Run names in hovertemplates are escaped too: HTML as entities, % so that a name like
    ``%{x}`` is no placeholder."""
    from ui import plots

    fig = plots.training_curves({"<b>x</b> %{y}": [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]}, "loss")
    assert fig.data[0].hovertemplate == "step %{x}: %{y:.4g}<extra>&lt;b&gt;x&lt;/b&gt; &#37;{y}</extra>"


def test_one_titled_colour_scale_per_quantity_on_every_heatmap():
    """Every heatmap's colour bar has a title in words and lies under the plot; a quantity has one
    scale wherever it is drawn (update sparsity 0–100% Viridis on the layer × kind, head and
    trajectory maps; relevance symmetric about 0)."""
    rows = [{"layer": L, "kind": k, "update_sparsity": 0.25 * L} for L in range(3) for k in ("q", "up")]
    units = [{"component": "q", "layer": L, "unit": "head", "numel": 4, "changed": [0, 1, 4]} for L in range(2)]
    traj = {"checkpoints": [{"step": 1}, {"step": 2}], "layers": [{"layer": 0, "update_sparsity": [0.5, 0.4]}]}
    figs = {"kind": plots.layer_kind_heatmap(rows), "unit": plots.unit_heatmap(units, "q", "heads"),
            "trajectory": plots.trajectory_layers(traj)}
    for name, fig in figs.items():
        h = fig.data[0]
        viridis = plots.go.Heatmap(colorscale="Viridis").colorscale[0][1]
        assert (h.colorscale[0][1], h.zmin, h.zmax) == (viridis, 0, 1), name
        assert h.colorbar.title.text == "unchanged" and h.colorbar.tickformat == ".0%", name
        assert h.colorbar.orientation == "h", name
    rel = plots.relevance_heatmap([[0.5, -2.0], [1.0, 0.0]], ["a", "b"], [0, 1], "t", "head").data[0]
    assert (rel.zmin, rel.zmax, rel.colorbar.title.text) == (-2.0, 2.0, "relevance")
    score = plots.score_heatmap([[1.0, 3.0]], ["q", "k"], [0], "t", "kind").data[0]
    assert (score.zmin, score.zmax, score.colorbar.title.text) == (1.0, 3.0, "score")


def test_tau_labels_sit_beside_their_own_lines():
    """The paper's τ and the chosen τ are labelled on opposite sides, each away from the other line."""
    sweeps = {"a": [{"tolerance": t, "update_sparsity": 0.5} for t in (1e-6, 1e-5, 1e-4)]}
    for tol, paper_side, chosen_side in ((1e-4, "left", "right"), (1e-6, "right", "left")):
        notes = {a.text: a for a in plots.sparsity_sweep(sweeps, tol=tol).layout.annotations}
        paper = next(a for t, a in notes.items() if t.startswith("paper"))
        chosen = next(a for t, a in notes.items() if not t.startswith("paper"))
        assert paper.xanchor == ("right" if paper_side == "left" else "left"), tol
        assert chosen.xanchor == ("right" if chosen_side == "left" else "left"), tol
