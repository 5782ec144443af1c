"""Subnetscope: `streamlit run app.py` (the Makefile's `make run` binds it to 127.0.0.1).

The pages live in app_pages/, not pages/: with a pages/ directory Streamlit serves a server's first
visit to a page URL (e.g. a bookmark of /importance) as a legacy multipage app, skipping this file.
"""

import streamlit as st

from ui.state import sidebar

st.set_page_config(page_title="Subnetscope", page_icon=":material/biotech:", layout="wide")

pages = [
    st.Page("app_pages/checkpoints.py", title="Checkpoints", icon=":material/inventory_2:", default=True),
    st.Page("app_pages/update_sparsity.py", title="Update sparsity", icon=":material/grid_on:"),
    st.Page("app_pages/overlap.py", title="Overlap", icon=":material/join_inner:"),
    st.Page("app_pages/trajectory.py", title="Trajectory", icon=":material/timeline:"),
    st.Page("app_pages/geometry.py", title="Geometry", icon=":material/architecture:"),
    st.Page("app_pages/importance.py", title="Importance", icon=":material/leaderboard:"),
    st.Page("app_pages/attribution.py", title="Attribution", icon=":material/highlight:"),
    st.Page("app_pages/behaviour.py", title="Behaviour", icon=":material/psychology:"),
    st.Page("app_pages/finetune.py", title="Masked fine-tune", icon=":material/model_training:"),
]
# the pages across the top; the sidebar starts with the app's name, then the checkpoint picker
page = st.navigation(pages, position="top")
st.sidebar.title(":material/biotech: Subnetscope")
sidebar()
page.run()
