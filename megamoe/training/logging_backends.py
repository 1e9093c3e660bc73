"""Optional metric sinks next to metrics.jsonl: TensorBoard event files and Weights & Biases.

Neither package is a dependency. TensorBoard is used when `cfg.tensorboard` is on and
`torch.utils.tensorboard` imports (it needs the `tensorboard` package); W&B only when
`cfg.wandb_project` is set. Only rank 0 logs. A sink that fails to start prints one line and is
dropped: logging must never stop a training run.

Every sink gets the trainer's per-step record (see Trainer.train_step): scalars are logged
under readable tags, the per-layer expert load ([L][E] shares) as per-layer balance scalars.
"""

from __future__ import annotations

import json
import math
import os
import sys

from megamoe.config import TrainConfig, to_dict

# record key -> tag; grouped so the TensorBoard / W&B UIs show sections.
SCALAR_TAGS = {
    "loss": "train/loss", "ce": "train/ce", "val_loss": "val/loss", "lr": "train/lr",
    "grad_norm": "train/grad_norm", "tokens_per_s": "perf/tokens_per_s",
    "tflops_per_device": "perf/tflops_per_device", "mfu": "perf/mfu", "step_time_s": "perf/step_time_s",
    "max_mem_gib": "perf/max_mem_gib", "host_rss_gib": "perf/host_rss_gib",
    "lb_loss": "moe/lb_loss", "z_loss": "moe/z_loss", "dropped_frac": "moe/dropped_frac",
    "expert_load_cv": "moe/expert_load_cv",
}


def flatten_record(rec: dict) -> dict[str, float]:
    """tag -> value for every finite scalar of a step record, plus per-layer load balance:
    moe/layer{i}/max_load (busiest expert's share / uniform share; 1.0 = perfectly balanced)."""
    out = {}
    for key, tag in SCALAR_TAGS.items():
        value = rec.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[tag] = float(value)
    for i, shares in enumerate(rec.get("expert_load") or []):
        if shares:
            out[f"moe/layer{i}/max_load"] = max(shares) * len(shares)
            out[f"moe/layer{i}/min_load"] = min(shares) * len(shares)
    return out


class TensorBoardSink:
    """Event files under <out_dir>/tensorboard. The writer opens at the first record with
    purge_step = that step, so after a resume from an older checkpoint TensorBoard drops the
    steps the crashed run had logged past it (they are logged again)."""

    def __init__(self, log_dir: str, cfg: TrainConfig):
        from torch.utils.tensorboard import SummaryWriter  # ImportError without tensorboard
        self._writer_cls, self.log_dir, self.cfg = SummaryWriter, log_dir, cfg
        self.writer = None

    def log(self, rec: dict) -> None:
        step = int(rec["step"])
        if self.writer is None:
            self.writer = self._writer_cls(log_dir=self.log_dir, purge_step=step)
            self.writer.add_text("config", "```\n" + json.dumps(to_dict(self.cfg), indent=2) + "\n```", step)
        for tag, value in flatten_record(rec).items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


class WandbSink:
    def __init__(self, cfg: TrainConfig):
        import wandb
        # A run id stored in out_dir lets a requeued / resumed job continue the same W&B run.
        id_file = os.path.join(cfg.out_dir, "wandb_run_id")
        if os.path.exists(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = wandb.util.generate_id()
            os.makedirs(cfg.out_dir, exist_ok=True)
            with open(id_file, "w") as f:
                f.write(run_id)
        self.wandb = wandb
        self.run = wandb.init(project=cfg.wandb_project,
                              name=cfg.wandb_run_name or os.path.basename(os.path.abspath(cfg.out_dir)),
                              id=run_id, resume="allow", dir=cfg.out_dir, config=to_dict(cfg))

    def log(self, rec: dict) -> None:
        self.run.log(flatten_record(rec), step=int(rec["step"]))

    def close(self) -> None:
        self.run.finish()


class MetricSinks:
    """Fan-out to the sinks that could be started; `log` / `close` are no-ops without any."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, rec: dict) -> None:
        for sink in list(self.sinks):
            try:
                sink.log(rec)
            except Exception as err:  # noqa: BLE001 - a broken sink must not end training
                print(f"megamoe: disabling {type(sink).__name__} after an error: {err}", file=sys.stderr)
                self.sinks.remove(sink)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as err:  # noqa: BLE001
                print(f"megamoe: closing {type(sink).__name__} failed: {err}", file=sys.stderr)
        self.sinks = []


def tensorboard_available() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or a broken tensorboard/protobuf install
        return False
    return True


def build_sinks(cfg: TrainConfig, enabled: bool = True) -> MetricSinks:
    """The sinks `cfg` asks for that can run here (none on ranks other than 0)."""
    sinks = []
    if not enabled:
        return MetricSinks(sinks)
    if cfg.tensorboard and tensorboard_available():
        try:
            sinks.append(TensorBoardSink(os.path.join(cfg.out_dir, "tensorboard"), cfg))
        except Exception as err:  # noqa: BLE001
            print(f"megamoe: TensorBoard logging disabled: {err}", file=sys.stderr)
    if cfg.wandb_project:
        try:
            sinks.append(WandbSink(cfg))
        except ImportError:
            print("megamoe: wandb_project is set but wandb is not installed (pip install wandb); "
                  "W&B logging disabled", file=sys.stderr)
        except Exception as err:  # noqa: BLE001 - e.g. not logged in, offline
            print(f"megamoe: W&B logging disabled: {err}", file=sys.stderr)
    return MetricSinks(sinks)
