"""The training loop: one short function over small helpers.

A run folder holds ``run.json`` (what was trained, on what, and how it went),
``checkpoint_latest.pt`` (everything needed to continue), ``model_best.safetensors`` and
``model_final.safetensors`` (weights for prediction), ``log.csv`` and ``training_curve.png``.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from medlandmark.augment import (
    AugmentConfig,
    augment_batch,
    left_right_axis,
    symmetric_pair_indices,
)
from medlandmark.console import ProgressBar, info, warn
from medlandmark.datasets.dataset import Dataset
from medlandmark.errors import MedlandmarkError, validation_problems
from medlandmark.heatmaps import calibrate_presence_threshold, deep_supervision_targets
from medlandmark.io.files import atomic_write_bytes, atomic_write_text, remove_partials
from medlandmark.io.geometry import index_to_world
from medlandmark.models import build_model, channels_last
from medlandmark.planning import load_plan, preprocessed_folder
from medlandmark.preprocessing import cache_folder, load_cached_case
from medlandmark.shape_model import fit_shape_model
from medlandmark.training import distributed
from medlandmark.training.checkpoint import load_checkpoint, save_checkpoint, save_weights, unwrap
from medlandmark.training.losses import HEATMAP_LOSSES, heatmap_loss
from medlandmark.training.optimization import build_optimizer, build_scheduler
from medlandmark.training.run_record import RUN_FILE, read_run_record
from medlandmark.training.sampling import PatchSampler
from medlandmark.training.validation import validate

CHECKPOINT_FILE = "checkpoint_latest.pt"
BEST_WEIGHTS = "model_best.safetensors"
FINAL_WEIGHTS = "model_final.safetensors"
LOG_FILE = "log.csv"
CROP_MARGIN = 1.5  # source crops are larger than the patch so rotations bring in image, not zeros
MIN_LOSS_SCALE = 2.0**-10  # fp16: below this, skipping steps no longer rescues the run
FINE_OFFSET_SD_PATCH_FRACTION = 6.0  # fine-patch offsets: SD at most patch / 6 per axis
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
LOG_COLUMNS = ["epoch", "step", "train_loss", "learning_rate", "samples_per_s", "val_mre_mm", "val_sdr_2mm", "seconds"]


class TrainingError(MedlandmarkError):
    """Training cannot go on (non-finite loss, incompatible resume, no cases...)."""


@dataclass
class TrainOptions:
    """What the command line can change; None means "as the plan says"."""

    configuration: str | None = None
    arch: str = "unet"
    fold: int | str = 0
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    validate_every: int | None = None
    max_steps: int | None = None
    device: str = "auto"
    seed: int = 0
    deterministic: bool = False
    amp: str = "auto"
    ema_decay: float | None = None
    missing_target: str | None = None
    loss: str | None = None
    preprocessed: str | None = None
    coarse_run: str | None = None
    augment: dict = field(default_factory=dict)


def train(dataset_root: str | Path, run_dir: str | Path, options: TrainOptions, resume: bool = False) -> dict:
    """Train one network on one fold; returns the run summary (also in ``run.json``)."""
    with _deterministic_algorithms(options.deterministic), _signal_handlers_restored(), _os_errors_explained(run_dir):
        return _train(dataset_root, run_dir, options, resume)


def _train(dataset_root: str | Path, run_dir: str | Path, options: TrainOptions, resume: bool) -> dict:
    run_dir, dataset = Path(run_dir), Dataset(dataset_root)
    device = _device(options.device)
    context = distributed.start(device)
    plan = load_plan(preprocessed_folder(dataset_root, options.preprocessed))
    name = options.configuration or plan["default_configuration"]
    if name not in plan["configurations"]:
        plans_path = preprocessed_folder(dataset_root, options.preprocessed) / "plans.json"
        raise TrainingError(f"no configuration '{name}' in the plan (it has {', '.join(plan['configurations'])})", plans_path)
    config, settings = plan["configurations"][name], _settings(plan, options)
    augment = _augment_config(options.augment)
    train_ids, val_ids = fold_case_ids(dataset, options.fold, settings["folds"], options.seed)
    folder = cache_folder(preprocessed_folder(dataset_root, options.preprocessed), config)
    train_cases = [load_cached_case(folder, c) for c in train_ids]
    val_cases = [load_cached_case(folder, c) for c in val_ids]
    torch.manual_seed(options.seed)  # the same initial weights on every rank and every rerun
    model = build_model(options.arch, config, len(plan["landmarks"]), len(plan["modalities"])).to(device)
    model = channels_last(model, plan["spatial_dims"])
    optimizer = build_optimizer(model, settings["optimizer"], settings["learning_rate"], settings["weight_decay"], settings["sgd_momentum"])
    total_steps = settings["epochs"] * settings["iterations_per_epoch"]
    warmup_steps = min(settings["warmup_epochs"] * settings["iterations_per_epoch"], total_steps // 10)
    scheduler = build_scheduler(optimizer, total_steps, warmup_steps, settings["schedule"])
    amp_dtype, scaler = _mixed_precision(options.amp, device)
    ema = _ema(model, settings["ema_decay"])
    record = _run_record(run_dir, dataset, plan, name, options, settings, train_ids, val_ids, resume)
    if "shape_model" not in record:  # runs from before it had one get it on resumption
        record["shape_model"] = _shape_model(train_cases)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_record(run_dir, record, context)
    step, best = 0, record.get("best", {})
    if resume:
        step = _resume_step(run_dir, context, model, optimizer, scheduler, scaler, ema, device)
    if context.distributed:
        model = nn.parallel.DistributedDataParallel(model)
    sampler = PatchSampler(
        train_cases, [math.ceil(p * CROP_MARGIN) for p in config["patch_size"]], settings["landmark_fraction"],
        _fine_offset_sd(config, plan, options.coarse_run) if config["stage"] == "fine" else None,
        options.seed, context.rank,
    )  # fmt: skip
    pairs = symmetric_pair_indices(dataset.spec.landmarks, dataset.spec.symmetric_pairs)
    mirror_axis = left_right_axis(train_cases[0].geometry)
    per_rank_batch = max(1, settings["batch_size"] // context.world_size)
    last_step = min(total_steps, options.max_steps or total_steps)
    stop = _StopRequest()
    losses, started = [], time.perf_counter()
    with ProgressBar(last_step, f"train {options.arch} {name}", completed=step) as bar:
        while step < last_step:
            loss, gradient_norm = _train_step(
                model, optimizer, scaler, sampler, step, per_rank_batch, config, augment, pairs,
                mirror_axis, amp_dtype, settings, device, options.seed, context.rank,
            )  # fmt: skip
            problem = _non_finite(loss, gradient_norm, scaler)
            if problem:
                _save(run_dir, context, model, optimizer, scheduler, scaler, ema, step, plan)
                raise TrainingError(
                    f"{problem} in step {step + 1}; training stopped before the weights were changed. "
                    f"The last good state (after step {step}) is saved in {run_dir / CHECKPOINT_FILE}; "
                    "--resume continues from it (a lower --lr, or --amp bf16/off, may avoid this)"
                )  # fmt: skip
            scheduler.step()
            if ema is not None:
                ema.update_parameters(unwrap(model))
            step += 1
            losses.append(loss)
            rate = len(losses) * per_rank_batch * context.world_size / (time.perf_counter() - started)
            bar.update(1, loss=loss, lr=scheduler.get_last_lr()[0], samples_per_s=rate)
            epoch_done = step % settings["iterations_per_epoch"] == 0 or step == last_step
            if epoch_done:
                epoch = math.ceil(step / settings["iterations_per_epoch"])
                row = {"epoch": epoch, "step": step, "train_loss": float(np.mean(losses)), "learning_rate": scheduler.get_last_lr()[0], "samples_per_s": rate}
                if val_cases and (epoch % settings["validate_every"] == 0 or step == last_step) and context.is_main:
                    best = _validate_and_keep_best(run_dir, _weights_of(model, ema), val_cases, config, device, amp_dtype, row, best, record, step)
                if context.is_main:  # logged first: a kill before the checkpoint redoes (and relogs) the epoch
                    _log(run_dir, {**row, "seconds": time.perf_counter() - started})
                _save(run_dir, context, model, optimizer, scheduler, scaler, ema, step, plan)
                losses, started = [], time.perf_counter()
            if distributed.broadcast_flag(stop.requested is not None, context):
                _save(run_dir, context, model, optimizer, scheduler, scaler, ema, step, plan)
                record.update(status="interrupted", step=step)
                _write_record(run_dir, record, context)
                stop.restore()
                distributed.stop(context)
                info(f"stopped at step {step} ({stop.requested}); resume with --resume")
                return record
    stop.restore()
    finished = step >= total_steps
    if context.is_main:
        save_weights(run_dir / FINAL_WEIGHTS, _weights_of(model, ema))
        if not val_cases:
            save_weights(run_dir / BEST_WEIGHTS, _weights_of(model, ema))
        _plot_curves(run_dir)
    record.update(status="finished" if finished else "stopped", step=step, best=best)
    if context.distributed:  # DDP keeps replicas equal; record the evidence
        checksum = float(sum(p.detach().double().sum() for p in unwrap(model).parameters()))
        record["weight_checksum_per_rank"] = distributed.gather(checksum, context)
    _write_record(run_dir, record, context)
    distributed.stop(context)
    return record


def _train_step(
    model: nn.Module, optimizer, scaler, sampler: PatchSampler, step: int, batch_size: int,
    config: dict, augment: AugmentConfig, pairs, mirror_axis, amp_dtype, settings: dict,
    device: torch.device, seed: int, rank: int,
) -> tuple[float, float]:
    """One optimisation step on ``batch_size`` augmented patches; returns the loss and the
    gradient norm (NaN when the loss was not finite and nothing was computed)."""
    crops = sampler.batch(step, batch_size)
    images = torch.from_numpy(np.stack([c.image for c in crops])).to(device)
    points = torch.from_numpy(np.stack([c.points for c in crops])).float().to(device)
    generator = torch.Generator(device=device).manual_seed(_step_seed(seed, rank, step))
    images, points = augment_batch(images, points, config["patch_size"], augment, generator, pairs, mirror_axis)
    images = channels_last(images, images.ndim - 2)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        outputs = model(images)
    loss = heatmap_training_loss(unwrap(model), outputs, points, config, settings)
    if not torch.isfinite(loss):
        return float(loss.item()), math.nan
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    gradient_norm = float(nn.utils.clip_grad_norm_(model.parameters(), settings["grad_clip"]))
    if not math.isfinite(gradient_norm) and not scaler.is_enabled():
        return float(loss.item()), gradient_norm  # not applied: the weights would turn NaN
    scaler.step(optimizer)  # fp16: skips a step whose gradients overflowed and lowers the scale
    scaler.update()
    return float(loss.item()), gradient_norm


def _non_finite(loss: float, gradient_norm: float, scaler: torch.amp.GradScaler) -> str | None:
    """What went non-finite in a step, or None; overflowing fp16 gradients are the scaler's job."""
    if not math.isfinite(loss):
        return f"the loss became {loss}"
    if not math.isfinite(gradient_norm) and not scaler.is_enabled():
        return f"the gradient norm became {gradient_norm} (loss {loss:.4g})"
    if scaler.is_enabled() and scaler.get_scale() < MIN_LOSS_SCALE:
        return f"the fp16 loss scale fell to {scaler.get_scale():.2g} (the gradients overflow at every step)"
    return None


def heatmap_training_loss(model: nn.Module, outputs: Sequence[torch.Tensor], points: torch.Tensor, config: dict, settings: dict) -> torch.Tensor:
    """Weighted sum over the network's outputs of the heatmap loss against targets drawn on the
    device at each output's resolution (same sigma in mm: sigma in voxels / stride)."""
    weights = np.asarray(model.output_weights, dtype=np.float64)
    weights = weights / weights.sum()
    sigma = np.asarray(config["heatmap_sigma_voxels"], dtype=np.float64)
    sigmas = model.output_sigma_voxels(sigma) if hasattr(model, "output_sigma_voxels") else [sigma / np.asarray(s) for s in model.output_strides]
    shapes = [output.shape[2:] for output in outputs]
    targets, present = deep_supervision_targets(points, shapes, model.output_strides, sigmas)
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for output, target, weight in zip(outputs, targets, weights, strict=True):
        total = total + float(weight) * heatmap_loss(output, target, present, settings["loss"], settings["missing_target"])
    return total


def fold_case_ids(dataset: Dataset, fold: int | str, folds: int, seed: int) -> tuple[list[str], list[str]]:
    """Training and validation cases: the ``train`` split (or every case) in ``folds`` folds,
    shuffled by a fixed seed; fold ``"all"`` trains on everything without validation."""
    splits = dataset.splits()
    cases = sorted(splits.get("train", dataset.case_ids))
    if len(cases) < 1:
        raise TrainingError("the dataset has no training cases", dataset.root)
    if fold == "all":
        return cases, []
    order = np.random.default_rng(12345).permutation(len(cases))
    val = sorted(cases[i] for i in order[int(fold) :: folds])
    if not val or len(val) == len(cases):
        raise TrainingError(f"fold {fold} of {folds} leaves no training or no validation case ({len(cases)} cases)")
    return [c for c in cases if c not in val], val


def _settings(plan: dict, options: TrainOptions) -> dict:
    settings = dict(plan["training"])
    learning_rate = settings["learning_rate"]
    settings["learning_rate"] = learning_rate[options.arch] if isinstance(learning_rate, dict) else learning_rate
    config = plan["configurations"][options.configuration or plan["default_configuration"]]
    settings["batch_size"] = config["batch_size"]
    for key in ("epochs", "iterations_per_epoch", "batch_size", "learning_rate", "validate_every", "ema_decay", "missing_target", "loss"):
        value = getattr(options, key)
        if value is not None:
            settings[key] = value
    if settings["loss"] not in HEATMAP_LOSSES:
        raise TrainingError(f"unknown loss '{settings['loss']}' (use {', '.join(HEATMAP_LOSSES)})")
    return settings


def _shape_model(cases) -> dict | None:
    """The training landmarks' constellation (:mod:`medlandmark.shape_model`), for ``run.json``."""
    model = fit_shape_model([index_to_world(c.landmarks_index, c.geometry) for c in cases])
    return None if model is None else model.to_dict()


def _augment_config(overrides: dict) -> AugmentConfig:
    """The augmentation with ``overrides`` (names of :class:`AugmentConfig`), or a TrainingError."""
    try:
        return AugmentConfig(**overrides)
    except ValidationError as error:
        raise TrainingError(f"bad augmentation setting: {validation_problems(error, 'augment')}") from None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


@contextlib.contextmanager
def _os_errors_explained(run_dir: str | Path):
    """An operating-system error (a full disk, permissions) as a TrainingError naming its file
    (or the run folder, when the error names none)."""
    try:
        yield
    except OSError as error:
        hint = "; the last checkpoint is intact: free some space, then --resume" if error.errno == errno.ENOSPC else ""
        raise TrainingError(f"{error.strerror or error}{hint}", error.filename or run_dir) from error


@contextlib.contextmanager
def _signal_handlers_restored():
    """SIGINT/SIGTERM handlers as they were, also when training fails (Ctrl-C works again)."""
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):  # other threads; handlers set outside Python
                signal.signal(number, handler)


@contextlib.contextmanager
def _deterministic_algorithms(enabled: bool):
    """Deterministic kernels for the run (``--deterministic``), the previous setting restored."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark = previous[1]


def _mixed_precision(amp: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """bf16 autocast where supported (CUDA) by default; fp16 with a gradient scaler on request."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    if amp not in AMP_DTYPES:
        raise TrainingError(f"unknown amp '{amp}' (use auto, {', '.join(AMP_DTYPES)})")
    dtype = AMP_DTYPES[amp]
    return dtype, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def _ema(model: nn.Module, decay: float | None):
    if decay is None:
        return None
    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay))


def _weights_of(model: nn.Module, ema) -> nn.Module:
    """The network whose weights are kept: the moving average when there is one."""
    return ema.module if ema is not None else unwrap(model)


def _step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.default_rng([seed, rank, step, 7]).integers(2**62))


def _fine_offset_sd(config: dict, plan: dict, coarse_run: str | None) -> list[float]:
    """Offsets of fine patches from their landmark, in fine voxels per axis: the coarse stage's
    measured validation error (RMS per axis) when its run is given, else two coarse voxels; at
    most a sixth of the fine patch, so that the landmark stays inside nearly every patch (a
    coarse estimate further off than half a patch cannot be refined anyway)."""
    coarse = plan["configurations"][config["previous_stage"]]
    sd_coarse_voxels = [2.0] * len(config["spacing_mm"])
    if coarse_run is not None:
        record = read_run_record(coarse_run)
        measured = record.get("best", {}).get("error_sd_voxels")
        if record.get("configuration") != config["previous_stage"] or measured is None:
            raise TrainingError(f"{coarse_run} is not a validated run of {config['previous_stage']}")
        sd_coarse_voxels = measured
    else:
        info("fine stage: no --coarse-run given; patch offsets assume a coarse error of 2 voxels")
    sd_fine_voxels = [s * c / f for s, c, f in zip(sd_coarse_voxels, coarse["spacing_mm"], config["spacing_mm"], strict=True)]
    limit = [p / FINE_OFFSET_SD_PATCH_FRACTION for p in config["patch_size"]]
    if any(s > m for s, m in zip(sd_fine_voxels, limit, strict=True)):
        info(f"fine stage: the coarse error ({_voxels(sd_fine_voxels)} fine voxels RMS) exceeds a sixth of the patch; offsets limited to {_voxels(limit)}")
    return [min(s, m) for s, m in zip(sd_fine_voxels, limit, strict=True)]


def _voxels(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.1f}" for v in values)


def _run_record(run_dir: Path, dataset: Dataset, plan: dict, name: str, options: TrainOptions, settings: dict, train_ids, val_ids, resume: bool) -> dict:
    path = run_dir / RUN_FILE
    if resume:
        if not path.is_file():
            raise TrainingError("nothing to resume: no run.json", run_dir)
        record = read_run_record(run_dir)
        if record["arch"] != options.arch or record["configuration"] != name:
            raise TrainingError(f"the run trained {record['arch']} on {record['configuration']}; cannot resume it as {options.arch} on {name}", path)
        return record
    if (run_dir / CHECKPOINT_FILE).exists():
        raise TrainingError("this run folder already holds a training; use --resume or another folder", run_dir)
    return {
        "version": 1, "status": "training", "dataset": plan["dataset"], "dataset_path": str(dataset.root.resolve()),
        "arch": options.arch, "configuration": name, "fold": options.fold, "plan": plan,
        "landmarks": plan["landmarks"], "symmetric_pairs": dataset.spec.symmetric_pairs,
        "spacing_mm": dataset.spec.spacing_mm,
        "train_cases": train_ids, "val_cases": val_ids, "settings": settings, "options": asdict(options),
    }  # fmt: skip


def _write_record(run_dir: Path, record: dict, context=None) -> None:
    """run.json, atomically; under DDP only rank 0 writes."""
    if context is None or context.is_main:
        atomic_write_text(run_dir / RUN_FILE, json.dumps(record, indent=1, default=float) + "\n")


def _save(run_dir: Path, context, model, optimizer, scheduler, scaler, ema, step: int, plan: dict) -> None:
    """Everything needed to continue, atomically (rank 0 only)."""
    if context.is_main:
        state = {
            "step": step, "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "ema": None if ema is None else ema.state_dict(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "plan": json.dumps(plan),
        }  # fmt: skip
        save_checkpoint(run_dir / CHECKPOINT_FILE, state)
    distributed.barrier(context)


def _resume_step(run_dir: Path, context, model, optimizer, scheduler, scaler, ema, device) -> int:
    """The step to continue from: the checkpoint's, or 0 when the run was stopped before its
    first one (the fresh start is the same as the original's); stale partial files are removed."""
    if context.is_main:
        for name in (CHECKPOINT_FILE, BEST_WEIGHTS, FINAL_WEIGHTS, RUN_FILE, LOG_FILE):
            remove_partials(run_dir / name)
    if not (run_dir / CHECKPOINT_FILE).is_file():
        info(f"{run_dir} has no checkpoint yet: starting from step 0")
        return 0
    return _restore(run_dir / CHECKPOINT_FILE, model, optimizer, scheduler, scaler, ema, device)


def _restore(path: Path, model, optimizer, scheduler, scaler, ema, device) -> int:
    state = load_checkpoint(path, map_location=device)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty when saved without fp16: the scaler then starts afresh
        scaler.load_state_dict(state["scaler"])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])
    torch.set_rng_state(state["torch_rng"].cpu())
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    info(f"resumed from {path} at step {state['step']}")
    return int(state["step"])


def _validate_and_keep_best(run_dir, model, val_cases, config, device, amp_dtype, row: dict, best: dict, record: dict, step: int) -> dict:
    result = validate(model, val_cases, config["patch_size"], device, amp_dtype=amp_dtype)
    row["val_mre_mm"], row["val_sdr_2mm"] = result["mre_mm"], result["sdr"].get("2.0")
    if result["mre_mm"] is not None and result["mre_mm"] < best.get("val_mre_mm", math.inf):
        best = {"val_mre_mm": result["mre_mm"], "val_sdr": result["sdr"], "step": step, "error_sd_voxels": result["error_sd_voxels"]}
        save_weights(run_dir / BEST_WEIGHTS, model)
        record["presence_threshold"] = calibrate_presence_threshold(result["peaks"], result["truly_present"])
        record["best"] = best
        _write_record(run_dir, record)
    info(f"step {step}: validation MRE {result['mre_mm']:.3f} mm, SDR@2mm {result['sdr'].get('2.0')}%")
    return best


def _log(run_dir: Path, row: dict) -> None:
    path = run_dir / LOG_FILE
    rows = list(csv.DictReader(path.open())) if path.is_file() else []
    rows = [r for r in rows if int(r["step"]) < row["step"]] + [{k: row.get(k, "") for k in LOG_COLUMNS}]
    out = io.StringIO()
    writer = csv.DictWriter(out, LOG_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())


def _plot_curves(run_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader((run_dir / LOG_FILE).open())) if (run_dir / LOG_FILE).is_file() else []
    if not rows:
        return
    figure, loss_axis = plt.subplots(figsize=(7, 4))
    losses = [float(r["train_loss"]) for r in rows]
    loss_axis.plot([int(r["step"]) for r in rows], losses, label="training loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    if min(losses) > 0:
        loss_axis.set_yscale("log")
    validated = [r for r in rows if r["val_mre_mm"]]
    if validated:
        mre_axis = loss_axis.twinx()
        mre_axis.plot([int(r["step"]) for r in validated], [float(r["val_mre_mm"]) for r in validated], "o-", color="tab:red", label="validation MRE")
        mre_axis.set_ylabel("validation MRE (mm)")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic_write_bytes(run_dir / "training_curve.png", buffer.getvalue())


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves and stops at the next step boundary."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous = {}
        for number in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # only the main thread may install handlers
                self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number, _frame) -> None:
        if self.requested is not None:
            warn("second interrupt: stopping now")
            raise KeyboardInterrupt
        self.requested = signal.Signals(number).name
        warn(f"{self.requested}: finishing this step and saving a checkpoint")

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
