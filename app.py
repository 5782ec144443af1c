"""Subnetscope: `streamlit run app.py` (the Makefile's `make run` binds it to 127.0.0.1)."""

import streamlit as st

from ui.state import sidebar

st.set_page_config(page_title="Subnetscope", page_icon=":material/biotech:", layout="wide")

pages = [
    st.Page("pages/checkpoints.py", title="Checkpoints", icon=":material/inventory_2:", default=True),
    st.Page("pages/update_sparsity.py", title="Update sparsity", icon=":material/grid_on:"),
    st.Page("pages/overlap.py", title="Overlap", icon=":material/join_inner:"),
    st.Page("pages/importance.py", title="Importance", icon=":material/leaderboard:"),
]
page = st.navigation(pages)
st.sidebar.title(":material/biotech: Subnetscope")
sidebar()
page.run()
