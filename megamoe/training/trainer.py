"""The training loop: micro-batches -> loss -> gradients -> (reduce) -> clip -> AdamW step.

One optimizer step consumes `global_batch_size` sequences: each data-parallel rank runs
`global_batch_size / (micro_batch_size * dp)` micro-batches and accumulates gradients.
The step's loss is the mean over micro-batches of cross-entropy + MoE auxiliary losses; the
aux losses reach the gradients through `MoELayer`'s AuxLossGrad hook, scaled like the CE.

The Trainer receives a built run (megamoe.training.build.build_training): model, optimizer,
device, precision, and a context with one protocol for one process and for many (LocalContext
or megamoe.parallel.ParallelContext). It reduces gradients, computes the global gradient norm,
averages logged values, runs the micro-batch schedule (plain loop or pipeline) and saves /
loads checkpoints; the Trainer never asks which one it has.
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np
import torch

from megamoe.checkpoint import CheckpointError, newest_checkpoint, previous_checkpoint, set_rng_state
from megamoe.data.sampler import rank_micro_batches
from megamoe.model.transformer import flops_per_token
from megamoe.training.logging_backends import build_sinks
from megamoe.training.metrics import JsonlLogger, device_peak_flops, format_console, host_rss_gib
from megamoe.training.schedule import lr_at
from megamoe.training.step_stats import StepStats, moe_layer_positions
from megamoe.training.watchdog import StepWatchdog


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


class Trainer:
    def __init__(self, run, train_ds, valid_ds=None):
        """run: a megamoe.training.build.TrainingRun."""
        self.run, self.train_ds, self.valid_ds = run, train_ds, valid_ds
        self.cfg, self.model, self.optimizer, self.ctx, self.device = \
            run.cfg, run.model, run.optimizer, run.ctx, run.device
        cfg, ctx = self.cfg, self.ctx
        self.dp_rank, self.dp_size, self.is_main = ctx.dp_rank, ctx.dp_size, ctx.is_main
        self.num_micro = cfg.global_batch_size // (cfg.micro_batch_size * self.dp_size)
        self.step = 0
        self.bad_steps = 0
        self.history: list[dict] = []
        self.logger = JsonlLogger(os.path.join(cfg.out_dir, "metrics.jsonl"), enabled=self.is_main)
        self.flops_per_token = flops_per_token(cfg.model)
        self.loss_fn = ctx.loss_fn
        self.schedule = ctx.schedule          # plain micro-batch loop, or the pipeline runner
        self.moe_positions, self.num_moe_layers = moe_layer_positions(self.model)
        self.stats_dtype = next(self.model.parameters()).dtype   # fp32 (fp64 in the test mode)
        self.peak_flops = device_peak_flops(self.device)

    # ---------------------------------------------------------------------------------- pieces
    def autocast(self):
        """The forward's precision context (bf16 autocast, + FP8 with cfg.fp8); see precision.py."""
        return self.run.autocast()

    def get_batch(self, dataset, sample_ids: list[int]):
        rows = [np.asarray(dataset[i % len(dataset)], dtype=np.int64) for i in sample_ids]
        data = torch.from_numpy(np.stack(rows)).to(self.device, non_blocking=True)
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()

    def forward_loss(self, inputs, labels) -> torch.Tensor:
        with self.autocast():
            logits = self.model(inputs)
        return self.loss_fn(logits, labels)

    def new_step_stats(self) -> StepStats:
        moe = self.cfg.model.moe
        return StepStats(self.moe_positions, self.num_moe_layers, moe.num_experts if moe else 0, self.device,
                         self.stats_dtype)

    def forward_backward(self, batches) -> StepStats:
        """Gradients of the step's micro-batches (accumulated in .grad, scaled 1/num_micro),
        plus their loss and MoE statistics."""
        stats = self.new_step_stats()
        self.schedule.forward_backward(self, batches, stats)
        return stats

    def grad_norm_and_clip(self) -> torch.Tensor:
        """Global gradient norm, and clipping, on the device: no host sync (a non-finite norm
        leaves the gradients alone; train_step then skips the step)."""
        norm = self.ctx.grad_norm(self.model)
        if self.cfg.optim.clip_grad > 0:
            coef = (self.cfg.optim.clip_grad / (norm + 1e-6)).clamp(max=1.0)
            coef = torch.where(torch.isfinite(coef), coef, torch.ones_like(coef))
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef.to(p.grad.dtype))
        return norm

    # ------------------------------------------------------------------------------ train step
    def train_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if hasattr(self.model, "set_aux_loss_scale"):
            self.model.set_aux_loss_scale(1.0 / self.num_micro)
        ids = rank_micro_batches(self.step, cfg.global_batch_size, cfg.micro_batch_size,
                                 self.dp_rank, self.dp_size)
        stats = self.forward_backward([self.get_batch(self.train_ds, sample_ids) for sample_ids in ids])
        self.ctx.reduce_grads(self.model)
        grad_norm = self.grad_norm_and_clip()
        # One collective for everything logged: the means over DP ranks of the per-rank means
        # (each rank ran the same number of micro-batches), the expert load summed over every
        # rank that routed distinct tokens (it also drives the router-bias update).
        logged = torch.cat([stats.ce_mean(self.num_micro)[None], stats.aux_mean(self.num_micro)[None],
                            stats.layer_means()])
        logged = self.ctx.average_over_dp(logged)
        load = self.ctx.sum_over_dp(stats.load) if stats.has_moe else None
        ce_mean, aux_mean, lb_mean, z_mean, dropped_mean = logged.unbind()
        loss = ce_mean + aux_mean
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        # The step's one device-to-host transfer: whether to step, and everything logged.
        scalars = [loss, ce_mean, grad_norm, finite, lb_mean, z_mean, dropped_mean]
        per_layer = None
        if load is not None:
            per_layer = load / load.sum(-1, keepdim=True).clamp(min=1)       # [L, E] shares
            scalars.append((per_layer.std(-1) / per_layer.mean(-1)).mean())
        values = torch.stack([t.to(torch.float64) for t in scalars])
        if per_layer is not None:
            values = torch.cat([values, per_layer.to(torch.float64).reshape(-1)])
        host = values.tolist()
        loss_v, ce_v, gnorm_v, finite, lb_v, z_v, dropped_v = host[:7]
        finite = finite == 1.0

        lr = lr_at(self.step, cfg.optim, cfg.steps)
        if finite:
            self.bad_steps = 0
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            if load is not None:
                self._update_router_bias(load)
        else:
            self.bad_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            if self.bad_steps >= cfg.max_bad_steps:
                raise TrainingError(f"{self.bad_steps} non-finite steps in a row (last at step "
                                    f"{self.step}); lower optim.lr or check the data")
        self.step += 1
        dt = time.perf_counter() - t0
        tokens = cfg.global_batch_size * cfg.model.seq_length
        world = self.ctx.world_size
        rec = {"step": self.step, "loss": loss_v, "ce": ce_v, "lr": lr,
               "grad_norm": gnorm_v, "skipped": not finite, "step_time_s": dt,
               "tokens_per_s": tokens / dt,
               "tflops_per_device": tokens * self.flops_per_token / dt / world / 1e12}
        rec["mfu"] = (rec["tflops_per_device"] * 1e12 / self.peak_flops) if self.peak_flops else None
        if per_layer is not None:
            num_experts = per_layer.shape[-1]
            shares = host[8:]
            rec.update(lb_loss=lb_v, z_loss=z_v, dropped_frac=dropped_v, expert_load_cv=host[7])
            rec["expert_load"] = [[round(x, 4) for x in shares[i:i + num_experts]]
                                  for i in range(0, len(shares), num_experts)]
        if self.device.type == "cuda":
            rec["max_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        rec["host_rss_gib"] = host_rss_gib()
        return rec

    def _update_router_bias(self, load: torch.Tensor) -> None:
        """load [L, E]: the step's token counts of every MoE layer of the model (all ranks)."""
        for m in self.model.moe_layers():
            m.router.update_bias(load[self.moe_positions[id(m)]])

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.valid_ds is None or len(self.valid_ds) == 0 or self.cfg.eval_iters <= 0:
            return None
        self.model.eval()
        # eval_iters batches of global_batch_size validation samples (as Megatron), so the
        # value does not depend on the parallel layout.
        batches = [self.get_batch(self.valid_ds, ids) for i in range(self.cfg.eval_iters)
                   for ids in rank_micro_batches(i, self.cfg.global_batch_size, self.cfg.micro_batch_size,
                                                 self.dp_rank, self.dp_size)]
        loss = self.ctx.average_over_dp(self.schedule.evaluate(self, batches)[None])[0]
        self.model.train()
        return float(loss)

    # ----------------------------------------------------------------------------- checkpoints
    def trainer_state(self) -> dict:
        return {"step": self.step, "consumed_samples": self.step * self.cfg.global_batch_size,
                "bad_steps": self.bad_steps}

    def save(self) -> str | None:
        return self.ctx.save_checkpoint(self)

    def load(self, ckpt_dir: str) -> None:
        self.ctx.load_checkpoint(self, ckpt_dir)

    def resume(self) -> None:
        """Continue from cfg.resume_from, or from the newest *complete* checkpoint of out_dir
        (whatever `latest` says). A missing, truncated or unreadable file stops the run with one
        line naming it and the previous complete checkpoint to resume from instead."""
        cfg = self.cfg
        target = cfg.resume_from or (newest_checkpoint(cfg.out_dir) if cfg.resume else None)
        if not target:
            return
        try:
            self.load(target)
        except CheckpointError as err:
            older = previous_checkpoint(target)
            hint = (f"; to resume from the previous complete checkpoint pass --resume_from {older}" if older
                    else "; move it away to start from scratch")
            raise CheckpointError(f"{err}{hint}") from None
        if self.is_main:
            print(f"resumed from {target} at step {self.step}", flush=True)

    def load_trainer_state(self, state: dict) -> None:
        self.step, self.bad_steps = int(state["step"]), int(state["bad_steps"])
        if "rng" in state:
            set_rng_state(state["rng"])

    # ------------------------------------------------------------------------------------ loop
    def train(self, stop_requested=lambda: False) -> list[dict]:
        """Run until cfg.steps; returns the per-step records. `stop_requested()` is polled after
        each step (signal handling): when it turns true, save and return early."""
        cfg = self.cfg
        self.resume()
        bar = None
        # Only on a terminal: in a log file (Slurm, CI, a pipe) every update would be a \r line.
        from megamoe.training.metrics import progress_bar_wanted
        if cfg.progress and self.is_main and progress_bar_wanted():
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        # Without a progress bar (e.g. Slurm log files) the console lines are plain prints.
        write = bar.write if bar is not None else (lambda line: print(line, flush=True))
        sinks = build_sinks(cfg, enabled=self.is_main)  # TensorBoard / W&B when available
        watchdog = None
        if cfg.watchdog_s > 0:
            watchdog = StepWatchdog(cfg.watchdog_s, abort=cfg.watchdog_abort,
                                    rank=self.ctx.rank).start()
        try:
            while self.step < cfg.steps:
                # The watched "step" includes its eval and checkpoint: any of them can hang.
                with watchdog.step(self.step + 1) if watchdog else contextlib.nullcontext():
                    if self._train_iteration(bar, write, sinks, stop_requested):
                        break
        finally:
            if watchdog is not None:
                watchdog.stop()
            sinks.close()
            if bar is not None:
                bar.close()
        return self.history

    def _train_iteration(self, bar, write, sinks, stop_requested) -> bool:
        """One step + its eval / logging / checkpoint; True when a stop was requested."""
        cfg = self.cfg
        rec = self.train_step()
        if cfg.eval_interval > 0 and (self.step % cfg.eval_interval == 0 or self.step == cfg.steps):
            rec["val_loss"] = self.evaluate()
        self.history.append(rec)
        self.logger.log(rec)
        sinks.log(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        if self.is_main and cfg.log_interval > 0 and (
                self.step % cfg.log_interval == 0 or self.step == 1 or rec.get("val_loss") is not None):
            write(format_console(rec))
        saving = cfg.save_interval > 0 and self.step % cfg.save_interval == 0
        if saving or self.step == cfg.steps:
            self.save()
        # Asked once per step, after the scheduled checkpoint: under distributed training the
        # answer comes from a collective that every rank must call equally often.
        stop = bool(stop_requested())
        if stop and not (saving or self.step == cfg.steps):
            self.save()
        return stop


__all__ = ["Trainer", "TrainingError"]
