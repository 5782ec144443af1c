"""Benchmark: a trajectory in one process against the same on a local Ray with 2 workers.

On the bench family of `bench.diff` (a 1 GiB bf16 base in 4 shard files and two fine-tunes), the
trajectory base → rl → sft (each tensor read once from the three checkpoints; two diffs against
the base and two against the previous checkpoint per tensor) runs in this process and as Ray tasks
(one per shard file) on `ray.init(num_cpus=2)`; both best of --repeat after a warm-up (Ray's
workers start and load numba's cached kernels on the warm-up). Also the overhead of one task: a task
that opens and aligns the checkpoints and computes nothing. The JSON of both paths is compared.

    .venv/bin/python -m bench.scaleout [--dir /tmp/subnetscope-bench] [--repeat 2]
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", type=Path, default=Path("/tmp/subnetscope-bench"))
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    import ray
    import torch

    from analysis.checkpoints import align, open_checkpoint
    from analysis.checkpoints.tensor_map import _run_group, shard_groups
    from analysis.sparsity.trajectory import trajectory

    d = args.dir
    if not (d / "rl" / "model.safetensors.index.json").is_file():
        raise SystemExit(f"no bench family in {d}: run `python -m bench.diff` first")
    base, cks = d / "base", [d / "rl", d / "sft"]

    def best(fn):
        fn()
        t = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fn()
            t = min(t, time.perf_counter() - t0)
        return t

    local_json = trajectory(base, cks, steps=[1, 2]).to_json()
    t_local = best(lambda: trajectory(base, cks, steps=[1, 2]))
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t_init = time.perf_counter() - t0
    try:
        ray_json = trajectory(base, cks, steps=[1, 2], ray="").to_json()
        t_ray = best(lambda: trajectory(base, cks, steps=[1, 2], ray=""))
        refs = [str(c) for c in (base, *cks)]
        groups = shard_groups(align([open_checkpoint(r) for r in refs]), open_checkpoint(refs[0]))
        task = ray.remote(_run_group)
        ray.get([task.remote(refs, [], None, ()) for _ in groups])  # warm
        t_empty = best(lambda: ray.get([task.remote(refs, [], None, ()) for _ in groups])) / len(groups)
    finally:
        ray.shutdown()
    same = ray_json == local_json
    print(f"# bench.scaleout — {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, ray {ray.__version__}; trajectory base → rl → sft of the "
          f"{local_json['total_params']:,}-element bf16 bench family, {len(groups)} shard files; best of {args.repeat}")
    print()
    print("| path | seconds | vs one process |")
    print("|---|---:|---:|")
    print(f"| one process | {t_local:.2f} | 1.00× |")
    print(f"| local Ray, 2 workers ({len(groups)} tasks) | {t_ray:.2f} | {t_local / t_ray:.2f}× |")
    print()
    print(f"Ray start (once per command): {t_init:.1f} s; overhead of one task (open + align the three "
          f"checkpoints, no tensor work, tasks run 2 at a time): {t_empty * 1e3:.0f} ms; JSON identical: {same}")


if __name__ == "__main__":
    main()
