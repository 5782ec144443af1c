"""One number style per quantity: fractions as percentages, counts with thousands separators,
snake_case titles in words — the data's names and values untouched."""

import pandas as pd

from ui.tables import column_config, words


def test_columns_by_what_they_hold():
    df = pd.DataFrame({"name": ["a"], "update_sparsity": [0.0087], "changed": [45440], "numel": [65536],
                       "delta_fro": [0.0123], "o1_random": [0.25], "fraction selected": [0.05],
                       "update cosine": [0.9], "accuracy gap (95%)": ["[+0.01, +0.02]"]})
    cfg = column_config(df)
    fmt = {k: (v["label"], v.get("type_config", {}).get("format")) for k, v in cfg.items()}
    assert fmt["update_sparsity"] == ("update sparsity", "percent")
    assert fmt["o1_random"] == ("o1 random", "percent") and fmt["fraction selected"][1] == "percent"
    assert fmt["changed"] == ("changed", "localized") and fmt["numel"] == ("numel", "localized")
    assert fmt["delta_fro"] == ("delta fro", "%.4g") and fmt["update cosine"][1] == "%.4g"
    assert "name" not in cfg and "accuracy gap (95%)" not in cfg  # text as it is
    assert list(df.columns)[1] == "update_sparsity" and df["update_sparsity"][0] == 0.0087
    assert words("sparsity_vs_base") == "sparsity vs base"
