"""Tables as a reader reads them: one number style per quantity on every page.

:func:`column_config` gives ``st.dataframe`` a config for a table's columns by what they hold:
fractions (sparsities, overlaps, Jaccards, "identical" shares, precision, base rates) as percentages
with two decimals, counts with thousands separators, other numbers with four significant digits, and
every snake_case title in words (``update_sparsity`` → "update sparsity"). The data keep their names
and values (a download or a test reads the same numbers); only what is drawn changes.
"""

from __future__ import annotations

import re

import streamlit as st

# column names (in words) that hold a fraction in [0, 1]
FRACTION = re.compile(r"(sparsity|fraction|identical|jaccard|\bo1\b|\bo2\b|precision|base rate|share|alignment"
                      r"|accuracy|selected$)", re.IGNORECASE)
COUNT = re.compile(r"(^|\b)(changed|numel|elements|matrices|skipped|trainable|selected|k|n|params|tensors|"
                   r"ever changed|first changed|back at the base|step|layer|outside mask)(\b|$)", re.IGNORECASE)


def words(name: str) -> str:
    """A column title in words: underscores as spaces (``o1_random`` → "o1 random")."""
    return str(name).replace("_", " ")


def column_config(df, percent=(), counts=(), plain=()) -> dict:
    """``st.dataframe``'s ``column_config`` for ``df`` (see the module's docstring); ``percent``,
    ``counts`` and ``plain`` name columns whose kind the name does not tell."""
    cfg = {}
    for col in df.columns:
        label = words(col)
        kind = df[col].dtype.kind
        if col in plain or kind not in "iuf":
            cfg[col] = st.column_config.Column(label) if label != col else None
        elif col in percent or (kind == "f" and FRACTION.search(label) and col not in counts):
            cfg[col] = st.column_config.NumberColumn(label, format="percent")
        elif col in counts or kind in "iu" or COUNT.search(label):
            cfg[col] = st.column_config.NumberColumn(label, format="localized")
        else:
            cfg[col] = st.column_config.NumberColumn(label, format="%.4g")
    return {k: v for k, v in cfg.items() if v is not None}


def show(where, df, **kw) -> None:
    """``where.dataframe(df)`` with :func:`column_config` and no index."""
    percent, counts, plain = kw.pop("percent", ()), kw.pop("counts", ()), kw.pop("plain", ())
    where.dataframe(df, hide_index=True, column_config=column_config(df, percent, counts, plain), **kw)
