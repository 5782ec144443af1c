"""Checkpoints: architecture, exact parameter counts, dtypes, files, and the alignment report."""

import pandas as pd
import streamlit as st

from ui import plots
from ui.loaders import alignment, summary, try_load
from ui.state import chosen_refs, label_of, selection
from ui.text import md_escape

st.header("Checkpoints")
refs = chosen_refs("Choose a base checkpoint in the sidebar, or build the demo family: `python -m analysis demo`.")
base, tuned = selection()

summaries: dict[str, dict] = {}
for ref in refs:
    s = try_load(summary, ref)
    if s is not None:
        summaries[label_of(ref)] = s

ARCH_FIELDS = ("model_type", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
               "intermediate_size", "vocab_size", "tie_word_embeddings", "config_dtype")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


if summaries:
    overview = pd.DataFrame([
        {"checkpoint": lab, "role": "base" if s["ref"] == base else "fine-tune", "total params": s["total_params"],
         "tensors": len(s["tensors"]), "files": len(s["files"]), "size on disk": _mib(s["size_bytes"]),
         "dtypes": ", ".join(s["dtypes"]), "source": s["source"]}
        for lab, s in summaries.items()])
    st.dataframe(overview, hide_index=True, column_config={
        "total params": st.column_config.NumberColumn(format="localized")})

    st.subheader("Architecture")
    arch = pd.DataFrame({lab: [s[f] for f in ARCH_FIELDS] for lab, s in summaries.items()},
                        index=list(ARCH_FIELDS)).astype(str)
    st.dataframe(arch)

    st.plotly_chart(plots.params_by_kind(summaries), key="by_kind")
    tabs = st.tabs([md_escape(lab) for lab in summaries])
    for tab, (lab, s) in zip(tabs, summaries.items()):
        with tab:
            c1, c2, c3, c4 = st.columns(4)
            c1.metric("Total parameters", f"{s['total_params']:,}")
            c2.metric("Tensors", len(s["tensors"]))
            c3.metric("Size on disk", _mib(s["size_bytes"]))
            c4.metric("Shards", len(s["files"]))
            st.plotly_chart(plots.params_by_layer(s, lab), key=f"by_layer_{lab}")
            left, right = st.columns(2)
            left.caption("Elements per dtype")
            left.dataframe(pd.DataFrame([{"dtype": d, "elements": n} for d, n in s["dtypes"].items()]),
                           hide_index=True)
            right.caption("Files")
            right.dataframe(pd.DataFrame([{"file": f["file"], "size": _mib(f["bytes"])} for f in s["files"]]),
                            hide_index=True)
            with st.expander(f"All {len(s['tensors'])} tensors"):
                st.dataframe(pd.DataFrame(s["tensors"]), hide_index=True)

if base and tuned and label_of(base) in summaries:  # a base that failed is reported above
    st.subheader("Alignment with the base")
    for ref in tuned:
        rep = try_load(alignment, [base, ref])
        if rep is None:
            continue
        with st.container(border=True):
            st.markdown(f"**{md_escape(label_of(base))} ↔ {md_escape(label_of(ref))}**: {rep['aligned']} tensors "
                        "aligned, "
                        f"{rep['compared_params']:,} parameters compared; "
                        f"{len(rep['missing'])} missing, {len(rep['shape_mismatches'])} shape mismatches, "
                        f"{len(rep['resized'])} resized (compared on shared rows).")
            for title, rows in (("Missing", rep["missing"]), ("Shape mismatches", rep["shape_mismatches"]),
                                ("Resized vocabulary", rep["resized"])):
                if rows:
                    st.caption(title)
                    st.dataframe(pd.DataFrame(rows).astype(str), hide_index=True)
