"""Pure figure builders: summaries / DataFrames -> plotly Figures. No streamlit here."""

from __future__ import annotations

import plotly.graph_objects as go


def _layout(fig: go.Figure, title: str, x: str, y: str) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, margin=dict(l=10, r=10, t=40, b=10),
                      height=320, bargap=0.15)
    return fig


def params_by_kind(summaries: dict[str, dict]) -> go.Figure:
    """Grouped bars: parameter count per module kind, one trace per checkpoint.

    Args:
        summaries (dict): label -> ``analysis.checkpoints.summarize`` output.
    """
    fig = go.Figure()
    for label, s in summaries.items():
        kinds = list(s["params_by_kind"])
        fig.add_bar(name=label, x=kinds, y=[s["params_by_kind"][k] for k in kinds],
                    hovertemplate="%{x}: %{y:,} params<extra>" + label + "</extra>")
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
                    hovertemplate="layer %{x} " + k + ": %{y:,}<extra></extra>")
    fig.update_layout(barmode="stack")
    return _layout(fig, f"Parameters by layer{' — ' + label if label else ''}", "layer", "parameters")
