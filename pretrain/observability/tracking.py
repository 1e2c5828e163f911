"""Experiment trackers a MetricLogger can also write to: Weights & Biases and TensorBoard.

Both are off unless the config turns them on (`logging.wandb.mode`, `logging.tensorboard`), so
no metric leaves the machine unless a user asked for it; `offline` wandb runs stay in
out_dir/wandb/ until `wandb sync`. A restarted job logs into the same wandb run: its id is kept
in out_dir/wandb_run_id."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pretrain.errors import PretrainError
from pretrain.resilience.atomic_dir import write_file

if TYPE_CHECKING:
    from pretrain.config.schema import Config

log = logging.getLogger("pretrain")

WANDB_RUN_ID_FILE = "wandb_run_id"


def flatten(record: dict, prefix: str = "") -> dict[str, float]:
    """Numbers of a (nested) metric record under slash-joined keys: mix_share/web."""
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


class WandbSink:
    """Logs every record to a wandb run at its step; resumes the run of this out_dir.

    With `prefix` (an evaluation job beside the training job) the keys get that prefix and their
    own step axis, `<prefix>step`: wandb accepts no step lower than the run's latest on its main
    axis, and the checkpoints being evaluated are behind the training."""

    def __init__(self, out_dir: str, project: str, entity: str | None,
                 mode: Literal["disabled", "offline", "online"], name: str | None, config: dict | None = None,
                 prefix: str = ""):
        try:
            import wandb
        except ImportError:
            raise PretrainError("logging.wandb.mode needs the wandb package: pip install wandb, or set "
                                "--logging.wandb.mode=disabled") from None
        id_file = Path(out_dir) / WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(8)
        write_file(id_file, run_id + "\n")
        # wandb's usage analytics follow its process-wide mode, not init's: without this an offline
        # run still contacts wandb's servers at exit.
        wandb.setup(settings=wandb.Settings(mode=mode))
        self.run = wandb.init(project=project, entity=entity, mode=mode, id=run_id, resume="allow", dir=out_dir,
                              name=name or Path(out_dir).resolve().name, config=config,
                              settings=wandb.Settings(silent=True, console="off"))
        self.prefix = prefix
        if prefix:
            self.run.define_metric(f"{prefix}*", step_metric=f"{prefix}step")
        log.info("wandb run %s (%s) in %s", run_id, mode, Path(out_dir) / "wandb")

    def write(self, record: dict) -> None:
        values = flatten({k: v for k, v in record.items() if k != "step"})
        if values and self.prefix:
            self.run.log({f"{self.prefix}{k}": v for k, v in {**values, "step": record["step"]}.items()})
        elif values:
            self.run.log(values, step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


class TensorBoardSink:
    """Scalars into out_dir/tensorboard/ for `tensorboard --logdir`."""

    def __init__(self, out_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise PretrainError("logging.tensorboard=true needs the tensorboard package: pip install tensorboard, "
                                "or set --logging.tensorboard=false") from None
        self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def write(self, record: dict) -> None:
        for key, value in flatten({k: v for k, v in record.items() if k != "step"}).items():
            self.writer.add_scalar(key, value, global_step=int(record["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def run_trackers(cfg: Config) -> list[WandbSink | TensorBoardSink]:
    """The trackers a training run writes to, as `cfg.logging` turns them on (none by default)."""
    trackers: list[WandbSink | TensorBoardSink] = []
    wandb = wandb_sink(cfg)
    if wandb is not None:
        trackers.append(wandb)
    if cfg.logging.tensorboard:
        trackers.append(TensorBoardSink(cfg.out_dir))
    return trackers


def wandb_sink(cfg: Config, out_dir: str | None = None, prefix: str = "") -> WandbSink | None:
    """The wandb run that `cfg.logging.wandb` asks for, None when it is disabled: the training's own
    in cfg.out_dir, holding the config; with `prefix`, an evaluation job's records under that prefix
    in the training's run, whose out_dir as the job sees it is `out_dir`."""
    w = cfg.logging.wandb
    if w.mode == "disabled":
        return None
    config = None
    if not prefix:  # an evaluation job leaves the training's config as it is
        from pretrain.config.parse import to_dict

        config = to_dict(cfg)
    return WandbSink(out_dir or cfg.out_dir, w.project, w.entity, w.mode, w.name, config, prefix)
