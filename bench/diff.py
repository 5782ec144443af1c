"""Benchmark: our streaming diff against a raw read and against the paper's method.

Generates (once, in --dir) a bf16 Llama-architecture base of about --gib GiB with many
tensors, and two fine-tunes of it: an SFT-like one (~90% of elements changed) and an RL-like
one (~20%). For each pair, each method runs in its own process, after a warm-up read so the
page cache is warm:

  (a) raw: sequential read of both files (the floor for anything that reads the weights);
  (b) ours: ``analysis.sparsity.diff.diff_checkpoints`` (fused CPU loop, numba) + the full tolerance sweep;
  (c) paper: the method of the RL-subnetwork paper's ``check_sparsity.py`` (arXiv 2505.11711):
      ``from_pretrained`` of both models, a bf16 delta per parameter, one ``torch.cat``, then
      ``isclose(delta, 0, atol=τ)`` at five tolerances.

Reports wall seconds, peak RSS (VmHWM) and peak anonymous memory (RssAnon sampled every 2 ms),
ratios against (a) and (c), and the differences of the unchanged counts of (c) against (b) at
each tolerance ((b) is exact; (c) subtracts in bf16 and compares against a bf16-rounded atol).

Then, in one process with the page cache warm (`--in-process`, the default after the table
above; `--only-in-process` skips the subprocess table), the honest floor: (a′) a plain
``readinto`` of the same files into one reused buffer, against (b) ``diff_checkpoints`` and
``overlap(base, [rl, sft])`` (which reads three checkpoints), each best of --repeat, the methods
alternating round by round. Reports the absolute seconds, (b)'s throughput as a fraction of (a′)'s
and the overlap's time as a multiple of one diff's.

    .venv/bin/python -m bench.diff [--gib 1.0] [--dir /tmp/subnetscope-bench] [--only-in-process] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOLS = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4)


# ------------------------------------------------------------------ data

def make_family(d: Path, gib: float) -> None:
    """base / sft / rl HF directories (config.json + sharded bf16 safetensors)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    hidden, inter = 2048, 5632
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    vocab = 8192
    layers = max(1, round((gib * 2**30 / 2 - 2 * vocab * hidden) / per_layer))
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=vocab, tie_word_embeddings=False, dtype="bfloat16")
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    for L in range(layers):
        p = f"model.layers.{L}."
        for n in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{n}_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    g = torch.Generator().manual_seed(0)
    runs = {"base": None, "sft": 0.9, "rl": 0.2}
    for run in runs:
        (d / run).mkdir(parents=True, exist_ok=True)
        cfg.to_json_file(d / run / "config.json")
    shard, size, n_shard, weight_map = {name: {} for name in runs}, 0, 0, {}

    def flush():
        nonlocal shard, size, n_shard
        n_shard += 1
        for run in runs:
            save_file(shard[run], d / run / f"model-{n_shard:05d}.safetensors", metadata={"format": "pt"})
        shard, size = {name: {} for name in runs}, 0

    for name, shape in shapes.items():
        base = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        shard["base"][name] = base
        for run, frac in runs.items():
            if frac is None:
                continue
            pick = torch.rand(shape, generator=g) < frac
            step = torch.randn(shape, generator=g) * 2e-3
            shard[run][name] = torch.where(pick, (base.float() + step).to(torch.bfloat16), base)
        weight_map[name] = f"model-{n_shard + 1:05d}.safetensors"
        size += base.numel() * 2
        if size > 2**28:
            flush()
    if size:
        flush()
    for run in runs:
        (d / run / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# ------------------------------------------------------------------ measured children

class _Peak(threading.Thread):
    """Samples RssAnon every 2 ms (the kernel keeps no peak of anonymous memory)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_anon = 0
        self.stop = False

    @staticmethod
    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def run(self):
        while not self.stop:
            self.peak_anon = max(self.peak_anon, self.status("RssAnon"))
            time.sleep(0.002)


def child(method: str, base: str, tuned: str) -> dict:
    import torch

    torch.set_grad_enabled(False)
    # imports and JIT loading are not the work being measured: do them before the clock starts
    sys.path.insert(0, str(ROOT))
    if method == "ours":
        import kernels.diff_stats.numba_loop  # noqa: F401
        from analysis.sparsity.diff import diff_checkpoints  # noqa: F401
        from transformers import CONFIG_MAPPING

        CONFIG_MAPPING["llama"]
    elif method == "paper":
        from transformers import AutoModelForCausalLM  # noqa: F401
    peak = _Peak()
    peak.start()
    t0 = time.perf_counter()
    if method == "raw":
        unchanged = _raw_read([base, tuned])
    elif method == "ours":
        unchanged = _ours(base, tuned)
    else:
        unchanged = _paper(base, tuned)
    seconds = time.perf_counter() - t0
    peak.stop = True
    peak.join()
    return {"seconds": seconds, "peak_rss": _Peak.status("VmHWM"), "peak_anon": max(peak.peak_anon,
                                                                                    _Peak.status("RssAnon")),
            "unchanged": unchanged}


def _raw_read(dirs) -> dict:
    # a 1 MiB buffer stays in the L2 cache: 0.21 s for the 2 GiB of a pair here, against 1.0–1.3 s with a
    # 64 MiB buffer that each read also writes out to memory (the floor must be the fastest plain read)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    for d in dirs:
        for f in sorted(Path(d).glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(view):
                    pass
    return {}


def _ours(base, tuned) -> dict:
    from analysis.sparsity.diff import diff_checkpoints

    r = diff_checkpoints(base, tuned, tol=1e-5)
    sweep = {s["tolerance"]: s["unchanged"] for s in r.sweep()}
    return {"n": r.total_params, **{f"{t:g}": sweep[t] for t in TOLS}}


def _paper(base, tuned) -> dict:
    """The method of the paper's check_sparsity.py, reimplemented (bf16 deltas, one cat, isclose)."""
    import torch
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map="cpu")
    b = AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.bfloat16, device_map="cpu")
    sb = b.state_dict()
    deltas = [(sb[name] - p).reshape(-1) for name, p in a.named_parameters()]
    flat = torch.cat(deltas)
    del deltas
    zero = torch.zeros_like(flat)
    out = {"n": flat.numel()}
    for t in TOLS:
        out[f"{t:g}"] = int(torch.isclose(flat, zero, atol=t).sum())
    return out


def measure(method: str, base: Path, tuned: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "bench.diff", "--child", method, str(base), str(tuned)], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{method} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def in_process(d: Path, repeat: int) -> None:
    """The same-process table: raw reads, diffs and the overlap, best of ``repeat``, alternating."""
    sys.path.insert(0, str(ROOT))
    import torch

    from analysis.sparsity.diff import diff_checkpoints
    from analysis.sparsity.overlap import overlap

    torch.set_grad_enabled(False)
    base, sft, rl = d / "base", d / "sft", d / "rl"
    methods = {
        "raw read base+sft": lambda: _raw_read([base, sft]),
        "diff base→sft": lambda: diff_checkpoints(base, sft, tol=1e-5),
        "raw read base+rl": lambda: _raw_read([base, rl]),
        "diff base→rl": lambda: diff_checkpoints(base, rl, tol=1e-5),
        "raw read base+rl+sft": lambda: _raw_read([base, rl, sft]),
        "overlap base, [rl, sft]": lambda: overlap(base, [rl, sft], tol=1e-5),
    }
    for fn in methods.values():  # warm: page cache, JIT caches, imports
        fn()
    best = {m: float("inf") for m in methods}
    for _ in range(repeat):
        for m, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            best[m] = min(best[m], time.perf_counter() - t0)
    print()
    print(f"In one process, page cache warm, best of {repeat}, alternating "
          f"({torch.get_num_threads()} torch threads):")
    print()
    print("| measurement | seconds | throughput vs the raw read of the same files | vs one diff |")
    print("|---|---:|---:|---:|")
    rows = [("raw read base+sft", None, None), ("diff base→sft", "raw read base+sft", None),
            ("raw read base+rl", None, None), ("diff base→rl", "raw read base+rl", None),
            ("raw read base+rl+sft", None, None),
            ("overlap base, [rl, sft]", "raw read base+rl+sft", ("diff base→sft", "diff base→rl"))]
    for m, floor, diffs in rows:
        vs = f"{best[floor] / best[m]:.2f}×" if floor else "1.00×"
        vd = (" / ".join(f"{best[m] / best[x]:.2f}× ({x.split()[1]})" for x in diffs)) if diffs else ""
        print(f"| {m} | {best[m]:.3f} | {vs} | {vd} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--dir", type=Path, default=Path("/tmp/subnetscope-bench"))
    p.add_argument("--child", nargs=3, metavar=("METHOD", "BASE", "TUNED"), help=argparse.SUPPRESS)
    p.add_argument("--only-in-process", action="store_true", help="skip the subprocess table")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    d = args.dir
    if not (d / "rl" / "model.safetensors.index.json").is_file():
        print(f"generating the checkpoints in {d} …", file=sys.stderr)
        make_family(d, args.gib)
    size = sum(f.stat().st_size for f in (d / "base").glob("*.safetensors"))
    n_tensors = len(json.loads((d / "base" / "model.safetensors.index.json").read_text())["weight_map"])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"checkpoint {size / 2**30:.2f} GiB bf16, {n_tensors} tensors")
    if args.only_in_process:
        in_process(d, args.repeat)
        return
    rows, diffs = [], []
    for run in ("sft", "rl"):
        measure("raw", d / "base", d / run)  # warm the page cache
        res = {m: measure(m, d / "base", d / run) for m in ("raw", "ours", "paper")}
        a, b, c = res["raw"], res["ours"], res["paper"]
        n = b["unchanged"]["n"]
        assert n == c["unchanged"]["n"], (n, c["unchanged"]["n"])
        for m, r in res.items():
            rows.append((run, m, r["seconds"], r["peak_rss"], r["peak_anon"], a["seconds"] / r["seconds"],
                         c["seconds"] / r["seconds"], r["peak_anon"] / c["peak_anon"]))
        diffs.append((run, n, {t: c["unchanged"][f"{t:g}"] - b["unchanged"][f"{t:g}"] for t in TOLS},
                      b["unchanged"]["1e-05"] / n))
    print()
    print("| pair | method | seconds | peak RSS MiB | peak anon MiB | throughput vs (a) | speed-up vs (c) "
          "| anon vs (c) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    names = {"raw": "(a) raw read", "ours": "(b) ours", "paper": "(c) paper's method"}
    for run, m, s, rss, anon, vs_a, vs_c, anon_c in rows:
        print(f"| base→{run} | {names[m]} | {s:.2f} | {rss / 2**20:,.0f} | {anon / 2**20:,.0f} | {vs_a:.2f} | "
              f"{vs_c:.1f}× | {anon_c:.3f} |")
    print()
    print("| pair | elements | sparsity at 1e-5 (ours) | " + " | ".join(f"(c)−(b) at {t:g}" for t in TOLS) + " |")
    print("|---|---:|---:|" + "---:|" * len(TOLS))
    for run, n, dd, sp in diffs:
        print(f"| base→{run} | {n:,} | {sp:.4f} | " + " | ".join(f"{dd[t]:+,}" for t in TOLS) + " |")
    in_process(d, args.repeat)


if __name__ == "__main__":
    main()
