"""The training loop of one run: the model, its mask and optimizer, the LISA and ID3 schedules,
the steps, evaluations, resumable state and the final weights.

Built by :func:`analysis.finetune.run.run_finetune`, which owns the run directory's lifecycle
(lock, summary, config); the trainer writes what training produces into it through
:class:`~analysis.jobs.RunDir` (metrics, state, model, eval, the grown mask).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import IO

import torch

from analysis.finetune.config import FinetuneConfig, FinetuneConfigError
from analysis.finetune.distributed import Distributed
from analysis.finetune.optim import make_optimizer
from analysis.finetune.sources import block_weights, build_mask, d3_scores, mask_digest, with_lora
from analysis.finetune.tasks import make_task, tupled
from analysis.finetune.weights import outside_mask_changed, stored_dtypes, to_stored_dtypes
from analysis.errors import one_line
from analysis.io import write_json_atomic
from analysis.jobs import RunDir, RunError
from analysis.jobs.rundir import disk_error
from analysis.training import schedule_factor


class Trainer:
    """One run's training, set up whole at construction.

    Args:
        config (FinetuneConfig): the run.
        run (RunDir): its directory (written by rank 0 only).
        dist (Distributed): the run's processes.
        device (torch.device): this process's device.
        metrics_file (IO, optional): ``metrics.jsonl``, open for writing (rank 0). Default: None.
        should_stop (Callable[[], bool], optional): polled before every step; True cancels.
        progress (Callable, optional): ``progress(step, steps, what)``.

    Raises:
        FinetuneConfigError: a mask that selects nothing, processes that built different masks.
    """

    def __init__(self, config: FinetuneConfig, run: RunDir, dist: Distributed, device: torch.device, *,
                 metrics_file: IO[str] | None = None, should_stop: Callable[[], bool] | None = None,
                 progress: Callable[[int, int, str], None] | None = None):
        from analysis.checkpoints.models import load_model
        from analysis.checkpoints.structure import tensor_role

        c = config
        self.config, self.run, self.dist, self.device = config, run, dist, device
        self.metrics_file, self.should_stop, self.progress = metrics_file, should_stop, progress
        torch.manual_seed(c.seed)
        model, self.tokenizer = load_model(c.checkpoint, device=device)
        self.stored_dtypes = stored_dtypes(c.checkpoint)
        if c.dtype == "bfloat16":
            model.to(torch.bfloat16)
        self.task = make_task(c, self.tokenizer, dist, device)
        self.mask = build_mask(c, model, self.task.calibration)
        if self.mask is not None and dist.world > 1 and len(set(dist.gather(mask_digest(self.mask)))) != 1:
            raise FinetuneConfigError("the processes built different masks (a nondeterministic selector?)")
        if c.lora is not None:
            model = with_lora(model, c.lora)
        model.train()
        self.model = model
        self.params = dict(model.named_parameters())
        self.layer_of = {n: tensor_role(n, None).layer for n in self.params}  # None outside the blocks
        # the schedules' state
        self.lr_factor = schedule_factor(c.lr_schedule, steps=c.steps, warmup_steps=c.warmup_steps)
        self.lisa_rng = random.Random(c.seed + 1)
        self.lisa_layers: list[int] = []
        self.universe: list[str] = block_weights(model) if c.source == "id3" else []
        self.id3_budget = round(c.id3 * sum(self.params[k].numel() for k in self.universe)) if c.source == "id3" else 0
        # what is trained, and by which optimizer
        if c.lora is not None:
            self.trained_names = [n for n, p in self.params.items() if p.requires_grad]
        elif self.mask is None:
            self.trained_names = list(self.params)
        else:
            self.trained_names = [n for n in self.params if n in self.mask and self.mask[n].any()]
        if c.source not in ("lora", "id3") and not self.trained_names:
            raise FinetuneConfigError("the mask selects no element of the model")
        self.opt = make_optimizer(c.optimizer, self.params, self.trained_names, self.mask, lr=c.lr)
        self._set_trainable(self.trained_names if c.source != "id3" else self.universe)
        self.saved_step = 0  # the step the state on disk holds (0: none needed)
        self.last_line = ""  # the metrics line of the last step (saved with the state)
        self.initial: dict | None = None  # the task's metrics before the first step

    def _set_trainable(self, names) -> None:
        """Only these parameters get a weight gradient (a parameter with nothing selected needs none)."""
        if self.config.lora is not None:
            return
        names = set(names)
        for n, p in self.params.items():
            p.requires_grad_(n in names)

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

    # ---- one step
    def step(self, step: int) -> dict:
        c = self.config
        lr = c.lr * self.lr_factor(step)
        self.opt.lr = lr
        if c.schedule == "lisa":
            self.lisa(step)
        t = time.perf_counter()
        self.model.train()
        loss, tokens, extra = self.task.loss(self.model)
        self.opt.zero_grad()
        self.model.zero_grad(set_to_none=True)
        loss.backward()
        row = {"step": step}
        growing = c.source == "id3" and self.opt.trainable < self.id3_budget
        if growing:  # D3 needs the full (averaged) gradients of the candidates
            self.dist.average_grads([self.params[n] for n in self.universe])
            row["unmasked"] = self.id3_grow(step)
        grad_norm = self.opt.step_averaged(self.dist, averaged=growing)
        mean_loss, mean_tokens, *rest = self.dist.average(
            [loss.detach().float().reshape(1), torch.tensor([float(tokens)], device=loss.device)] +
            [torch.tensor([v], device=loss.device) for v in extra.values()])
        tokens_all = round(float(mean_tokens) * self.dist.world)  # the sum over ranks (their slices differ)
        elapsed = time.perf_counter() - t
        row.update(loss=float(mean_loss), lr=lr, grad_norm=grad_norm, trainable=self.opt.trainable,
                   tokens_per_s=tokens_all / elapsed, step_s=elapsed,
                   **{k: float(v) for k, v in zip(extra, rest)})
        if c.schedule == "lisa":
            row["lisa_layers"] = self.lisa_layers
        return row

    # ---- state
    def save_state(self, step: int) -> None:
        """The resumable state (see :meth:`RunDir.save_state`). Every rank's random streams are kept
        (each samples its own slice)."""
        per_rank = self.dist.gather({"torch_rng": torch.get_rng_state(), "task": self.task.state()})
        if not self.dist.main:
            return
        blob = {"step": step, "optimizer": self.opt.state_dict(), "weights": self.opt.weights_to_save(),
                "ranks": per_rank, "lisa_rng": json.dumps(self.lisa_rng.getstate()), "lisa_layers": self.lisa_layers}
        self.run.save_state(blob, {"step": step, "mask_source": self.config.mask_source,
                                   "processes": self.dist.world, "metrics_row": self.last_line})
        self.saved_step = step

    def load_state(self) -> int:
        """Restores the saved state; returns its step.

        Raises:
            RunError: a state that is damaged or not this run's (one line naming ``state.pt``).
        """
        blob = self.run.load_state()
        where = self.run.state_dir() / "state.pt"
        ranks = blob["ranks"]
        if len(ranks) != self.dist.world:
            raise FinetuneConfigError(f"{self.run.path}: saved by {len(ranks)} process(es); resume it with as many")
        if blob["step"] != self.run.saved_step():
            raise RunError(f"{where}: unreadable saved state (step {blob['step']}, its meta.json says "
                           f"{self.run.saved_step()})")
        try:
            weights = blob["weights"]
            wrong = next((n for n, w in weights.items() if n not in self.params or not isinstance(w, torch.Tensor)
                          or w.shape != self.params[n].shape), None)
            if wrong is not None:
                raise ValueError(f"tensor {wrong!r} does not fit the model")
            with torch.no_grad():
                for n, w in weights.items():
                    self.params[n].copy_(w)
            self.opt.load_state_dict(blob["optimizer"])
            if self.config.source == "id3":
                self.trained_names = [n for n in self.universe if n in self.opt.mask()]
                if self.opt.trainable >= self.id3_budget:
                    self._set_trainable(self.trained_names)
            torch.set_rng_state(ranks[self.dist.rank]["torch_rng"])
            self.task.load_state(ranks[self.dist.rank]["task"])
            self.lisa_rng.setstate(tupled(json.loads(blob["lisa_rng"])))
            if self.config.schedule == "lisa" and blob["step"] % self.config.lisa_interval:
                self._apply_lisa(list(blob["lisa_layers"]))  # mid-interval: the same blocks as before
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise RunError(f"{where}: unreadable saved state, or not this run's ({one_line(e) or type(e).__name__}); "
                           "it cannot be resumed") from None
        return int(blob["step"])

    # ---- the loop
    def train(self, resume: bool) -> dict:
        """Trains to ``config.steps`` (from the saved state when ``resume``), then :meth:`finish`."""
        c = self.config
        start = self.load_state() if resume else 0
        self.saved_step = start
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
                self.last_line = json.dumps(row)
                try:
                    self.metrics_file.write(self.last_line + "\n")
                    self.metrics_file.flush()
                except OSError as e:
                    raise disk_error(self.run.metrics_file, e) from None
            last = row
            if step % save_every == 0 and step < c.steps:
                self.save_state(step)
            if self.progress is not None:
                self.progress(step, c.steps, f"loss {row['loss']:.3f}")
        if step > start and self.saved_step != step:
            self.save_state(step)  # before the model: a full disk while saving it loses no training
        return self.finish(status, step, last)

    def finish(self, status: str, step: int, last: dict) -> dict:
        """The final evaluation, the weights cast back to the stored dtypes and saved, and the check
        that nothing outside the mask changed."""
        c = self.config
        model = self.model
        model.eval()
        digests = self.dist.gather(Distributed.digest(model))
        result = {"status": status, "steps_done": step, "final": last, "trainable": self.opt.trainable,
                  "optimizer_state_bytes": self.opt.state_bytes(), "metric": self.task.metric}
        if self.initial is not None:
            result["initial"] = self.initial
        if self.dist.world > 1:
            result["ranks_identical"] = len(set(digests)) == 1
            result["rank_digests"] = digests  # SHA-256 of each rank's final weights
        if not self.dist.main:
            return result
        if status == "finished" and c.task != "lm":
            ev = self.task.final_evaluate(model)
            per = {k: ev.pop(k) for k in list(ev) if k.startswith("per_problem")}
            write_json_atomic(self.run.eval_file, {**ev, **per})
            result["final_eval"] = ev
        mask = self.mask
        if c.source == "id3":
            from analysis.sparsity.masks import save_mask

            mask = self.opt.mask()
            save_mask(self.run.mask_file, {n: mask.get(n, torch.zeros(p.shape, dtype=torch.bool))
                                           for n, p in self.params.items()}, source=c.mask_source)
        if c.lora is not None:
            model = model.merge_and_unload()  # the merged dense weights, comparable with any other run
        to_stored_dtypes(model, self.stored_dtypes)
        self.run.save_model(model, self.tokenizer)
        result["outside_mask_changed"] = outside_mask_changed(
            c.checkpoint, self.run.model_dir, None if mask is None else {k: v.cpu() for k, v in mask.items()})
        if status == "finished":
            self.run.drop_state()
        return result
