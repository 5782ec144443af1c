"""The corpus only grows: every area's cases are counted (ids unique across areas)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _cases():
    cases = []
    for f in sorted(Path(__file__).parent.glob("test_faults_*.py")):
        spec = importlib.util.spec_from_file_location(f"_corpus_{f.stem}", f)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        cases += mod.CASES
    return cases


def test_corpus_ids_unique_and_counted():
    cases = _cases()
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids))
    # 146 when the corpus was started (attribution 25, finetune 34, geometry 24, importance 45,
    # outputs 18; 147 with the /dev/null case): a case may be replaced, never dropped
    assert len(ids) >= 147
