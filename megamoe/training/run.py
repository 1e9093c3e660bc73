"""`python -m megamoe train`: config -> (distributed setup) -> data -> model -> Trainer.

SIGTERM / SIGUSR1 (Slurm sends one before the time limit, or `scancel --signal=USR1`) ask the
trainer to finish the current step, save a checkpoint and exit 0; with `#SBATCH --requeue` the
requeued job resumes from that checkpoint because `resume` is on by default.
With several ranks the stop is agreed on collectively (AgreedStop), and rank 0 writes
<out_dir>/run_state.json ("finished" / "stopped" + step + signal) for the Slurm scripts in
examples/slurm, which requeue only a run stopped by USR1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch

from megamoe.config import load


class StopFlag:
    """Set by SIGTERM / SIGUSR1; polled by the trainer after every step."""

    def __init__(self):
        self.signal = None

    def __call__(self) -> bool:
        return self.signal is not None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum


class AgreedStop:
    """The stop_requested() the trainer polls once per step. With several ranks every rank must
    stop after the same step (saving is collective), so the local signal number is max-reduced
    over ranks: any rank's signal stops all of them, and TERM (15) wins over USR1 (10), i.e. a
    cancel is not turned into a requeue."""

    def __init__(self, flag: StopFlag, distributed: bool = False, device=None):
        self.flag, self.distributed, self.device = flag, distributed, device
        self.signal = None

    def __call__(self) -> bool:
        signum = self.flag.signal or 0
        if self.distributed:
            from megamoe.parallel.agree import max_over_ranks
            signum = max_over_ranks(signum, self.device)
        self.signal = signum or None
        return self.signal is not None


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(
        prog="megamoe train",
        description="Train a model. Any config field can be overridden: --model.moe.num_experts 16")
    parser.add_argument("--config", help="YAML config file (may name a preset: 'preset: tiny')")
    parser.add_argument("--preset", help="start from a preset (tiny, olmoe-1b-7b, mixtral-8x7b, ...)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan of the configured layout "
                        "(memory, step time; `megamoe plan`) on --gpus GPUs and exit")
    parser.add_argument("--gpus", type=int, help="with --dry-run: GPUs (default: the launcher's world size)")
    args, overrides = parser.parse_known_args(argv)
    if args.config is None and args.preset is None:
        args.preset = "tiny"
    return args, overrides


def build_data(cfg, rank: int = 0):
    """(train, valid) datasets through the indexed-dataset path (megamoe.data)."""
    from megamoe.data import build_datasets
    train_samples = cfg.steps * cfg.global_batch_size
    valid_samples = max(1, cfg.eval_iters) * cfg.micro_batch_size * 64
    return build_datasets(cfg.data, seq_length=cfg.model.seq_length, train_samples=train_samples,
                          valid_samples=valid_samples, seed=cfg.seed, rank=rank,
                          vocab_size=cfg.model.vocab_size)


RUN_STATE_FILE = "run_state.json"


def write_run_state(out_dir: str, state: str, step: int, steps: int, signum: int | None) -> None:
    """<out_dir>/run_state.json: "finished", or "stopped" when a signal ended the run before
    cfg.steps. Slurm scripts (examples/slurm) requeue the job only on "stopped"."""
    path = os.path.join(out_dir, RUN_STATE_FILE)
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"state": state, "step": step, "steps": steps, "signal": signum}, f)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    cfg = load(args.config, overrides, args.preset)
    from megamoe.parallel.launch import detect_env
    world_size = detect_env().world_size   # torchrun or a Slurm step (not the batch shell)
    if args.dry_run:
        from megamoe.plan.cli import dry_run
        return dry_run(cfg, args.gpus or world_size)
    stop = StopFlag()
    stop.install()
    torch.manual_seed(cfg.seed)

    from megamoe.training.build import build_training
    from megamoe.training.trainer import Trainer

    if world_size > 1:
        from megamoe.parallel.launch import init_distributed
        from megamoe.parallel.agree import check_ranks_agree, config_fingerprint
        from megamoe.parallel.guard import named_collective
        # A rank that never shows up makes the rendezvous time out after parallel.timeout_s.
        with named_collective("world (startup rendezvous)", cfg.parallel.timeout_s):
            init_distributed(cfg.parallel)
        # Fail fast, with one line naming the odd ranks, if ranks got different configs
        # (before anything builds process groups or data from them).
        check_ranks_agree({"config": config_fingerprint(cfg)}, timeout_s=cfg.parallel.timeout_s)
    run = build_training(cfg)      # the same build pipeline for one process and for many
    ctx, model, device = run.ctx, run.model, run.device
    train_ds, valid_ds, tokenizer = build_data(cfg, rank=ctx.rank)
    if tokenizer is not None and tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                         f"{cfg.model.vocab_size}; raise model.vocab_size")
    if world_size > 1:  # every rank must read the same samples (a stale cache, another corpus...)
        from megamoe.parallel.agree import dataset_fingerprint
        check_ranks_agree({"train data": dataset_fingerprint(train_ds),
                           "valid data": dataset_fingerprint(valid_ds)}, timeout_s=cfg.parallel.timeout_s)
    trainer = Trainer(run, train_ds, valid_ds)
    # The whole model's size, as one process prints it (each rank holds only its shards and
    # stages; count_params merges them: a collective, so every rank calls it).
    from megamoe.parallel.params import count_params
    counts = count_params(model)
    if trainer.is_main:
        print(f"megamoe: {counts.describe()}, "
              f"{len(train_ds)} training samples of {cfg.model.seq_length} tokens, "
              f"device {device}, world size {world_size}", flush=True)
        if counts.describe_per_rank():
            print(f"megamoe: {counts.describe_per_rank()}", flush=True)
        from megamoe.plan.report import predicted_memory_line
        print(predicted_memory_line(cfg, world_size, run.backends.precision), flush=True)
    agreed = AgreedStop(stop, distributed=world_size > 1, device=device)
    history = trainer.train(stop_requested=agreed)
    if trainer.is_main and history:
        first, last = history[0], history[-1]
        print(f"megamoe: steps {first['step']}..{last['step']}: loss {first['loss']:.4f} -> "
              f"{last['loss']:.4f}" + (f", val loss {last['val_loss']:.4f}" if last.get("val_loss") else "")
              + f"; metrics in {os.path.join(cfg.out_dir, 'metrics.jsonl')}", flush=True)
    if agreed.signal is not None and trainer.is_main:
        print(f"megamoe: received signal {agreed.signal}; checkpoint saved at step {trainer.step}, exiting",
              flush=True)
    if trainer.is_main:
        stopped_early = agreed.signal is not None and trainer.step < cfg.steps
        write_run_state(cfg.out_dir, "stopped" if stopped_early else "finished", trainer.step, cfg.steps,
                        agreed.signal)
    ctx.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
