"""Streamlit glue shared by app.py and the pages: the checkpoint picker, cached loaders and
error display. UI only: every number comes from ``analysis``."""
