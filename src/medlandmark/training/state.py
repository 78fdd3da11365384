"""What training changes step by step, in one object: :class:`TrainState`, saved and restored whole."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from medlandmark.console import info
from medlandmark.records.plan import Plan
from medlandmark.records.run import RunSettings
from medlandmark.records.weights import load_checkpoint, save_checkpoint, unwrap
from medlandmark.training.optimization import build_optimizer, build_scheduler

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


@dataclass
class TrainingClock:
    """Seconds spent training (steps, validations, checkpoints), across resumptions, against an
    optional time budget."""

    budget_s: float | None = None
    seconds: float = 0.0

    def used_share(self) -> float:
        """The share of the budget used, 0 to 1."""
        return min(1.0, self.seconds / self.budget_s)

    @property
    def out_of_time(self) -> bool:
        return self.budget_s is not None and self.seconds >= self.budget_s


@dataclass
class TrainState:
    """The network, its optimiser, schedule, fp16 gradient scaler and moving average, and the
    number of steps taken."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: torch.optim.swa_utils.AveragedModel | None
    clock: TrainingClock = field(default_factory=TrainingClock)
    step: int = 0

    @classmethod
    def create(
        cls,
        model: nn.Module,
        settings: RunSettings,
        amp_dtype: torch.dtype | None,
        time_budget_s: float | None = None,
    ) -> TrainState:
        """A fresh state for ``model``: the settings' optimiser, warm-up then the planned decay
        (over the steps, or over ``time_budget_s`` seconds of training when given), a gradient
        scaler that is active under fp16 only, and an EMA when ``settings.ema_decay`` is set."""
        optimizer = build_optimizer(
            model,
            settings.optimizer,
            settings.learning_rate,
            settings.weight_decay,
            settings.sgd_momentum,
            settings.adam_betas,
        )
        total = total_steps(settings)
        warmup = warmup_steps(settings)
        clock = TrainingClock(time_budget_s)
        used_share = clock.used_share if time_budget_s is not None else None
        decay_epochs = (total - warmup) / settings.iterations_per_epoch
        scheduler = build_scheduler(
            optimizer, total, warmup, settings.schedule, used_share, decay_epochs
        )
        device_type = next(model.parameters()).device.type
        scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == torch.float16)
        return cls(model, optimizer, scheduler, scaler, _ema(model, settings.ema_decay), clock)

    def kept_weights(self) -> nn.Module:
        """The network whose weights are kept: the moving average when there is one."""
        return self.ema.module if self.ema is not None else unwrap(self.model)

    def save(self, path: Path, plan: Plan) -> None:
        """Everything needed to continue, atomically, with the random generators' states."""
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        state = {
            "step": self.step,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": cuda_rng,
            "seconds": self.clock.seconds,
            "plan": plan.model_dump_json(),
        }
        save_checkpoint(path, state)

    def restore(self, path: Path, device: torch.device) -> None:
        """Continue from the checkpoint at ``path`` (read without executing code)."""
        state = load_checkpoint(path, map_location=device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when saved without fp16: the scaler then starts afresh
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        self.step = int(state["step"])
        self.clock.seconds = float(state.get("seconds", 0.0))  # absent before time budgets
        info(f"resumed from {path} at step {self.step}")


def total_steps(settings: RunSettings) -> int:
    """Steps of the whole schedule."""
    return settings.epochs * settings.iterations_per_epoch


def warmup_steps(settings: RunSettings) -> int:
    """Steps of linear warm-up: ``warmup_share`` of the run when set (a paper's), else the
    plan's warm-up epochs, at most a tenth of the run."""
    total = total_steps(settings)
    if settings.warmup_share is not None:
        return round(settings.warmup_share * total)
    return min(settings.warmup_epochs * settings.iterations_per_epoch, total // 10)


def mixed_precision(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 where supported (CUDA) by default, fp16 or none on request."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    if amp not in AMP_DTYPES:
        raise ValueError(f"unknown amp '{amp}' (use auto, {', '.join(AMP_DTYPES)})")
    return AMP_DTYPES[amp]


def _ema(model: nn.Module, decay: float | None) -> torch.optim.swa_utils.AveragedModel | None:
    if decay is None:
        return None
    average = torch.optim.swa_utils.get_ema_multi_avg_fn(decay)
    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=average)
