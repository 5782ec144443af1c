"""Subnetscope's backend: parameter importance and update sparsity of transformer checkpoints.

Usable from Python, from the CLI (``python -m analysis``) and from the Streamlit app; it never
imports streamlit.
"""

__version__ = "0.1.0"
