"""One masked fine-tuning run, written to a run directory.

``RUN_DIR/config.json``, ``metrics.jsonl`` (one line per step, flushed: step, loss, lr,
grad_norm, tokens_per_s, trainable; ``accuracy`` when evaluated), ``model/`` (the final
weights as a safetensors HF directory, in the checkpoint's dtype) and ``summary.json`` (status
finished / cancelled / failed with the error, final metrics, wall time, peak memory, the
inside-mask check). JSON files are written atomically; a cancel (``should_stop``) stops after
the current step with every metric kept.
"""

from __future__ import annotations

import json
import math
import random
import resource
import time
from pathlib import Path
from typing import Callable

import torch

from analysis.finetune.config import FinetuneConfig
from analysis.finetune.sparse_adamw import SparseMaskedAdamW, masked_reference_step
from analysis.io import write_json_atomic


def build_mask(config: FinetuneConfig, model) -> dict[str, torch.Tensor] | None:
    """The elements to train (None: all of them)."""
    params = dict(model.named_parameters())
    if config.full or config.lora is not None:
        return None
    if config.mask is not None:
        from analysis.masks import load_mask

        return load_mask(config.mask)
    if config.diff is not None:
        from analysis.diff import diff_checkpoints

        masks: dict[str, torch.Tensor] = {}
        diff_checkpoints(config.diff[0], config.diff[1], tol=config.diff_tol, on_mask=masks.__setitem__)
        return {n: m for n, m in masks.items() if n in params}
    # random, over the weight matrices inside the blocks: exactly round(density · n) elements
    names = [n for n, p in params.items() if ".layers." in n and p.dim() == 2]
    sizes = [params[n].numel() for n in names]
    n = sum(sizes)
    g = torch.Generator().manual_seed(config.seed)
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.randperm(n, generator=g)[: round(config.random * n)]] = True
    return {name: part.reshape(params[name].shape) for name, part in zip(names, flat.split(sizes))}


def run_finetune(config: FinetuneConfig, out_dir: str | Path, *, should_stop: Callable[[], bool] | None = None,
                 progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Trains per ``config`` and writes the run directory. Returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", config.to_dict())
    t0 = time.time()
    summary = {"status": "running", "mask_source": config.mask_source}
    write_json_atomic(out / "summary.json", summary)
    metrics_file = open(out / "metrics.jsonl", "a", encoding="utf-8")
    try:
        summary.update(_train(config, out, metrics_file, should_stop, progress))
    except BaseException as e:  # a crash keeps every metric written so far and records the error
        summary.update(status="cancelled" if isinstance(e, KeyboardInterrupt) else "failed",
                       error=f"{type(e).__name__}: {e}")
        raise
    finally:
        metrics_file.close()
        summary["wall_s"] = round(time.time() - t0, 3)
        summary["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        write_json_atomic(out / "summary.json", summary)
    return summary


def _train(config, out: Path, metrics_file, should_stop, progress) -> dict:
    from analysis import demo
    from analysis.models import load_model

    torch.manual_seed(config.seed)
    model, tokenizer = load_model(config.checkpoint, device="cpu")
    stored_dtype = next(iter(_stored_dtypes(config.checkpoint)), torch.float32)
    mask = build_mask(config, model)
    if config.lora is not None:
        model = _with_lora(model, config.lora)
    model.train()
    params = dict(model.named_parameters())
    if config.lora is not None:
        opt = torch.optim.AdamW([p for p in params.values() if p.requires_grad], lr=config.lr, weight_decay=0.0)
        trainable, state_bytes = sum(p.numel() for p in params.values() if p.requires_grad), None
    elif mask is None:
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
        trainable, state_bytes = sum(p.numel() for p in params.values()), None
    elif config.optimizer == "sparse":
        opt = SparseMaskedAdamW(params, mask, lr=config.lr)
        trainable, state_bytes = opt.trainable, opt.state_bytes()
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0, foreach=False)
        trainable, state_bytes = sum(int(m.sum()) for m in mask.values()), None
    if mask is not None:  # a parameter with nothing selected needs no weight gradient at all
        for n, p in params.items():
            if n not in mask or not mask[n].any():
                p.requires_grad_(False)
    examples = demo.qa_examples("train")
    train_problems, held_out = demo._problems()
    rng = random.Random(config.seed)
    gen = torch.Generator().manual_seed(config.seed)  # demo-rl sampling, as the demo's RL runs
    last = {}
    status = "finished"
    for step in range(1, config.steps + 1):
        if should_stop is not None and should_stop():
            status = "cancelled"
            break
        lr = config.lr * min(1.0, step / config.warmup_steps) if config.warmup_steps else config.lr
        _set_lr(opt, lr)
        t = time.perf_counter()
        extra = {}
        if config.task == "demo-sft":
            ids, labels = demo._lm_batch(rng.sample(examples, config.batch_size))
            logits = model(input_ids=ids, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
            tokens = int((ids != demo.PAD).sum())
        else:
            loss, reward = demo.rl_loss(model, rng.sample(train_problems, config.batch_size), gen)
            extra["reward"] = reward.mean().item()
            tokens = reward.numel() * (demo.MAX_ANSWER + 8)
        opt.zero_grad()
        loss.backward()
        grad_norm = _grad_norm({n: p for n, p in params.items() if p.requires_grad}, mask)
        if mask is None or config.optimizer == "sparse":
            opt.step()
        else:
            masked_reference_step(opt, params, mask)
        row = {"step": step, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm, "trainable": trainable,
               "tokens_per_s": tokens / (time.perf_counter() - t), **extra}
        if step % config.eval_every == 0 or step == config.steps:
            row["accuracy"] = demo.evaluate(model, held_out)
            model.train()
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        last = row
        if progress is not None:
            progress(step, config.steps, f"loss {row['loss']:.3f}")
    model.eval()
    if config.lora is not None:
        model = model.merge_and_unload()  # the merged dense weights, comparable with any other run
    model.to(stored_dtype).save_pretrained(out / "model", safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out / "model")
    result = {"status": status, "steps_done": last.get("step", 0), "final": last, "trainable": trainable,
              "optimizer_state_bytes": state_bytes}
    result["outside_mask_changed"] = outside_mask_changed(config.checkpoint, out / "model", mask)
    return result


def _with_lora(model, rank: int):
    """PEFT LoRA on the attention and MLP projections (the LoRA control of DESIGN.md §8)."""
    from peft import LoraConfig, get_peft_model

    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                      and ".layers." in n})
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets))


def outside_mask_changed(start: str | Path, final: str | Path, mask) -> int | None:
    """Elements that differ (not bit-identical) between start and final weights outside the mask
    (must be 0); None for a full fine-tune."""
    if mask is None:
        return None
    from analysis.diff import diff_checkpoints

    outside = 0

    def check(name, changed):
        nonlocal outside
        m = mask.get(name)
        outside += int(changed.sum()) if m is None else int((changed & ~m).sum())

    diff_checkpoints(start, final, tol=0.0, on_mask=check)
    return outside


def _grad_norm(params, mask) -> float:
    total = 0.0
    for n, p in params.items():
        if p.grad is None:
            continue
        g = p.grad if mask is None else (p.grad[mask[n]] if n in mask else None)
        if g is not None:
            total += float(g.float().pow(2).sum())
    return math.sqrt(total)


def _set_lr(opt, lr: float) -> None:
    if isinstance(opt, SparseMaskedAdamW):
        opt.lr = lr
    else:
        for group in opt.param_groups:
            group["lr"] = lr


def _stored_dtypes(ref) -> list:
    from analysis.checkpoints import open_checkpoint

    names = {t.dtype for t in open_checkpoint(ref).tensors.values()}
    return [getattr(torch, d) for d in sorted(names)]
