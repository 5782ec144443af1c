"""Benchmark: how fast the command line answers, against `python -c "import torch"`.

Every row is a fresh process, timed by wall clock, best of --repeat, the rows alternating within each
round so that the machine's load falls on all of them alike. The baseline is the import of torch
alone (a diff cannot start without it); the targets are `--help` ≤ 1 s and a diff of the demo pair
(base → sft, 185k elements) ≤ 2× the baseline.

    .venv/bin/python -m bench.startup [--repeat 5]

It runs `python -m analysis demo --if-missing` first, which also warms the caches a cold start would
fill (numba's compiled loops, the configs' architecture fields).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    from analysis.paths import default_demo_dir

    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    py = sys.executable
    subprocess.run([py, "-m", "analysis", "demo", "--if-missing"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    demo = default_demo_dir()
    out = Path(tempfile.mkdtemp()) / "diff.json"
    rows = {
        'python -c "import torch"': [py, "-c", "import torch"],
        "python -m analysis --help": [py, "-m", "analysis", "--help"],
        "python -m analysis diff demo/base demo/sft": [py, "-m", "analysis", "diff", str(demo / "base"),
                                                       str(demo / "sft"), "--json", str(out), "--quiet"],
    }
    best = {name: float("inf") for name in rows}
    for _ in range(args.repeat):
        for name, cmd in rows.items():
            best[name] = min(best[name], _wall(cmd))
    base = best['python -c "import torch"']
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; best of {args.repeat}, alternating\n")
    print("| command | wall (s) | × import torch | target |")
    print("|---|---|---|---|")
    targets = {"python -m analysis --help": "≤ 1 s", "python -m analysis diff demo/base demo/sft": "≤ 2×"}
    for name, t in best.items():
        print(f"| `{name}` | {t:.2f} | {t / base:.2f} | {targets.get(name, 'baseline')} |")


if __name__ == "__main__":
    main()
