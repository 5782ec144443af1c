"""Benchmark and findings: the geometry of SFT and RL updates on the SmolLM2 family.

On the family `python -m analysis demo --real --finetunes` builds ($SUBNETSCOPE_HOME/smollm2-family):

1. time of `geometry` for a SmolLM2 pair at the default k (target ≤ 60 s on a 2-core CPU), against
   the floor of the same run — `torch.linalg.svdvals` of every block matrix of both checkpoints
   (the spectra the geometry needs anyway), best of --repeat, alternating;
2. update sparsity of each fine-tune against its start, the overlap of the two RL seeds against
   the random and magnitude-matched baselines;
3. the geometry of SFT (base → sft) and RL (sft → rl-seedK) per kind, beside the claims of
   "The Path Not Taken" (arXiv 2511.08567).

    .venv/bin/python -m bench.geometry [--family DIR] [--repeat 2]
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
    from analysis.families.real_family import is_real_family_dir, real_family_dir

    p = argparse.ArgumentParser()
    p.add_argument("--family", type=Path, default=None)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    fam = args.family or real_family_dir()
    if not is_real_family_dir(fam):
        raise SystemExit(f"no SmolLM2 family in {fam}: run `python -m analysis demo --real --finetunes` first")
    import json

    import torch

    from analysis.checkpoints import align, open_checkpoint
    from analysis.sparsity.diff import diff_checkpoints
    from analysis.sparsity.geometry import MATRIX_KINDS, geometry
    from analysis.sparsity.overlap import overlap

    manifest = json.loads((fam / "manifest.json").read_text())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; family {fam} (built in {manifest['build_seconds_last_run']:.0f} s "
          f"in its last run)")
    print("\n| model | parent | steps | lr | held-out accuracy | 95% interval |\n|---|---|---:|---:|---:|---|")
    for n, m in manifest["models"].items():
        print(f"| {n} | {m['parent'] or '—'} | {m.get('steps', '—')} | {m.get('lr', '—')} | {m['accuracy']:.3f} "
              f"| [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}] (n = {m['n']}) |")

    # 1. time
    base, sft, rl1, rl2 = (fam / n for n in ("base", "sft", "rl-seed1", "rl-seed2"))

    def spectra_floor(a: Path, b: Path) -> None:
        cks = [open_checkpoint(a), open_checkpoint(b)]
        for at in align(cks).tensors:
            if at.layer is not None and len(at.compare_shape) == 2 and at.kind in MATRIX_KINDS:
                for ck, name in zip(cks, at.names):
                    torch.linalg.svdvals(ck.tensor(name).float())

    def run_geometry(a: Path, b: Path):
        return geometry(a, b)

    t_geo = {("base", "sft"): float("inf"), ("sft", "rl-seed1"): float("inf")}
    t_floor = dict(t_geo)
    results = {}
    for _ in range(args.repeat):
        for a, b in t_geo:
            t0 = time.perf_counter()
            spectra_floor(fam / a, fam / b)
            t_floor[(a, b)] = min(t_floor[(a, b)], time.perf_counter() - t0)
            t0 = time.perf_counter()
            results[(a, b)] = run_geometry(fam / a, fam / b)
            t_geo[(a, b)] = min(t_geo[(a, b)], time.perf_counter() - t0)
    results[("sft", "rl-seed2")] = geometry(sft, rl2)
    print(f"\nTime, best of {args.repeat}, alternating (default k = 1% of each matrix's rank; "
          f"{len(results[('base', 'sft')].matrices)} block matrices):\n")
    print("| pair | geometry s | floor: svdvals of both s | geometry ÷ floor |\n|---|---:|---:|---:|")
    for (a, b), t in t_geo.items():
        print(f"| {a} → {b} | {t:.1f} | {t_floor[(a, b)]:.1f} | {t / t_floor[(a, b)]:.2f}× |")

    # 2. sparsity and overlap
    print("\n| update | elements | changed at τ = 1e-5 | update sparsity |\n|---|---:|---:|---:|")
    for a, b in (("base", "sft"), ("sft", "rl-seed1"), ("sft", "rl-seed2")):
        r = diff_checkpoints(fam / a, fam / b)
        print(f"| {a} → {b} | {r.total_params:,} | {r.changed_params:,} | {r.update_sparsity:.4f} |")
    ov = overlap(sft, [rl1, rl2]).to_json()
    pair = ov["pairs"][0]
    print("\n| RL seeds from sft | o1 | o2 | Jaccard |\n|---|---:|---:|---:|")
    print(f"| observed | {pair['o1']:.4f} | {pair['o2']:.4f} | {pair['jaccard']:.4f} |")
    print(f"| random baseline | {pair['o1_random']:.4f} | {pair['o2_random']:.4f} | {pair['jaccard_random']:.4f} |")
    print(f"| magnitude-matched | {pair['o1_matched']:.4f} | {pair['o2_matched']:.4f} | — |")

    # 3. geometry per kind
    def f(x, fmt):
        return "—" if x is None else format(x, fmt)

    print("\n| update | kind | drift | top-k drift | angle U mean ° | alignment ÷ random | principal o1 | "
          "smallest o1 | random o1 | α base → tuned |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for (a, b), r in results.items():
        for k in r.kinds():
            ratio = None if k["alignment"] is None else k["alignment"] / k["alignment_random"]
            print(f"| {a} → {b} | {k['kind']} | {f(k['spectral_drift'], '.2e')} | {f(k['top_k_drift'], '.2e')} | "
                  f"{f(k['angle_u_mean'], '.2f')} | {f(ratio, '.1f')} | {f(k['principal_o1'], '.3f')} | "
                  f"{f(k['smallest_o1'], '.3f')} | {f(k['random_o1'], '.3f')} | "
                  f"{f(k['alpha_base'], '.2f')} → {f(k['alpha_tuned'], '.2f')} |")


if __name__ == "__main__":
    main()
