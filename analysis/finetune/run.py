"""One masked fine-tuning run, written to a run directory.

``RUN_DIR/config.json``, ``metrics.jsonl`` (one line per step, flushed: step, loss, lr,
grad_norm, tokens_per_s, trainable; the task's metrics when evaluated), ``model/`` (the final
weights as a safetensors HF directory, in the checkpoint's dtype), ``summary.json`` (status
finished / cancelled / failed with the error, final metrics, wall time, peak memory, the
inside-mask check), ``eval.json`` (per-problem results of the final evaluation, demo tasks) and
``state/`` (what :func:`resume_finetune` continues from: optimizer state, trained weights, random
streams). JSON and state files are written atomically; a cancel (``should_stop``, SIGTERM in the
CLI) stops after the current step with every metric kept and the state saved.

Run under ``torchrun`` / ``accelerate launch`` it trains data-parallel (see
:mod:`analysis.finetune.distributed`); rank 0 writes the run directory.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from analysis.errors import SubnetscopeError, one_line
from analysis.finetune import rundir
from analysis.finetune.config import FinetuneConfig, FinetuneConfigError
from analysis.finetune.distributed import Distributed
from analysis.finetune.rundir import RunError
from analysis.finetune.sparse_adamw import SparseMaskedAdamW, masked_reference_step
from analysis.finetune.tasks import Task, _tupled, make_task
from analysis.io import os_error, write_errors, write_json_atomic

Mask = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- masks

def block_weights(model) -> list[str]:
    """The 2-D attention and MLP weights inside the transformer blocks (the universe of random and
    ID3 masks; the same ``blocks`` scope as the selectors' budgets, for every supported family)."""
    from analysis.importance import in_scope

    return [n for n, p in model.named_parameters() if in_scope(n, p.shape, None, "blocks")]


def build_mask(config: FinetuneConfig, model, task: Task | None = None) -> Mask | None:
    """The elements to train (None: all of them; an empty dict: ID3's mask, grown during the run)."""
    params = dict(model.named_parameters())
    source = config.source
    if source in ("full", "lora"):
        return None
    if source == "id3":
        return {}
    if source == "mask":
        from analysis import masks as M

        loaded = [M.load_mask(p) for p in config.mask]
        if len(loaded) == 1:
            mask = loaded[0]
        elif config.mask_combine == "union":
            mask = M.union(*loaded)
        elif config.mask_combine == "intersect":
            mask = M.intersect(*loaded)
        elif config.mask_combine == "minus":
            rest = M.union(*loaded[1:])
            M.intersect(loaded[0], rest)  # the same compatibility check
            mask = {n: loaded[0][n] & ~rest[n] for n in loaded[0]}
        else:
            mask = M.consensus(loaded, int(config.mask_combine.split(":")[1]))
        return _fit(mask, params, " ".join(config.mask))
    if source == "diff":
        from analysis.diff import diff_checkpoints

        masks: Mask = {}
        diff_checkpoints(config.diff[0], config.diff[1], tol=config.diff_tol, on_mask=masks.__setitem__)
        return _fit(masks, params, f"the diff {config.diff[0]} -> {config.diff[1]}")
    if source == "selector":
        from analysis.importance import compute_scores, scores_to_mask

        if task is None:
            raise FinetuneConfigError("a selector mask needs the task's calibration data")
        scores = compute_scores(model, config.selector, task.calibration(), granularity=config.granularity,
                                seed=config.seed)
        return _fit(scores_to_mask(scores, config.density, budget=config.budget), params, config.selector)
    # random, over the weight matrices inside the blocks: exactly round(density · n) elements
    names = block_weights(model)
    sizes = [params[n].numel() for n in names]
    n = sum(sizes)
    g = torch.Generator().manual_seed(config.seed)
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.randperm(n, generator=g)[: round(config.random * n)]] = True
    return {name: part.reshape(params[name].shape) for name, part in zip(names, flat.split(sizes))}


def _fit(mask: Mask, params: dict, what: str) -> Mask:
    """Keeps the entries of the model's parameters; a mask naming none of them is an error."""
    kept = {n: m for n, m in mask.items() if n in params}
    if mask and not kept:
        raise FinetuneConfigError(f"{what}: the mask names none of the checkpoint's parameters "
                                  f"(e.g. {next(iter(mask))})")
    for n, m in kept.items():
        if tuple(m.shape) != tuple(params[n].shape):
            raise FinetuneConfigError(f"{what}: mask {n} has shape {tuple(m.shape)}, the parameter "
                                      f"{tuple(params[n].shape)}")
    return kept


def d3_scores(param: torch.nn.Parameter, exp: float, eps: float) -> torch.Tensor:
    """ID3's D3 importance of each element: |g| / (|θ| + ε)^exp (float32, shaped like the parameter)."""
    g = param.grad.float().abs()
    return g if exp == 0 else g / (param.detach().float().abs() + eps).pow(exp)


# ----------------------------------------------------------------------------- the run

def run_finetune(config: FinetuneConfig, out_dir: str | Path, *, should_stop: Callable[[], bool] | None = None,
                 progress: Callable[[int, int, str], None] | None = None, resume: bool = False,
                 overwrite: bool = False, on_start: Callable[[Path], None] | None = None) -> dict:
    """Trains per ``config`` and writes the run directory (rank 0). Returns the summary.

    Args:
        config (FinetuneConfig): the run.
        out_dir (str or Path): the run directory: new, empty, or the run directory of an earlier
            run (whose files the new run replaces).
        should_stop (callable, optional): polled before every step; True cancels.
        progress (callable, optional): ``progress(step, steps, what)``.
        resume (bool): continue from ``out_dir/state`` (see :func:`resume_finetune`). Default: False.
        overwrite (bool): write into a non-empty directory that is not a run directory. Default: False.
        on_start (callable, optional): called (rank 0) with the run directory once the run owns it.
    Raises:
        SubnetscopeError: bad inputs or an output that may not be written (one line, nothing
            written), another process writing the same run directory, or an OS error while writing.
    """
    out = Path(out_dir)
    main = int(os.environ.get("RANK", "0")) == 0
    if not resume:
        preflight(config, out if main else None, overwrite=overwrite)
    lock = rundir.RunLock(out) if main else None  # one writer per run directory
    try:
        if lock is not None and on_start is not None:
            on_start(out)
        return _run_locked(config, out, should_stop, progress, resume)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(config: FinetuneConfig, out: Path, should_stop, progress, resume: bool) -> dict:
    device = Distributed.local_device(_device(config.device))
    dist = Distributed.from_env(device)
    t0 = time.time()
    summary = {"status": "running", "mask_source": config.mask_source, "task": config.task,
               "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "processes": dist.world, "pid": os.getpid()}
    metrics_file = None
    if dist.main:
        previous = rundir.summary(out)
        if resume and "initial" in previous:
            summary["initial"] = previous["initial"]  # the start of the run, measured before it was cut
        write_json_atomic(out / "summary.json", summary)  # before config.json: never read as "queued"
        if rundir.read_json(out / "config.json") != config.to_dict():  # unchanged: keep its time (the runs' order)
            write_json_atomic(out / "config.json", config.to_dict())
        if resume:
            _truncate_metrics(out / "metrics.jsonl", rundir.saved_step(out))
        else:  # a new run in a used run directory: nothing of the old one may mix in
            for name in ("eval.json", "mask.safetensors"):
                (out / name).unlink(missing_ok=True)
            for name in rundir.OWN_DIRS:
                shutil.rmtree(out / name, ignore_errors=True)
        metrics_file = open(out / "metrics.jsonl", "a" if resume else "w", encoding="utf-8")
    try:
        summary.update(_Trainer(config, out, dist, device, metrics_file, should_stop, progress).run(resume))
    except BaseException as e:  # a crash keeps every metric written so far and records the error
        summary.update(status="cancelled" if isinstance(e, KeyboardInterrupt) else "failed",
                       error=str(e) if isinstance(e, SubnetscopeError) else f"{type(e).__name__}: {e}")
        raise
    finally:
        if metrics_file is not None:
            try:
                metrics_file.close()
            except OSError:
                pass  # a full disk: the error being raised says so
        summary["wall_s"] = round(time.time() - t0, 3)
        summary["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if device.type == "cuda":
            summary["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
        if dist.main:
            try:
                write_json_atomic(out / "summary.json", summary)
            except SubnetscopeError:
                if summary["status"] == "running":
                    raise  # else the error being raised already says what went wrong first
        dist.close()
    return summary


def preflight(config: FinetuneConfig, out: str | Path | None = None, *, overwrite: bool = False) -> None:
    """Checks everything a run names before anything is written: the checkpoint, mask files (and
    that they fit the checkpoint), diff checkpoints, the lm data file and, given ``out``, that the
    run directory may be written (not an input, not inside or around one, not a stranger's
    non-empty directory unless ``overwrite``, writable). A bad one is a one-line error and no run
    directory."""
    from analysis.checkpoints import open_checkpoint
    from analysis.io import Inputs, check_output_dir

    ck = open_checkpoint(config.checkpoint)
    stored = _stored_dtypes(ck)
    inputs = Inputs([ck.path])
    for path in config.mask or []:
        _check_mask_fits(path, ck)
        inputs.add(path)
    for ref in config.diff or []:
        inputs.add(open_checkpoint(ref).path)
    if not any(d.is_floating_point for d in stored.values()):
        raise FinetuneConfigError(f"{config.checkpoint}: holds no floating-point weights to train "
                                  "(a quantized checkpoint? fine-tune its float original)")
    if config.dtype == "bfloat16":
        wider = sorted({str(d).removeprefix("torch.") for d in stored.values()
                        if d.is_floating_point and d != torch.bfloat16})
        if wider:
            raise FinetuneConfigError(f"{config.checkpoint} stores {', '.join(wider)} weights: training in bfloat16 "
                                      "would round every element, inside the mask or not (use --dtype float32)")
    if config.task == "lm":
        p = Path(config.data).expanduser()
        if (p.suffix in (".txt", ".jsonl") or os.sep in config.data) and not p.is_file():
            raise FinetuneConfigError(f"{p}: no such data file")
        inputs.add(p)
    if out is not None:
        check_output_dir(out, inputs, ours=rundir.is_run_dir, overwrite=overwrite)


def _check_mask_fits(path: str, ck) -> None:
    """A mask file must name tensors of the checkpoint, each with that tensor's shape."""
    from analysis.masks import load_mask
    from analysis.structure import normalize_name

    mask = load_mask(path)  # a missing, foreign or damaged file is a MaskError
    shapes = {t.key: t.shape for t in ck.tensors.values()}
    foreign = [n for n in mask if normalize_name(n) not in shapes]
    if foreign:
        raise FinetuneConfigError(f"{path}: names {len(foreign)} tensor(s) that {ck.path} does not hold "
                                  f"(e.g. {foreign[0]}); a mask of another model?")
    for n, m in mask.items():
        if tuple(m.shape) != tuple(shapes[normalize_name(n)]):
            raise FinetuneConfigError(f"{path}: {n} has shape {tuple(m.shape)}, the checkpoint's tensor "
                                      f"{tuple(shapes[normalize_name(n)])}")


def resume_finetune(run_dir: str | Path, *, steps: int | None = None, **kwargs) -> dict:
    """Continues a run directory from its saved state (after a cancel, a crash or a full disk),
    optionally to a new number of steps. The metrics after the saved step are dropped and
    recomputed, so a resumed run gives the weights and metrics an uninterrupted one would."""
    d = Path(run_dir)
    saved = rundir.read_json(d / "config.json")
    if not isinstance(saved, dict):
        raise RunError(f"{d}: not a run directory (no readable config.json)")
    done = rundir.saved_step(d)
    main = int(os.environ.get("RANK", "0")) == 0  # the other ranks see rank 0's lock and status
    if main and (rundir.locked(d) or rundir.status(d) == "running"):
        raise RunError(f"{d}: the run is still training (cancel it first)")
    if steps is not None:
        if steps <= done:
            raise RunError(f"{d}: {done} steps are done already; --steps must be more than that")
        saved["steps"] = steps
    return run_finetune(FinetuneConfig.from_dict(saved), d, resume=True, **kwargs)


def _device(name: str) -> torch.device:
    from analysis.models import resolve_device

    return resolve_device(name)


class _Trainer:
    def __init__(self, config, out, dist, device, metrics_file, should_stop, progress):
        self.config, self.out, self.dist, self.device = config, out, dist, device
        self.metrics_file, self.should_stop, self.progress = metrics_file, should_stop, progress
        self.saved_step = 0

    # ---- set-up
    def setup(self) -> None:
        from analysis.models import load_model

        c = self.config
        torch.manual_seed(c.seed)
        model, self.tokenizer = load_model(c.checkpoint, device=self.device)
        self.stored_dtypes = _stored_dtypes(c.checkpoint)
        if c.dtype == "bfloat16":
            model.to(torch.bfloat16)
        self.task = make_task(c, self.tokenizer, self.dist, self.device)
        self.mask = build_mask(c, model, self.task)
        if self.mask is not None and self.dist.world > 1:
            self._check_same_mask()
        if c.lora is not None:
            model = _with_lora(model, c.lora)
        model.train()
        self.model = model
        self.params = dict(model.named_parameters())
        from analysis.structure import tensor_role

        self.layer_of = {n: tensor_role(n, None).layer for n in self.params}  # None outside the blocks
        self.lisa_rng = random.Random(c.seed + 1)
        self.universe: list[str] = block_weights(model) if c.source == "id3" else []
        if c.source == "id3":
            n = sum(self.params[k].numel() for k in self.universe)
            self.id3_budget = round(c.id3 * n)
        if c.lora is not None:
            self.opt = torch.optim.AdamW([p for p in self.params.values() if p.requires_grad], lr=c.lr,
                                         weight_decay=0.0)
            self.trained_names = [n for n, p in self.params.items() if p.requires_grad]
        elif self.mask is None:
            self.opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=0.0)
            self.trained_names = list(self.params)
        elif c.optimizer == "sparse":
            self.opt = SparseMaskedAdamW(self.params, self.mask, lr=c.lr)
            self.trained_names = [n for n in self.params if n in self.mask and self.mask[n].any()]
        else:
            self.opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=0.0, foreach=False)
            self.trained_names = [n for n in self.params if n in self.mask and self.mask[n].any()]
        if c.source != "lora" and c.source != "id3" and not self.trained_names:
            raise FinetuneConfigError("the mask selects no element of the model")
        self._set_trainable(self.trained_names if c.source != "id3" else self.universe)

    def _check_same_mask(self) -> None:
        digests = self.dist.gather(_mask_digest(self.mask))
        if len(set(digests)) != 1:
            raise FinetuneConfigError("the processes built different masks (a nondeterministic selector?)")

    def _set_trainable(self, names) -> None:
        """Only these parameters get a weight gradient (a parameter with nothing selected needs none)."""
        if self.config.lora is not None:
            return
        names = set(names)
        for n, p in self.params.items():
            p.requires_grad_(n in names)

    @property
    def trainable(self) -> int:
        if isinstance(self.opt, SparseMaskedAdamW):
            return self.opt.trainable  # grows under ID3
        if not hasattr(self, "_trainable"):  # fixed: counted once, not every step
            self._trainable = (sum(int(m.sum()) for m in self.mask.values()) if self.mask is not None
                               else sum(self.params[n].numel() for n in self.trained_names))
        return self._trainable

    # ---- schedules
    def lisa(self, step: int) -> None:
        """Every ``lisa_interval`` steps: train only ``lisa_layers`` sampled blocks of the mask."""
        c = self.config
        if (step - 1) % c.lisa_interval:
            return
        layers = sorted({self.layer_of[n] for n in self.trained_names} - {None})
        self._apply_lisa(sorted(self.lisa_rng.sample(layers, min(c.lisa_layers, len(layers)))))

    def _apply_lisa(self, chosen: list[int]) -> None:
        self.lisa_layers = chosen
        active = {n for n in self.trained_names if self.layer_of[n] is None or self.layer_of[n] in chosen}
        if isinstance(self.opt, SparseMaskedAdamW):
            self.opt.set_active(active)
        self._set_trainable(active)

    def id3_target(self, step: int) -> int:
        """increment-S: the mask grows linearly to the budget over the run."""
        return round(self.id3_budget * step / self.config.steps)

    def id3_grow(self, step: int) -> int:
        """Unmasks the elements of highest D3 among those not trained yet (gradients averaged)."""
        c = self.config
        want = self.id3_target(step) - self.opt.trainable
        if want <= 0:
            return 0
        have = self.opt.mask()
        names = [n for n in self.universe if self.params[n].grad is not None]
        flat = torch.cat([d3_scores(self.params[n], c.id3_exp, c.id3_eps).reshape(-1) for n in names])
        taken = torch.cat([have[n].reshape(-1) if n in have else torch.zeros(self.params[n].numel(), dtype=torch.bool,
                                                                               device=flat.device) for n in names])
        flat[taken] = -1.0  # D3 ≥ 0: never re-picks a trained element
        top = torch.topk(flat, min(want, int((~taken).sum())), sorted=False).indices
        chosen = torch.zeros_like(taken)
        chosen[top] = True
        new, at = {}, 0
        for n in names:
            k = self.params[n].numel()
            part = chosen[at:at + k]
            if part.any():
                new[n] = part.view(self.params[n].shape)
            at += k
        added = self.opt.add(new)
        if self.opt.trainable >= self.id3_budget:  # done growing: the rest needs no gradient any more
            self.trained_names = [n for n in self.universe if n in self.opt.mask()]
            self._set_trainable(self.trained_names)
        return added

    def lr_at(self, step: int) -> float:
        c = self.config
        if c.warmup_steps and step <= c.warmup_steps:
            return c.lr * step / c.warmup_steps
        if c.lr_schedule == "constant":
            return c.lr
        frac = (step - 1 - c.warmup_steps) / max(1, c.steps - c.warmup_steps)  # 0 at the first step after warm-up
        if c.lr_schedule == "linear":
            return c.lr * (1 - frac)
        return c.lr * 0.5 * (1 + math.cos(math.pi * frac))

    # ---- one step
    def step(self, step: int) -> dict:
        c = self.config
        lr = self.lr_at(step)
        _set_lr(self.opt, lr)
        if c.schedule == "lisa":
            self.lisa(step)
        t = time.perf_counter()
        self.model.train()
        loss, tokens, extra = self.task.loss(self.model)
        if isinstance(self.opt, SparseMaskedAdamW):
            self.opt.zero_grad()
        self.model.zero_grad(set_to_none=True)
        loss.backward()
        row = {"step": step}
        if isinstance(self.opt, SparseMaskedAdamW):
            growing = c.source == "id3" and self.opt.trainable < self.id3_budget
            if growing:  # D3 needs the full (averaged) gradients of the candidates
                self.dist.average_grads([self.params[n] for n in self.universe])
                row["unmasked"] = self.id3_grow(step)
            grads = self.opt.gather_grads()  # after backward, never in a hook
            if not growing:
                keys = [k for k, g in grads.items() if g is not None]
                grads.update(zip(keys, self.dist.average([grads[k] for k in keys])))
            grad_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values() if g is not None))
            self.opt.step(grads)
        else:
            trained = [p for p in self.params.values() if p.requires_grad]
            self.dist.average_grads(trained)
            if self.mask is None:
                grad_norm = _grad_norm(self.params, None)
                self.opt.step()
            else:
                grad_norm = _grad_norm(self.params, self.mask)
                masked_reference_step(self.opt, self.params, self.mask)
        mean_loss, mean_tokens, *rest = self.dist.average(
            [loss.detach().float().reshape(1), torch.tensor([float(tokens)], device=loss.device)] +
            [torch.tensor([v], device=loss.device) for v in extra.values()])
        tokens_all = round(float(mean_tokens) * self.dist.world)  # the sum over ranks (their slices differ)
        elapsed = time.perf_counter() - t
        row.update(loss=float(mean_loss), lr=lr, grad_norm=grad_norm, trainable=self.trainable,
                   tokens_per_s=tokens_all / elapsed, step_s=elapsed,
                   **{k: float(v) for k, v in zip(extra, rest)})
        if c.schedule == "lisa":
            row["lisa_layers"] = self.lisa_layers
        return row

    # ---- state
    def save_state(self, step: int) -> None:
        """``state/state.pt`` (tensors, lists and strings only: ``torch.load(weights_only=True)``
        reads it back) and ``state/meta.json``. Written into ``state.tmp/`` and swapped in, so a
        crash while saving leaves the previous state whole. Every rank's random streams are kept
        (each samples its own slice)."""
        per_rank = self.dist.gather({"torch_rng": torch.get_rng_state(), "task": self.task.state()})
        if not self.dist.main:
            return
        if isinstance(self.opt, SparseMaskedAdamW):
            weights = {}  # the masked weights are the masters: nothing else moved
        else:
            weights = {n: self.params[n].detach().cpu().clone() for n in self.trained_names}
        blob = {"step": step, "optimizer": self.opt.state_dict(), "weights": weights, "ranks": per_rank,
                "lisa_rng": json.dumps(self.lisa_rng.getstate()),
                "lisa_layers": list(getattr(self, "lisa_layers", []))}
        tmp, cur, old = (self.out / n for n in ("state.tmp", "state", "state.old"))
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            torch.save(blob, tmp / "state.pt")
            write_json_atomic(tmp / "meta.json", {"step": step, "mask_source": self.config.mask_source,
                                                  "processes": self.dist.world})
        except (*write_errors(), SubnetscopeError) as e:  # a full disk: the previous state stays whole
            shutil.rmtree(tmp, ignore_errors=True)
            raise (e if isinstance(e, SubnetscopeError) else os_error(tmp / "state.pt", e)) from None
        shutil.rmtree(old, ignore_errors=True)
        if cur.exists():
            os.replace(cur, old)
        os.replace(tmp, cur)
        shutil.rmtree(old, ignore_errors=True)
        self.saved_step = step

    def load_state(self) -> int:
        d = rundir.state_dir(self.out)
        try:
            blob = torch.load(d / "state.pt", weights_only=True, map_location="cpu")
            ranks = blob["ranks"]
            assert isinstance(blob, dict) and isinstance(ranks, list) and isinstance(blob["step"], int)
        except Exception as e:  # truncated or foreign: one line, nothing trained
            raise RunError(f"{d / 'state.pt'}: unreadable saved state ({one_line(e) or type(e).__name__}); "
                           "it cannot be resumed") from None
        if len(ranks) != self.dist.world:
            raise FinetuneConfigError(f"{self.out}: saved by {len(ranks)} process(es); resume it with as many")
        with torch.no_grad():
            for n, w in blob["weights"].items():
                self.params[n].copy_(w)
        self.opt.load_state_dict(blob["optimizer"])
        if isinstance(self.opt, SparseMaskedAdamW) and self.config.source == "id3":
            self.trained_names = [n for n in self.universe if n in self.opt.mask()]
            if self.opt.trainable >= self.id3_budget:
                self._set_trainable(self.trained_names)
        torch.set_rng_state(ranks[self.dist.rank]["torch_rng"])
        self.task.load_state(ranks[self.dist.rank]["task"])
        self.lisa_rng.setstate(_tupled(json.loads(blob["lisa_rng"])))
        if self.config.schedule == "lisa" and blob["step"] % self.config.lisa_interval:
            self._apply_lisa(list(blob["lisa_layers"]))  # mid-interval: the same blocks as before
        return int(blob["step"])

    # ---- the loop
    def run(self, resume: bool) -> dict:
        c = self.config
        self.setup()
        start = 0
        if resume:
            start = self.load_state()
        self.saved_step = start  # the step the state on disk holds (0: none needed)
        self.initial = self.task.evaluate(self.model) if self.dist.main and not resume else None
        save_every = c.save_every or c.eval_every
        status, last = "finished", {}
        step = start
        for step in range(start + 1, c.steps + 1):
            if self.dist.any(self.should_stop is not None and self.should_stop()):
                status, step = "cancelled", step - 1
                break
            row = self.step(step)
            if (step % c.eval_every == 0 or step == c.steps) and self.dist.main:
                row.update(self.task.evaluate(self.model))
            if self.metrics_file is not None:
                self.metrics_file.write(json.dumps(row) + "\n")
                self.metrics_file.flush()
            last = row
            if step % save_every == 0 and step < c.steps:
                self.save_state(step)
            if self.progress is not None:
                self.progress(step, c.steps, f"loss {row['loss']:.3f}")
        if step > start and self.saved_step != step:
            self.save_state(step)  # before the model: a full disk while saving it loses no training
        return self.finish(status, step, last)

    def finish(self, status: str, step: int, last: dict) -> dict:
        c = self.config
        model = self.model
        model.eval()
        digests = self.dist.gather(Distributed.digest(model))
        result = {"status": status, "steps_done": step, "final": last, "trainable": self.trainable,
                  "optimizer_state_bytes": self.opt.state_bytes() if isinstance(self.opt, SparseMaskedAdamW)
                  else _torch_state_bytes(self.opt), "metric": self.task.metric}
        if self.initial is not None:
            result["initial"] = self.initial  # the task's metrics before the first step
        if self.dist.world > 1:
            result["ranks_identical"] = len(set(digests)) == 1
            result["rank_digests"] = digests  # SHA-256 of each rank's final weights
        if not self.dist.main:
            return result
        if status == "finished" and c.task != "lm":
            ev = self.task.final_evaluate(model)
            per = {k: ev.pop(k) for k in list(ev) if k.startswith("per_problem")}
            write_json_atomic(self.out / "eval.json", {**ev, **per})
            result["final_eval"] = ev
        mask = self.mask
        if c.source == "id3":
            mask = self.opt.mask()
            from analysis.masks import save_mask

            save_mask(self.out / "mask.safetensors", {n: mask.get(n, torch.zeros(p.shape, dtype=torch.bool))
                                                      for n, p in self.params.items()}, source=c.mask_source)
        if c.lora is not None:
            model = model.merge_and_unload()  # the merged dense weights, comparable with any other run
        _to_stored_dtypes(model, self.stored_dtypes)
        self.save_model(model)
        result["outside_mask_changed"] = outside_mask_changed(c.checkpoint, self.out / "model",
                                                              None if mask is None else {k: v.cpu() for k, v in mask.items()})
        if status == "finished":
            shutil.rmtree(self.out / "state", ignore_errors=True)
        return result


    def save_model(self, model) -> None:
        """``model/`` written as ``model.tmp/`` and renamed; on any failure (a full disk) the
        partial copy is removed and the state saved before it stays, so ``--resume`` finishes it."""
        tmp = self.out / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            shutil.rmtree(self.out / "model", ignore_errors=True)
            os.replace(tmp, self.out / "model")
        except write_errors() as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise os_error(self.out / "model", e) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _truncate_metrics(path: Path, step: int) -> None:
    """Keeps the metric rows up to ``step`` (the resumed run rewrites the rest)."""
    if not path.is_file():
        return
    from analysis.io import write_atomic

    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            break  # a line cut by a crash ends the record
        if row.get("step", 0) <= step:
            keep.append(line)
    write_atomic(path, "".join(k + "\n" for k in keep))


def _with_lora(model, rank: int):
    """PEFT LoRA on the attention and MLP projections (the LoRA control of DESIGN.md §8), chosen by
    module kind (:func:`analysis.structure.lora_targets`). GPT-2's ``Conv1D`` stores its weight
    [in, out]: PEFT is told so (``fan_in_fan_out``)."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    from analysis.structure import lora_targets

    targets = lora_targets(model)
    if not targets:
        raise FinetuneConfigError(f"--lora: no attention or MLP projection found in this {type(model).__name__} "
                                  "(the supported families: Llama, GPT-2, BERT naming)")
    conv1d = any(isinstance(model.get_submodule(n), Conv1D) for n in targets)
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets,
                                            fan_in_fan_out=conv1d))


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
        g = p.grad if mask is None else (p.grad[mask[n].to(p.grad.device)] if n in mask else None)
        if g is not None:
            total += float(g.float().pow(2).sum())
    return math.sqrt(total)


def _torch_state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def _mask_digest(mask: Mask) -> str:
    import hashlib

    h = hashlib.sha256()
    for n in sorted(mask):
        h.update(n.encode())
        h.update(mask[n].cpu().numpy().tobytes())
    return h.hexdigest()


def _set_lr(opt, lr: float) -> None:
    if isinstance(opt, SparseMaskedAdamW):
        opt.lr = lr
    else:
        for group in opt.param_groups:
            group["lr"] = lr


def _stored_dtypes(ref) -> dict[str, torch.dtype]:
    """Tensor name -> the dtype the checkpoint (a reference or an open Checkpoint) stores it in."""
    from analysis.checkpoints import Checkpoint, open_checkpoint

    ck = ref if isinstance(ref, Checkpoint) else open_checkpoint(ref)
    return {name: getattr(torch, t.dtype) for name, t in ck.tensors.items() if hasattr(torch, t.dtype)}


def _to_stored_dtypes(model, stored: dict[str, torch.dtype]) -> None:
    """Casts each parameter back to its own stored dtype (mixed-dtype checkpoints stay mixed, so an
    untrained element round-trips bit for bit); names the checkpoint lacks take its commonest
    floating dtype."""
    floats = [d for d in stored.values() if d.is_floating_point]
    default = max(set(floats), key=floats.count) if floats else torch.float32
    with torch.no_grad():
        for name, p in model.named_parameters():
            dt = stored.get(name, default)
            if p.dtype != dt:
                p.data = p.data.to(dt)
