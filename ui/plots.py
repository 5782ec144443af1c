"""Pure figure builders: summaries / DataFrames -> plotly Figures. No streamlit here."""

from __future__ import annotations

import math

import plotly.graph_objects as go

from analysis.definitions import PAPER_TOL
from ui.text import fmt_tau


LEGEND_CHARS = 40  # longer trace names are cut in the legend (the hover keeps the whole name)


def plain_text(s: str | None) -> str | None:
    """``s`` shown as text by plotly, which renders a subset of HTML in titles, names and category
    labels (``<a href>`` becomes a live link, ``<b>`` bold): ``&``, ``<`` and ``>`` as entities, so a
    run or token named ``<a href=...>`` is shown as written."""
    if s is None:
        return None
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _hover(s: str) -> str:
    """``s`` inside a hovertemplate: shown as text (:func:`plain_text`), with ``%`` as an entity so
    that plotly reads no ``%{...}`` placeholder in it (a run named ``%{x}`` shows as written)."""
    return plain_text(str(s)).replace("%", "&#37;")


def _layout(fig: go.Figure, title: str, x: str, y: str, subtitle: str | None = None) -> go.Figure:
    """Title (and a subtitle for the details a long title would cut), axis titles, margins; 320 px
    high unless the figure already chose its height (a heatmap that grows with its layers keeps
    its own); the legend below the plot, horizontal, names cut to LEGEND_CHARS, so long run names
    never squeeze the plot area."""
    sub = dict(text=plain_text(subtitle)) if subtitle else None
    fig.update_layout(title=dict(text=plain_text(title), subtitle=sub),
                      xaxis_title=plain_text(x), yaxis_title=plain_text(y),
                      margin=dict(l=10, r=10, t=60 if subtitle else 40, b=10),
                      height=fig.layout.height or 320, bargap=0.15)
    if fig.layout.legend.orientation is None:
        fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.22, x=0, xanchor="left"))
    for tr in fig.data:
        if tr.name and len(tr.name) > LEGEND_CHARS:
            tr.name = tr.name[:LEGEND_CHARS - 1] + "…"
        if tr.name:
            tr.name = plain_text(tr.name)
        for axis in ("x", "y"):  # category labels (run names, tokens) are shown as text too
            values = getattr(tr, axis, None)
            if values is not None and len(values) and all(isinstance(v, str) for v in values):
                tr[axis] = [plain_text(v) for v in values]
        if tr.type == "heatmap":  # the colour bar lies under the plot, titled: see SCALES
            tr.update(colorbar=dict(orientation="h", yref="container", y=0, yanchor="bottom", x=0.5,
                                    xanchor="center", len=0.6, thickness=10))
    return fig


# One colour scale per quantity, on every page: (colour-bar title, colorscale, fixed range or None for
# the data's own range, tick format). The bar lies under the heatmap, horizontal, with its title to the
# right: these maps sit two to a row, and a titled bar beside one took its plot area below 70% of the
# column.
SCALES = {
    "unchanged": ("unchanged", "Viridis", (0, 1), ".0%"),
    "overlap": ("overlap", "Blues", (0, 1), ".0%"),
    "score": ("score", "Viridis", None, None),
    "relevance": ("relevance", "RdBu", "symmetric", None),
    "recovered": ("recovered", "Viridis", None, ".0%"),
}


def _scale(quantity: str, z=None, title: str | None = None) -> dict:
    """A heatmap's colour arguments for ``quantity`` (a key of :data:`SCALES`): its colorscale, its
    range (fixed, the data's own, or symmetric about 0) and its titled colour bar."""
    name, colorscale, rng, fmt = SCALES[quantity]
    out: dict = {"colorscale": colorscale}
    bar: dict = {"title": dict(text=title or name, side="right")}
    if rng == "symmetric":
        m = max((abs(v) for row in z for v in row if v is not None), default=0.0) or 1.0
        out.update(zmin=-m, zmax=m, reversescale=True)
    elif rng is None:
        data = _range_bar(z)
        bar.update(data.pop("colorbar", {}))
        out.update(data)
    else:
        out.update(zmin=rng[0], zmax=rng[1])
    if fmt:
        bar["tickformat"] = fmt
    out["colorbar"] = bar
    return out


def _range_bar(values) -> dict:
    """A sequential heatmap's range: exactly the data's finite min and max, printed at the colour
    bar's two ends (a reader sees the range, and no value maps outside the scale)."""
    import math

    flat = [v for row in values for v in (row if isinstance(row, (list, tuple)) else [row])
            if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]
    if not flat:
        return {}
    lo, hi = min(flat), max(flat)
    if lo == hi:
        return {"zmin": lo, "zmax": hi}
    return {"zmin": lo, "zmax": hi, "colorbar": dict(tickvals=[lo, hi], ticktext=[_short(lo), _short(hi)])}


def _short(v: float) -> str:
    """A colour bar's end label: 3 significant digits, the exponent without padding (1.23e-6), so
    the bar stays narrow beside a heatmap in a half-width column."""
    return f"{v:.3g}".replace("e-0", "e-").replace("e+0", "e+")


def params_by_kind(summaries: dict[str, dict]) -> go.Figure:
    """Grouped bars: parameter count per module kind, one trace per checkpoint.

    Args:
        summaries (dict): label -> ``analysis.checkpoints.summarize`` output.
    """
    fig = go.Figure()
    for label, s in summaries.items():
        kinds = list(s["params_by_kind"])
        fig.add_bar(name=label, x=kinds, y=[s["params_by_kind"][k] for k in kinds],
                    hovertemplate="%{x}: %{y:,} params<extra>" + _hover(label) + "</extra>")
    return _layout(fig, "Parameters by module kind", "module kind", "parameters")


def params_by_layer(summary: dict, label: str = "") -> go.Figure:
    """Stacked bars: parameters per transformer block, split by module kind."""
    rows = [t for t in summary["tensors"] if t["layer"] is not None]
    layers = sorted({t["layer"] for t in rows})
    kinds = [k for k in summary["params_by_kind"] if any(t["kind"] == k for t in rows)]
    fig = go.Figure()
    for k in kinds:
        per = {L: 0 for L in layers}
        for t in rows:
            if t["kind"] == k:
                per[t["layer"]] += t["numel"]
        fig.add_bar(name=k, x=layers, y=[per[L] for L in layers],
                    hovertemplate="layer %{x} " + _hover(k) + ": %{y:,}<extra></extra>")
    fig.update_layout(barmode="stack")
    return _layout(fig, f"Parameters by layer{' — ' + label if label else ''}", "layer", "parameters")


# ---------------------------------------------------------------------------- update sparsity


def sparsity_sweep(sweeps: dict[str, list[dict]], tol: float | None = None) -> go.Figure:
    """Update sparsity against tolerance (log x), one line per fine-tune, the paper's τ marked.

    Args:
        sweeps (dict): label -> [{tolerance, update_sparsity}]. A log axis has no 0, so the
            τ = 0 row (exact equality) is drawn as a diamond one decade left of the smallest
            positive τ, on a tick labelled "0", apart from the line (a gap, and a dotted break in
            the axis): its first point, then None, then the positive tolerances.
        tol (float, optional): the tolerance chosen on the page, marked too.
    """
    fig = go.Figure()
    positive = [r["tolerance"] for rows in sweeps.values() for r in rows if r["tolerance"] > 0]
    x0 = min(positive, default=PAPER_TOL) / 10  # where τ = 0 is drawn
    has_zero = False
    for label, rows in sweeps.items():
        pos = [r for r in rows if r["tolerance"] > 0]
        x, y = [r["tolerance"] for r in pos], [r["update_sparsity"] for r in pos]
        text, size = [f"τ={fmt_tau(t)}" for t in x], [0] * len(x)
        zero = next((r for r in rows if r["tolerance"] == 0), None)
        if zero is not None:
            has_zero = True
            x, y = [x0, None, *x], [zero["update_sparsity"], None, *y]
            text, size = ["τ = 0 (bit-identical or |Δ| = 0)", "", *text], [10, 0, *size]
        fig.add_scatter(x=x, y=y, text=text, mode="lines+markers", name=label, connectgaps=False,
                        marker=dict(size=size, symbol="diamond"),
                        hovertemplate="%{text}: %{y:.2%}<extra>" + _hover(label) + "</extra>")
    # each label beside its own line, at the top, on the side away from the other line (two labels
    # on one side of close lines used to stack far from both)
    chosen = tol if tol and tol != PAPER_TOL else None
    paper_side = "right" if chosen is not None and chosen < PAPER_TOL else "left"
    fig.add_vline(x=PAPER_TOL, line_dash="dash", line_color="gray",
                  annotation_text=f"paper τ = {fmt_tau(PAPER_TOL)}", annotation_position=f"top {paper_side}")
    if chosen is not None:
        fig.add_vline(x=chosen, line_dash="dot", line_color="firebrick", annotation_text=f"τ = {fmt_tau(chosen)}",
                      annotation_position="top " + ("left" if paper_side == "right" else "right"))
    fig.update_xaxes(type="log", exponentformat="power")
    if has_zero:  # the τ = 0 tick, then decades
        lo = math.floor(math.log10(x0 * 10))
        hi = math.ceil(math.log10(max(positive, default=1.0)))
        ticks = [10.0 ** k for k in range(lo, hi + 1, max(1, math.ceil((hi - lo) / 6)))]
        fig.update_xaxes(tickvals=[x0, *ticks], ticktext=["0", *(f"1e{round(math.log10(t))}" for t in ticks)])
        fig.add_vline(x=x0 * 10 ** 0.5, line_dash="dot", line_color="lightgray")  # the break in the axis
    fig.update_yaxes(tickformat=".0%", range=[0, 1.02])
    return _layout(fig, "Update sparsity vs tolerance", "tolerance τ", "unchanged elements")


def layer_kind_heatmap(rows: list[dict], value: str = "update_sparsity") -> go.Figure:
    """Layer × module-kind heatmap from ``DiffResult.by_layer_kind()`` rows (layer not None)."""
    from analysis.checkpoints.structure import KINDS

    rows = [r for r in rows if r["layer"] is not None]
    layers = sorted({r["layer"] for r in rows})
    kinds = [k for k in KINDS if any(r["kind"] == k for r in rows)]
    z = [[None] * len(kinds) for _ in layers]
    for r in rows:
        z[layers.index(r["layer"])][kinds.index(r["kind"])] = r[value]
    fig = go.Figure(go.Heatmap(z=z, x=kinds, y=layers, **_scale("unchanged"),
                               hovertemplate="layer %{y} %{x}: %{z:.2%}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", dtick=1)
    fig.update_layout(height=max(260, 28 * len(layers) + 90))
    return _layout(fig, "Update sparsity by layer and module kind", "module kind", "layer")


def unit_heatmap(units: list[dict], component: str, title: str) -> go.Figure:
    """Layer × unit (head or channel) heatmap of update sparsity for one component."""
    rows = sorted((u for u in units if u["component"] == component), key=lambda u: u["layer"])
    z = [[1 - c / u["numel"] for c in u["changed"]] for u in rows]
    fig = go.Figure(go.Heatmap(z=z, y=[u["layer"] for u in rows], **_scale("unchanged"),
                               hovertemplate="layer %{y} unit %{x}: %{z:.2%}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", dtick=1)
    fig.update_layout(height=max(260, 28 * len(rows) + 90))
    unit = rows[0]["unit"].replace("_", " ") if rows else "unit"
    return _layout(fig, title, unit, "layer")


def delta_histogram(h: dict) -> go.Figure:
    """|Δ| over the log grid (bars at upper bin edges), with bit-identical / zero / non-finite
    counts in the title."""
    edges, counts = h["edges"], h["counts"]
    x = [f"≤{e:.0e}" for e in edges] + [">1"]
    fig = go.Figure(go.Bar(x=x, y=counts, marker_color="#2b8cbe",
                           hovertemplate="|Δ| %{x}: %{y:,}<extra></extra>"))
    fig.update_yaxes(type="log")
    return _layout(fig, "|Δ| of the elements whose bits changed", "|θ¹ − θ⁰| bin (upper edge)", "elements",
                   subtitle=f"bit-identical {h['identical']:,} · ±0 {h['zero']:,} · non-finite {h['nonfinite']:,}")


def absorption(rows: list[dict], tol: float) -> go.Figure:
    """Fraction unchanged per |θ⁰| binade, with the bf16 half-ulp of each binade on a second
    axis and τ marked: where half an ulp exceeds the typical update, bf16 absorbs it."""
    rows = [r for r in rows if r["abs_base_low"] > 0]
    x = [r["abs_base_low"] for r in rows]
    fig = go.Figure()
    fig.add_bar(x=x, y=[r["unchanged_fraction"] for r in rows], name="unchanged fraction",
                customdata=[[r["numel"], r["unchanged"]] for r in rows],
                hovertemplate="|θ⁰| ≥ %{x:.1e}: %{y:.1%} unchanged (%{customdata[1]:,} of %{customdata[0]:,})"
                              "<extra></extra>")
    fig.add_scatter(x=x, y=[r["bf16_half_ulp"] for r in rows], yaxis="y2", mode="lines+markers",
                    name="bf16 half-ulp", line=dict(color="firebrick"))
    if tol > 0 and x:  # τ as a dotted line named in the legend: no label text on the bars
        fig.add_scatter(x=[min(x), max(x)], y=[tol, tol], yaxis="y2", mode="lines", name=f"τ = {fmt_tau(tol)}",
                        line=dict(color="firebrick", dash="dot"), hoverinfo="skip")
    ulps = [r["bf16_half_ulp"] for r in rows] + ([tol] if tol > 0 else [])
    # the right axis is named by its red line's legend entry and red tick labels: a title there took
    # the plot area below 70% of a half-width column
    y2 = dict(type="log", overlaying="y", side="right", exponentformat="power", tickfont=dict(color="firebrick"))
    if ulps:  # the axis spans the binades shown (and τ), a decade of room either side
        import math

        y2["range"] = [math.floor(math.log10(min(ulps))) - 1, math.ceil(math.log10(max(ulps))) + 1]
        y2["dtick"] = max(1, math.ceil((y2["range"][1] - y2["range"][0]) / 5))  # whole decades: 10⁻⁴, not 4×10⁻⁴
    fig.update_layout(xaxis=dict(type="log", exponentformat="power"), yaxis=dict(tickformat=".0%", range=[0, 1.02]),
                      yaxis2=y2, legend=dict(orientation="h", y=-0.25))
    return _layout(fig, "Unchanged elements by |θ⁰| (bf16 absorption)", "|θ⁰| (binade lower edge)", "unchanged")


# ---------------------------------------------------------------------------- overlap

def _f2(x) -> str:
    """Two decimals, or "undefined" for a ratio that is None (e.g. o1 of a run that changed nothing)."""
    return "undefined" if x is None else f"{x:.2f}"


def overlap_matrix(pairs: list[dict], labels: list[str], field: str = "o1") -> go.Figure:
    """N × N matrix: cell (a, b) = |I_a ∩ I_b| / |I_a| (o1 above the diagonal, o2 below), the
    text showing the measured value over its random and magnitude-matched baselines."""
    N = len(labels)
    z = [[1.0 if i == j else None for j in range(N)] for i in range(N)]
    text = [["" for _ in range(N)] for _ in range(N)]
    for p in pairs:
        a, b = p["a"], p["b"]
        z[a][b] = p["o1"]
        z[b][a] = p["o2"]
        text[a][b] = f"{_f2(p['o1'])}<br>rand {_f2(p['o1_random'])}<br>matched {_f2(p['o1_matched'])}"
        text[b][a] = f"{_f2(p['o2'])}<br>rand {_f2(p['o2_random'])}<br>matched {_f2(p['o2_matched'])}"
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=labels, text=text, texttemplate="%{text}",
                               **_scale("overlap", title=field),
                               hovertemplate="%{y} ∩ %{x} / |%{y}|: %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(height=120 * N + 120)
    return _layout(fig, "Overlap |I_row ∩ I_col| / |I_row| (o1 / o2) vs chance", "run", "run")


def overlap_by_layer(layers: list[dict], pair_index: int) -> go.Figure:
    """o1 per layer for one pair, with the random and magnitude-matched baselines."""
    xs = [L["layer"] for L in layers]
    ps = [L["pairs"][pair_index] for L in layers]
    fig = go.Figure()
    for key, name, dash in (("o1", "o1 measured", None), ("o1_matched", "magnitude-matched", "dash"),
                            ("o1_random", "random (paper)", "dot")):
        fig.add_scatter(x=xs, y=[p[key] for p in ps], mode="lines+markers", name=name, line=dict(dash=dash))
    fig.update_yaxes(range=[0, 1.02])
    return _layout(fig, "Overlap o1 by layer", "layer", "o1")


def vectors_by_layer(pair: dict) -> go.Figure:
    """One pair of runs as update vectors, per layer: the cosine of Δ_a and Δ_b and the sign agreement on
    the elements both changed, against its chance value 0.5 (docs/design.md §16)."""
    rows = pair.get("by_layer") or []
    xs = [r["layer"] for r in rows]
    fig = go.Figure()
    fig.add_scatter(x=xs, y=[r["cosine"] for r in rows], mode="lines+markers", name="cosine of the updates")
    fig.add_scatter(x=xs, y=[r["sign_agreement"] for r in rows], mode="lines+markers", name="sign agreement")
    fig.add_scatter(x=xs, y=[0.5] * len(xs), mode="lines", name="sign agreement by chance", line=dict(dash="dot"))
    fig.update_yaxes(range=[-1.02, 1.02])
    return _layout(fig, "Runs as vectors by layer", "layer", "cosine / agreement")


def consensus_bar(consensus: list[int]) -> go.Figure:
    """Elements changed by exactly k of the N runs."""
    fig = go.Figure(go.Bar(x=list(range(len(consensus))), y=consensus, marker_color="#756bb1",
                           hovertemplate="%{y:,} elements changed by exactly %{x} runs<extra></extra>"))
    fig.update_xaxes(dtick=1)  # a linear axis: the counts are compared with each other
    return _layout(fig, "Consensus: elements changed by exactly k runs", "k runs", "elements")


# ---------------------------------------------------------------------------- importance

def score_heatmap(z, x, y, title: str, xtitle: str, ytitle: str = "layer") -> go.Figure:
    """A plain heatmap of scores (auto range), layers down the y axis."""
    z = [[None if v is None else float(v) for v in row] for row in z]
    fig = go.Figure(go.Heatmap(z=z, x=x, y=y, **_scale("score", z),
                               hovertemplate=_hover(ytitle) + " %{y} " + _hover(xtitle)
                               + " %{x}: %{z:.4g}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", dtick=1)
    fig.update_layout(height=max(260, 28 * len(y) + 90))
    return _layout(fig, title, xtitle, ytitle)


def score_histogram(values, title: str, log_y: bool = True) -> go.Figure:
    """Distribution of (a sample of) element scores."""
    fig = go.Figure(go.Histogram(x=list(values), nbinsx=80, marker_color="#e6550d"))
    if log_y:
        fig.update_yaxes(type="log")
    return _layout(fig, title, "score", "elements")


def roc_curves(curves: dict[str, dict]) -> go.Figure:
    """ROC curves {label: {"fpr": [...], "tpr": [...], "auroc": float}} with the chance diagonal."""
    fig = go.Figure()
    for label, c in curves.items():
        auc = "undefined" if c["auroc"] is None else f"{c['auroc']:.3f}"
        fig.add_scatter(x=c["fpr"], y=c["tpr"], mode="lines", name=f"{label} (AUROC {auc})")
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="gray"), name="chance")
    fig.update_xaxes(range=[0, 1])
    fig.update_yaxes(range=[0, 1])
    fig.update_layout(height=380)
    return _layout(fig, "Does it predict the update? ROC against the changed elements", "false positive rate",
                   "true positive rate")


def selector_bars(rows: list[dict]) -> go.Figure:
    """AUROC and precision@k per selector (rows: {selector, auroc, precision_at_k, base_rate})."""
    rows = sorted(rows, key=lambda r: -(r["auroc"] or 0))
    names = [r["selector"] for r in rows]
    fig = go.Figure()
    fig.add_bar(x=names, y=[r["auroc"] for r in rows], name="AUROC")
    fig.add_bar(x=names, y=[r["precision_at_k"] for r in rows], name="precision@k")
    if rows:
        fig.add_hline(y=0.5, line_dash="dot", line_color="gray", annotation_text="AUROC chance")
        fig.add_hline(y=rows[0]["base_rate"], line_dash="dash", line_color="firebrick",
                      annotation_text="precision@k chance", annotation_position="bottom right")
    fig.update_layout(barmode="group")
    fig.update_yaxes(range=[0, 1])
    return _layout(fig, "Which selector predicts the fine-tune's changed elements?", "selector", "")


def training_curves(curves: dict[str, list[dict]], y: str = "loss", title: str | None = None,
                    smooth: int = 1) -> go.Figure:
    """Lines of one metric against the step, one trace per run (points only where the metric was
    recorded, e.g. evaluations).

    Args:
        curves (dict): run label -> metric rows (``metrics.jsonl``).
        y (str): the metric. Default: ``loss``.
        smooth (int): trailing moving-average window (1: raw). Default: 1.
    """
    fig = go.Figure()
    for label, rows in curves.items():
        pts = [(r["step"], r[y]) for r in rows if r.get(y) is not None]
        if not pts:
            continue
        xs, ys = zip(*pts)
        if smooth > 1:
            ys = [sum(ys[max(0, i - smooth + 1):i + 1]) / len(ys[max(0, i - smooth + 1):i + 1]) for i in range(len(ys))]
        fig.add_scatter(x=list(xs), y=list(ys), name=label, mode="lines+markers" if len(xs) < 30 else "lines",
                        hovertemplate="step %{x}: %{y:.4g}<extra>" + _hover(label) + "</extra>")
    return _layout(fig, title or y, "step", y)


def interval_bars(rows: list[dict], value: str, title: str) -> go.Figure:
    """Horizontal points with 95% intervals, one per run (e.g. the sampled reward of each run).

    Args:
        rows (list[dict]): ``{"label", value, value + "_ci": [lo, hi]}``.
    """
    rows = [r for r in rows if r.get(value) is not None and r.get(value + "_ci")]
    cut = 22  # run names on the y axis: short, so a chart in half the page keeps its plot area
    short = [r["label"] if len(r["label"]) <= cut else r["label"][:cut - 1] + "…" for r in rows]
    fig = go.Figure()
    fig.add_scatter(x=[r[value] for r in rows], y=short, mode="markers",
                    error_x=dict(type="data", symmetric=False, array=[r[value + "_ci"][1] - r[value] for r in rows],
                                 arrayminus=[r[value] - r[value + "_ci"][0] for r in rows]),
                    hovertemplate="%{y}: %{x:.4f}<extra></extra>")
    if value.endswith("_gap"):
        fig.add_vline(x=0, line_dash="dot", line_color="gray")  # no difference from the reference
    return _layout(fig, title, value, "")


# ---------------------------------------------------------------------------- attribution

def token_label(tokens: list[str]) -> list[str]:
    """Tokens as axis labels: position-prefixed (repeated tokens stay distinct), whitespace visible."""
    return [f"{i}:{t.replace(chr(10), '⏎').replace(' ', '␣')}" for i, t in enumerate(tokens)]


def token_scores(tokens: list[str], scores: dict[str, list[float]], title: str) -> go.Figure:
    """Relevance per prompt token, one bar group per label (a checkpoint, or a difference)."""
    x = token_label(tokens)
    fig = go.Figure()
    for label, s in scores.items():
        fig.add_bar(x=x, y=s, name=label)
    fig.update_layout(barmode="group")
    fig.add_hline(y=0, line_color="gray", line_width=1)
    return _layout(fig, title, "prompt token", "relevance")


def layer_relevance(layers: dict[str, list[float]], title: str) -> go.Figure:
    """Relevance of the residual stream after each block, one line per label."""
    fig = go.Figure()
    for label, v in layers.items():
        fig.add_scatter(x=list(range(len(v))), y=v, mode="lines+markers", name=label)
    fig.update_xaxes(dtick=1)
    return _layout(fig, title, "layer (block output)", "relevance")


def relevance_heatmap(z, x, y, title: str, xtitle: str, ytitle: str = "layer") -> go.Figure:
    """A signed heatmap centred on 0 (red positive, blue negative), layers down the y axis."""
    fig = go.Figure(go.Heatmap(z=z, x=x, y=y, **_scale("relevance", z),
                               hovertemplate=_hover(ytitle) + " %{y} " + _hover(xtitle)
                               + " %{x}: %{z:.4g}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", dtick=1)
    fig.update_layout(height=max(260, 28 * len(y) + 90))
    return _layout(fig, title, xtitle, ytitle)


def faithfulness_curves(curves: dict[str, dict]) -> go.Figure:
    """Drop of log p(target) as prompt tokens are removed: most relevant first (solid) and least
    relevant first (dotted), one colour per label; the legend gives each label's ABPC."""
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]
    fig = go.Figure()
    for i, (label, c) in enumerate(curves.items()):
        color = palette[i % len(palette)]
        k = list(range(len(c["morf"])))
        fig.add_scatter(x=k, y=c["morf"], mode="lines+markers", line=dict(color=color),
                        name=f"{label}: most relevant first (ABPC {c['abpc']:+.3g})")
        fig.add_scatter(x=k, y=c["lerf"], mode="lines", line=dict(color=color, dash="dot"),
                        name=f"{label}: least relevant first")
    fig.update_layout(height=360)
    return _layout(fig, "Faithfulness: the target's log-probability as tokens are removed", "tokens removed",
                   "drop of log p(target)")


# ---------------------------------------------------------------------------- trajectory

def trajectory_sparsity(d: dict) -> go.Figure:
    """Update sparsity against the base and against the previous checkpoint, against the step."""
    steps = [c["step"] for c in d["checkpoints"]]
    fig = go.Figure()
    fig.add_scatter(x=steps, y=[c["vs_base"]["update_sparsity"] for c in d["checkpoints"]], mode="lines+markers",
                    name="against the base")
    fig.add_scatter(x=steps, y=[c["vs_previous"]["update_sparsity"] for c in d["checkpoints"]],
                    mode="lines+markers", name="against the previous checkpoint")
    fig.update_yaxes(tickformat=".0%", range=[0, 1.02])  # a fraction: never autoranged to 200% when flat
    return _layout(fig, f"Update sparsity along the run (τ = {fmt_tau(d['tolerance'])})", "step", "unchanged")


def trajectory_sets(d: dict) -> go.Figure:
    """The changed set along the run: changed now, ever changed, first changed here, back at the base."""
    steps = [c["step"] for c in d["checkpoints"]]
    cs = d["checkpoints"]
    fig = go.Figure()
    fig.add_scatter(x=steps, y=[c["vs_base"]["changed"] for c in cs], mode="lines+markers", name="changed (vs base)")
    fig.add_scatter(x=steps, y=[c["cumulative_changed"] for c in cs], mode="lines+markers", name="ever changed")
    fig.add_bar(x=steps, y=[c["first_changed"] for c in cs], name="first changed at this step", opacity=0.6)
    fig.add_scatter(x=steps, y=[c["returned_to_base"] for c in cs], mode="lines+markers",
                    name="changed before, back at the base")
    fig.update_yaxes(rangemode="tozero")  # counts: no negative axis when every count is 0
    return _layout(fig, "The changed subnetwork grows and settles", "step", "elements")


def trajectory_overlap(d: dict) -> go.Figure:
    """o1, o2 and Jaccard of each checkpoint's changed set with the final one's."""
    steps = [c["step"] for c in d["checkpoints"]]
    fig = go.Figure()
    for key, name in (("o1", "o1 = |I_k ∩ I_final| / |I_k|"), ("o2", "o2 = |I_k ∩ I_final| / |I_final|"),
                      ("jaccard", "Jaccard")):
        fig.add_scatter(x=steps, y=[c["overlap_with_final"][key] for c in d["checkpoints"]], mode="lines+markers",
                        name=name)
    fig.update_yaxes(range=[0, 1.02])
    return _layout(fig, "How much of the final subnetwork each checkpoint already holds", "step", "")


def trajectory_layers(d: dict) -> go.Figure:
    """Layer × step heatmap of update sparsity against the base."""
    steps = [str(c["step"]) for c in d["checkpoints"]]
    rows = d["layers"]
    fig = go.Figure(go.Heatmap(z=[r["update_sparsity"] for r in rows], x=steps, y=[r["layer"] for r in rows],
                               **_scale("unchanged"),
                               hovertemplate="layer %{y} step %{x}: %{z:.2%} unchanged<extra></extra>"))
    fig.update_yaxes(autorange="reversed", dtick=1)
    fig.update_xaxes(type="category")
    fig.update_layout(height=max(260, 28 * len(rows) + 90))
    return _layout(fig, "Update sparsity per layer along the run", "step", "layer")


# ------------------------------------------------------------------ geometry of an update

GEOMETRY_FIELDS = {  # field -> (title, format)
    "spectral_drift": ("Spectral drift ‖σ(W₁) − σ(W₀)‖ / ‖σ(W₀)‖", ".2e"),
    "top_k_drift": ("Top-k spectral drift", ".2e"),
    "angle_u_mean": ("Rotation of the principal left subspace (mean angle, °)", ".2f"),
    "angle_v_mean": ("Rotation of the principal right subspace (mean angle, °)", ".2f"),
    "alignment_ratio": ("Update in the principal subspace ÷ random (1 = chance)", ".2f"),
    "principal_o1": ("Changed set ∩ principal weights, o1", ".3f"),
}


GEOMETRY_BARS = {"spectral_drift": "drift", "top_k_drift": "drift", "angle_u_mean": "angle (°)",
                 "angle_v_mean": "angle (°)", "alignment_ratio": "÷ random", "principal_o1": "o1"}


def geometry_heatmap(d: dict, field: str, title: str | None = None) -> go.Figure:
    """Layer × kind heatmap of one geometry quantity (``alignment_ratio`` = alignment ÷ its random
    value); a sequential scale from the smallest to the largest value, no wrap."""
    kinds = [k for k in ("q", "k", "v", "qkv", "o", "gate", "up", "down")
             if any(t["kind"] == k for t in d["tensors"])]
    layers = sorted({t["layer"] for t in d["tensors"]})
    z = [[None] * len(kinds) for _ in layers]
    for t in d["tensors"]:
        if field == "alignment_ratio":
            v = None if t["alignment"] is None else t["alignment"] / t["alignment_random"]
        else:
            v = t[field]
        z[layers.index(t["layer"])][kinds.index(t["kind"])] = v
    name, fmt = GEOMETRY_FIELDS.get(field, (field, ".3g"))
    fig = go.Figure(go.Heatmap(z=z, x=kinds, y=layers, **_scale("score", z, title=GEOMETRY_BARS.get(field)),
                               hovertemplate=f"layer %{{y}} %{{x}}: %{{z:{fmt}}}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", dtick=1 if len(layers) <= 32 else None)
    return _layout(fig, title or name, "kind", "layer").update_layout(height=max(280, 18 * len(layers) + 150))


def geometry_alpha(runs: dict[str, dict]) -> go.Figure:
    """Heavy-tail exponent α per layer (mean over its matrices): each distinct base once (dotted),
    each tuned run."""
    fig = go.Figure()
    bases = set()
    for label, d in runs.items():
        layers = [r["layer"] for r in d["layers"]]
        if d["base"] not in bases:
            bases.add(d["base"])
            fig.add_scatter(x=layers, y=[r["alpha_base"] for r in d["layers"]], mode="lines+markers",
                            name="base " + "/".join(str(d["base"]).rstrip("/").split("/")[-2:]),
                            line=dict(dash="dot"))
        fig.add_scatter(x=layers, y=[r["alpha_tuned"] for r in d["layers"]], mode="lines+markers", name=label)
    return _layout(fig, "Heavy-tail exponent α of the eigenvalue spectrum (WeightWatcher's fit)", "layer",
                   "α").update_layout(height=360, legend=dict(orientation="h", y=-0.3))


def geometry_spectra(sigma_base: list[float], sigma_tuned: list[float], name: str) -> go.Figure:
    """Both singular value spectra of one matrix, log scale."""
    fig = go.Figure()
    idx = list(range(1, len(sigma_base) + 1))
    fig.add_scatter(x=idx, y=sigma_base, mode="lines", name="base")
    fig.add_scatter(x=idx, y=sigma_tuned, mode="lines", name="tuned", line=dict(dash="dash"))
    fig.update_yaxes(type="log")
    return _layout(fig, f"Singular values of {name}", "index i", "σᵢ").update_layout(
        legend=dict(orientation="h", y=-0.3))


def geometry_angles(angles_u: list[float], angles_v: list[float]) -> go.Figure:
    """Principal angles between the base's and the tuned's top-k subspaces, left and right."""
    fig = go.Figure()
    fig.add_bar(x=list(range(1, len(angles_u) + 1)), y=angles_u, name="U (left)")
    fig.add_bar(x=list(range(1, len(angles_v) + 1)), y=angles_v, name="V (right)")
    return _layout(fig, "Principal angles between the top-k subspaces", "angle index", "degrees").update_layout(
        barmode="group", legend=dict(orientation="h", y=-0.3))


# ---------------------------------------------------------------------------- behaviour

def kl_distribution(means: list[float]) -> go.Figure:
    """Histogram of the per-prompt mean KL(tuned ‖ base)."""
    fig = go.Figure(go.Histogram(x=means, nbinsx=40, marker_color="#3182bd",
                                 hovertemplate="mean KL %{x}: %{y} prompts<extra></extra>"))
    return _layout(fig, "Mean KL(tune ‖ base) per prompt", "mean KL per token (nats)", "prompts")


def recovered_bars(rows: list[dict], title: str) -> go.Figure:
    """Recovered gain of each patch of a layers or kinds sweep: the part alone and all but it."""
    fig = go.Figure()
    for group, colour in (("alone", "#3182bd"), ("all but", "#bdbdbd")):
        part = [r for r in rows if r.get("group") == group]
        if not part:
            continue
        x = [str(r.get("layer", r.get("kind"))) for r in part]
        y = [r["recovered"] for r in part]
        fig.add_bar(x=x, y=y, name=("the part alone" if group == "alone" else "all but the part"),
                    marker_color=colour, hovertemplate="%{x}: %{y:.1%} recovered<extra></extra>")
    fig.add_hline(y=1, line_dash="dot", line_color="gray", annotation_text="the tune", annotation_position="top left")
    fig.update_yaxes(tickformat=".0%")
    fig.update_xaxes(type="category")
    return _layout(fig, title, "layer" if rows and "layer" in rows[0] else "module kind", "recovered gain")


def recovered_curve(rows: list[dict], x: str, title: str, xtitle: str) -> go.Figure:
    """Recovered gain against rank, α or density, one line per group (a selector and random)."""
    fig = go.Figure()
    for group in dict.fromkeys(r["group"] for r in rows):
        part = [r for r in rows if r["group"] == group]
        xs = [r.get(x) for r in part]
        if x == "rank":  # full rank drawn one step right of the largest k
            top = max((v for v in xs if v is not None), default=1)
            xs = [2 * top if v is None else v for v in xs]
        fig.add_scatter(x=xs, y=[r["recovered"] for r in part], mode="lines+markers", name=str(group),
                        text=[r["label"] for r in part],
                        hovertemplate="%{text}: %{y:.1%} recovered<extra>" + _hover(str(group)) + "</extra>")
    fig.add_hline(y=1, line_dash="dot", line_color="gray")
    fig.update_yaxes(tickformat=".0%")
    if x == "rank":
        fig.update_xaxes(type="log", dtick=math.log10(2), tickformat="d")
    if x == "density":
        fig.update_xaxes(type="log", tickformat=".0%")
    return _layout(fig, title, xtitle, "recovered gain")


def estimated_vs_measured(agreement: dict, estimated: list[dict]) -> go.Figure:
    """Per layer: the measured recovered gain of patching it alone beside the weight-space IG's estimate
    of its share of the difference."""
    layers = agreement["layers"]
    est = {r["layer"]: r["share"] for r in estimated}
    fig = go.Figure()
    fig.add_bar(x=layers, y=agreement["measured"], name="measured: the layer patched alone", marker_color="#3182bd",
                hovertemplate="layer %{x}: %{y:.1%} recovered<extra></extra>")
    fig.add_bar(x=layers, y=[est.get(L) for L in layers], name="estimated: weight-space IG share",
                marker_color="#fd8d3c", hovertemplate="layer %{x}: %{y:.1%} of the difference<extra></extra>")
    fig.update_yaxes(tickformat=".0%")
    fig.update_xaxes(dtick=1)
    return _layout(fig, "Which layer carries the change: measured and estimated", "layer", "share of the change")


def recovered_cells(rows: list[dict]) -> go.Figure:
    """Layer × kind heatmap of the recovered gain of each cell patched alone."""
    from analysis.checkpoints.structure import KINDS

    layers = sorted({r["layer"] for r in rows})
    kinds = [k for k in KINDS if any(r["kind"] == k for r in rows)]
    z = [[None] * len(kinds) for _ in layers]
    for r in rows:
        z[layers.index(r["layer"])][kinds.index(r["kind"])] = r["recovered"]
    fig = go.Figure(go.Heatmap(z=z, x=kinds, y=layers, **_scale("recovered", z),
                               hovertemplate="layer %{y} %{x} alone: %{z:.1%} recovered<extra></extra>"))
    fig.update_yaxes(autorange="reversed", dtick=1)
    fig.update_layout(height=max(260, 28 * len(layers) + 90))
    return _layout(fig, "Recovered gain of each layer × kind patched alone", "module kind", "layer")
