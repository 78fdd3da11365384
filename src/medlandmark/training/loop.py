"""The training loop: a few named steps over a :class:`TrainState` and small helpers.

A run folder holds ``run.json`` (what was trained, on what, and how it went),
``checkpoint_latest.pt`` (everything needed to continue), ``model_best.safetensors`` and
``model_final.safetensors`` (weights for prediction), ``log.csv`` and ``training_curve.png``.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import gc
import io
import math
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medlandmark import metrics
from medlandmark.augment import AugmentConfig
from medlandmark.console import ProgressBar, info, warn
from medlandmark.datasets.dataset import Dataset
from medlandmark.device import device_memory_gb, select_device
from medlandmark.heatmaps import (
    bump_radius_voxels,
    calibrate_presence_threshold,
    confidence_of,
    deep_supervision_targets,
    points_at_stride,
    radius_bump_heatmaps,
    relative_confidences,
)
from medlandmark.io.files import atomic_write_bytes, atomic_write_text, remove_partials
from medlandmark.io.geometry import index_to_world, left_right_axis
from medlandmark.io.landmarks import symmetric_pair_indices
from medlandmark.models import channels_last, load_run_network, network_for
from medlandmark.planning import PLANS_FILE, load_plan, preprocessed_folder
from medlandmark.preprocessing import CachedCase, cache_folder, load_cached_case
from medlandmark.records.plan import Configuration, Plan
from medlandmark.records.run import (
    BEST_WEIGHTS,
    CHECKPOINT_FILE,
    FINAL_WEIGHTS,
    LOG_FILE,
    RUN_FILE,
    TRAINING_CURVE_FILE,
    BestValidation,
    RunRecord,
    RunSettings,
    ShapeModelRecord,
    read_run_record,
    write_run_record,
)
from medlandmark.records.weights import save_weights, unwrap
from medlandmark.shape_model import ShapeModel, fit_shape_model
from medlandmark.training import distributed
from medlandmark.training.batches import AugmentedBatches
from medlandmark.training.init_from import initial_run, load_initial_weights
from medlandmark.training.losses import heatmap_loss
from medlandmark.training.options import (
    TrainingError,
    TrainOptions,
    augment_config,
    check_batch_fits,
    run_settings,
)
from medlandmark.training.sampling import PatchSampler
from medlandmark.training.state import TrainState, mixed_precision, total_steps
from medlandmark.training.validation import (
    Validation,
    coarse_estimates_index,
    validate,
    validate_fine,
)
from medlandmark.verdict import case_evidence, verdict_thresholds

__all__ = ["TrainOptions", "TrainingError", "fold_case_ids", "train"]

CROP_MARGIN = 1.5  # source crops are larger than the patch so rotations bring in image, not zeros
MIN_LOSS_SCALE = 2.0**-10  # fp16: below this, skipping steps no longer rescues the run
FINE_OFFSET_SD_PATCH_FRACTION = 6.0  # fine-patch offsets: SD at most patch / 6 per axis
FOLD_SEED = 12345  # seed 0 splits as every run before the seed was honoured
LOG_COLUMNS = [
    "epoch",
    "step",
    "train_loss",
    "learning_rate",
    "samples_per_s",
    "val_mre_mm",
    "val_sdr_2mm",
    "seconds",
]


@dataclass
class _Epoch:
    """The losses of the steps since the last epoch boundary, and when it began."""

    losses: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)


@dataclass
class _Run:
    """Everything one training run works with."""

    run_dir: Path
    plan: Plan
    configuration: Configuration
    options: TrainOptions
    settings: RunSettings  # the plan's with this command's changes (also on --resume)
    record: RunRecord
    state: TrainState
    batches: AugmentedBatches
    val_cases: list[CachedCase]
    device: torch.device
    amp_dtype: torch.dtype | None
    context: distributed.Context
    epoch: _Epoch = field(default_factory=_Epoch)
    fine_centres: list[np.ndarray] | None = None  # a fine stage's patch centres in validation

    @property
    def per_rank_batch(self) -> int:
        return max(1, self.settings.batch_size // self.context.world_size)

    @property
    def last_step(self) -> int:
        total = total_steps(self.settings)
        return min(total, self.options.max_steps or total)


def train(
    dataset_root: str | Path, run_dir: str | Path, options: TrainOptions, resume: bool = False
) -> RunRecord:
    """Train one network on one fold; returns the run record (also in ``run.json``)."""
    with (
        _deterministic_algorithms(options.deterministic),
        _signal_handlers_restored(),
        _os_errors_explained(run_dir),
    ):
        finished = _already_finished(Path(run_dir)) if resume else None
        if finished is not None:
            return finished
        run = _start(Path(dataset_root), Path(run_dir), options, resume)
        stop = _StopRequest()
        with ProgressBar(
            run.last_step,
            f"train {options.arch} {run.configuration.name}",
            completed=run.state.step,
        ) as bar:
            while run.state.step < run.last_step and not run.state.clock.out_of_time:
                _take_step(run, bar)
                if distributed.broadcast_flag(stop.requested is not None, run.context):
                    return _interrupt(run, stop)
        stop.restore()
        return _finish(run)


def _start(dataset_root: Path, run_dir: Path, options: TrainOptions, resume: bool) -> _Run:
    """Load the plan and the cached cases, build (or restore) the state, write ``run.json``."""
    dataset = Dataset(dataset_root)
    device = select_device(options.device)
    context = distributed.start(device)
    preprocessed = preprocessed_folder(dataset_root, options.preprocessed)
    plan = load_plan(preprocessed)
    try:
        configuration = plan.configuration(options.configuration)
    except KeyError as error:
        raise TrainingError(error.args[0], preprocessed / PLANS_FILE) from None
    options = replace(options, configuration=configuration.name)
    if options.coarse_run is not None and configuration.stage != "fine":
        raise TrainingError(
            f"--coarse-run is for a cascade's fine stage; {configuration.name} is a "
            f"{configuration.stage} stage"
        )
    settings = run_settings(plan, options)
    augment = augment_config(options.augment)  # refused before anything is written
    amp_dtype = _amp_dtype(options.amp, device)
    check_batch_fits(configuration, settings, len(plan.landmarks), device_memory_gb(device))
    train_ids, val_ids = fold_case_ids(dataset, options.fold, settings.folds, options.seed)
    folder = cache_folder(preprocessed, configuration)
    train_cases = [load_cached_case(folder, c) for c in train_ids]
    val_cases = [load_cached_case(folder, c) for c in val_ids]
    starting = options
    if resume and (run_dir / CHECKPOINT_FILE).is_file():  # the checkpoint holds the weights
        starting = replace(options, init_from=None)
    state = _initial_state(plan, configuration, starting, settings, device, amp_dtype)
    record = _run_record(run_dir, dataset, plan, options, settings, (train_ids, val_ids), resume)
    if record.shape_model is None:  # runs from before it had one get it on resumption
        record.shape_model = _shape_model(train_cases)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_record(run_dir, record, context)
    if resume:
        _resume(run_dir, context, state, device)
    if context.distributed:
        state.model = nn.parallel.DistributedDataParallel(state.model)
    batches = _batches(
        train_cases, plan, configuration, dataset, options, settings, context, augment
    )
    return _Run(
        run_dir,
        plan,
        configuration,
        options,
        settings,
        record,
        state,
        batches,
        val_cases,
        device,
        amp_dtype,
        context,
        fine_centres=_fine_centres(configuration, options.coarse_run, val_cases, device),
    )


def _fine_centres(
    configuration: Configuration,
    coarse_run: str | None,
    val_cases: list[CachedCase],
    device: torch.device,
) -> list[np.ndarray] | None:
    """A fine stage's validation patch centres: its coarse stage's estimates, when it has one."""
    if configuration.stage != "fine":
        return None
    return coarse_estimates_index(coarse_run, val_cases, device)


def _initial_state(
    plan: Plan,
    configuration: Configuration,
    options: TrainOptions,
    settings: RunSettings,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> TrainState:
    """The network with the same initial weights on every rank and every rerun, and its state."""
    torch.manual_seed(options.seed)
    try:
        model = network_for(options.arch, configuration, len(plan.landmarks), len(plan.modalities))
    except ValueError as error:
        raise TrainingError(str(error)) from None
    if options.init_from is not None:
        source = initial_run(options.init_from, configuration.name)
        channels = len(plan.modalities)
        load_initial_weights(model, source, options.arch, configuration, plan.landmarks, channels)
    model = channels_last(model.to(device), plan.spatial_dims)
    return TrainState.create(model, settings, amp_dtype, options.time_budget_s)


def _batches(
    cases: list[CachedCase],
    plan: Plan,
    configuration: Configuration,
    dataset: Dataset,
    options: TrainOptions,
    settings: RunSettings,
    context: distributed.Context,
    augment: AugmentConfig,
) -> AugmentedBatches:
    """The run's batches: crops with room for rotation, landmark-centred as the plan says."""
    crop_size = [math.ceil(p * CROP_MARGIN) for p in configuration.patch_size]
    fine_offsets = None
    if configuration.stage == "fine":
        fine_offsets = _fine_offset_sd(configuration, plan, options.coarse_run)
    sampler = PatchSampler(
        cases, crop_size, settings.landmark_fraction, fine_offsets, options.seed, context.rank
    )
    return AugmentedBatches(
        sampler,
        configuration.patch_size,
        augment,
        spacing_mm=cases[0].geometry.spacing_mm,
        pairs=symmetric_pair_indices(dataset.spec.landmarks, dataset.spec.symmetric_pairs),
        mirror_axis=left_right_axis(cases[0].geometry),
        seed=options.seed,
        rank=context.rank,
    )


def _take_step(run: _Run, bar: ProgressBar) -> None:
    """One optimisation step; at an epoch's end (or when the time budget is spent) validation,
    the log line and a checkpoint. The time it takes counts against the budget."""
    state, started = run.state, time.perf_counter()
    loss, gradient_norm = train_step(run, state.step)
    problem = _non_finite(loss, gradient_norm, state.scaler)
    if problem:
        _save(run)
        raise TrainingError(
            f"{problem} in step {state.step + 1}; training stopped before the weights were "
            f"changed. The last good state (after step {state.step}) is saved in "
            f"{run.run_dir / CHECKPOINT_FILE}; --resume continues from it (a lower --lr, or "
            "--amp bf16/off, may avoid this)"
        )
    state.scheduler.step()
    if state.ema is not None:
        state.ema.update_parameters(unwrap(state.model))
    state.step += 1
    run.epoch.losses.append(loss)
    samples = len(run.epoch.losses) * run.per_rank_batch * run.context.world_size
    rate = samples / (time.perf_counter() - run.epoch.started)
    state.clock.seconds += time.perf_counter() - started
    boundary = state.step % run.settings.iterations_per_epoch == 0
    epoch_ends = boundary or state.step == run.last_step or state.clock.out_of_time
    lr = state.scheduler.get_last_lr()[0]
    bar.update(1, line=epoch_ends, loss=loss, lr=lr, samples_per_s=rate)  # before validation
    if epoch_ends:
        _end_epoch(run, rate)


def train_step(run: _Run, step: int) -> tuple[float, float]:
    """One optimisation step on a batch of augmented patches; the loss and the gradient norm
    (NaN when the loss was not finite and nothing was computed)."""
    state, device, amp_dtype = run.state, run.device, run.amp_dtype
    images, points = run.batches.batch(step, run.per_rank_batch, device)
    state.optimizer.zero_grad(set_to_none=True)
    autocast_dtype = amp_dtype or torch.float32
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=amp_dtype is not None):
        outputs = state.model(images)
    loss = heatmap_training_loss(
        unwrap(state.model), outputs, points, run.configuration, run.settings
    )
    if not torch.isfinite(loss):
        return float(loss.item()), math.nan
    state.scaler.scale(loss).backward()
    state.scaler.unscale_(state.optimizer)
    parameters = state.model.parameters()
    gradient_norm = float(nn.utils.clip_grad_norm_(parameters, run.settings.grad_clip))
    if not math.isfinite(gradient_norm) and not state.scaler.is_enabled():
        return float(loss.item()), gradient_norm  # not applied: the weights would turn NaN
    state.scaler.step(state.optimizer)  # fp16: skips a step whose gradients overflowed
    state.scaler.update()
    return float(loss.item()), gradient_norm


def _end_epoch(run: _Run, rate: float) -> None:
    """Validate when due, log the epoch, save a checkpoint, start the next epoch's tally."""
    step, settings = run.state.step, run.settings
    epoch = math.ceil(step / settings.iterations_per_epoch)
    row = {
        "epoch": epoch,
        "step": step,
        "train_loss": float(np.mean(run.epoch.losses)),
        "learning_rate": run.state.scheduler.get_last_lr()[0],
        "samples_per_s": rate,
    }
    last = step == run.last_step or run.state.clock.out_of_time
    due = epoch % settings.validate_every == 0 or last
    started = time.perf_counter()
    if run.val_cases and due and run.context.is_main:
        _validate_and_keep_best(run, row)
    run.state.clock.seconds += time.perf_counter() - started
    if run.context.is_main:  # logged first: a kill before the checkpoint redoes (and relogs) it
        _log(run.run_dir, {**row, "seconds": time.perf_counter() - run.epoch.started})
    _save(run)
    run.epoch = _Epoch()


def _interrupt(run: _Run, stop: _StopRequest) -> RunRecord:
    """Save, mark the run interrupted, and hand the signals back."""
    _save(run)
    run.record.status, run.record.step = "interrupted", run.state.step
    run.record.train_seconds = round(run.state.clock.seconds, 1)
    _write_record(run.run_dir, run.record, run.context)
    stop.restore()
    _leave_group(run)
    info(f"stopped at step {run.state.step} ({stop.requested}); resume with --resume")
    return run.record


def _leave_group(run: _Run) -> None:
    """Drop the DDP wrapper (its reducer holds the process group) while the interpreter is fully
    alive, then leave the group: a reducer freed at interpreter exit can abort the process."""
    if run.context.distributed:
        run.state.model = unwrap(run.state.model)
        gc.collect()
    distributed.stop(run.context)


def _finish(run: _Run) -> RunRecord:
    """Final (and, without validation, best) weights, the curve, and the closing record."""
    record, state, context = run.record, run.state, run.context
    if context.is_main:
        save_weights(run.run_dir / FINAL_WEIGHTS, state.kept_weights())
        if record.best is None:  # no validation, or none with a landmark present: the last is best
            save_weights(run.run_dir / BEST_WEIGHTS, state.kept_weights())
        _plot_curves(run.run_dir)
    finished = state.step >= total_steps(run.settings) or state.clock.out_of_time
    record.status, record.step = ("finished" if finished else "stopped"), state.step
    record.train_seconds = round(state.clock.seconds, 1)
    if context.distributed:  # DDP keeps replicas equal; record the evidence
        parameters = unwrap(state.model).parameters()
        checksum = float(sum(p.detach().double().sum() for p in parameters))
        record.weight_checksum_per_rank = distributed.gather(checksum, context)
    _write_record(run.run_dir, record, context)
    _leave_group(run)
    if context.is_main:
        info(_closing_line(run.run_dir, record))
    return record


def _already_finished(run_dir: Path) -> RunRecord | None:
    """The record of a finished run in ``run_dir`` (``--resume`` then has nothing to do)."""
    if not (run_dir / RUN_FILE).is_file():
        return None
    record = read_run_record(run_dir)
    if record.status != "finished":
        return None
    info(f"{run_dir} is already finished (step {record.step}): nothing to resume")
    return record


def _closing_line(run_dir: Path, record: RunRecord) -> str:
    """Where the run is and how it went, in one line."""
    best = record.best
    validation = (
        "no validation MRE"
        if best is None
        else f"best validation MRE {best.val_mre_mm:.3f} mm at step {best.step}"
    )
    return (
        f"{record.status} {record.arch} {record.configuration} after {record.step} steps "
        f"({record.train_seconds:.0f} s): {validation}; weights in {run_dir / BEST_WEIGHTS}"
    )


def heatmap_training_loss(
    model: nn.Module,
    outputs: Sequence[torch.Tensor],
    points: torch.Tensor,
    configuration: Configuration,
    settings: RunSettings,
) -> torch.Tensor:
    """Weighted sum over the network's trained outputs (all, or the full-resolution one without
    ``settings.deep_supervision``) of the heatmap loss against targets drawn on the device at
    each output's resolution."""
    count = len(outputs) if settings.deep_supervision else 1
    weights = np.asarray(model.output_weights[:count], dtype=np.float64)
    weights = weights / weights.sum()
    targets, present = _training_targets(model, outputs[:count], points, configuration, settings)
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for output, target, weight in zip(outputs[:count], targets, weights, strict=True):
        loss = heatmap_loss(output, target, present, settings.loss, settings.missing_target)
        total = total + float(weight) * loss
    return total


def _training_targets(
    model: nn.Module,
    outputs: Sequence[torch.Tensor],
    points: torch.Tensor,
    configuration: Configuration,
    settings: RunSettings,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One target per output: Gaussians (the plan's sigma in mm, or the settings' fixed sigma in
    input voxels, in each output's own voxels), or H3DE-Net's radius bumps."""
    shapes = [output.shape[2:] for output in outputs]
    strides = model.output_strides[: len(outputs)]
    if settings.target == "radius_bump":
        radius = bump_radius_voxels(configuration.patch_size)
        pairs = [
            radius_bump_heatmaps(points_at_stride(points, stride), shape, radius / np.mean(stride))
            for shape, stride in zip(shapes, strides, strict=True)
        ]
        return [target for target, _ in pairs], pairs[0][1]
    sigma = np.asarray(configuration.heatmap_sigma_voxels, dtype=np.float64)
    if settings.heatmap_sigma_voxels is not None:
        sigma = np.full_like(sigma, settings.heatmap_sigma_voxels)
    if hasattr(model, "output_sigma_voxels"):
        sigmas = model.output_sigma_voxels(sigma)[: len(outputs)]
    else:
        sigmas = [sigma / np.asarray(s) for s in strides]
    return deep_supervision_targets(points, shapes, strides, sigmas)


def fold_case_ids(
    dataset: Dataset, fold: int | str, folds: int, seed: int
) -> tuple[list[str], list[str]]:
    """Training and validation cases: the ``train`` split (or every case) in ``folds`` folds,
    shuffled by ``seed`` (seed 0 gives the folds of earlier versions); fold ``"all"`` trains on
    everything without validation."""
    cases = sorted(dataset.splits().get("train", dataset.case_ids))
    if len(cases) < 1:
        raise TrainingError("the dataset has no training cases", dataset.root)
    if fold == "all":
        return cases, []
    if not 0 <= int(fold) < folds:
        raise TrainingError(
            f"fold {fold} does not exist: the plan has {folds} folds (0 to {folds - 1}), or use "
            "'all' to train on every case without validation"
        )
    order = np.random.default_rng(FOLD_SEED + seed).permutation(len(cases))
    val = sorted(cases[i] for i in order[int(fold) :: folds])
    if not val or len(val) == len(cases):
        raise TrainingError(
            f"fold {fold} of {folds} leaves no training or no validation case ({len(cases)} cases)"
        )
    return [c for c in cases if c not in val], val


def _shape_model(cases: list[CachedCase]) -> ShapeModelRecord | None:
    """The training landmarks' constellation (:mod:`medlandmark.shape_model`), for ``run.json``."""
    model = fit_shape_model(
        [index_to_world(c.landmarks_index, c.geometry) for c in cases],
        [c.geometry.direction_matrix for c in cases],
    )
    return None if model is None else ShapeModelRecord.model_validate(model.to_dict())


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    try:
        return mixed_precision(amp, device)
    except ValueError as error:
        raise TrainingError(str(error)) from None


@contextlib.contextmanager
def _os_errors_explained(run_dir: str | Path):
    """An operating-system error (a full disk, permissions) as a TrainingError naming its file
    (or the run folder, when the error names none)."""
    try:
        yield
    except OSError as error:
        full = error.errno == errno.ENOSPC
        hint = "; the last checkpoint is intact: free some space, then --resume" if full else ""
        where = error.filename or run_dir
        raise TrainingError(f"{error.strerror or error}{hint}", where) from error


@contextlib.contextmanager
def _signal_handlers_restored():
    """SIGINT/SIGTERM handlers as they were, also when training fails (Ctrl-C works again)."""
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):  # other threads; foreign handlers
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


def _non_finite(loss: float, gradient_norm: float, scaler: torch.amp.GradScaler) -> str | None:
    """What went non-finite in a step, or None; overflowing fp16 gradients are the scaler's job."""
    if not math.isfinite(loss):
        return f"the loss became {loss}"
    if not math.isfinite(gradient_norm) and not scaler.is_enabled():
        return f"the gradient norm became {gradient_norm} (loss {loss:.4g})"
    if scaler.is_enabled() and scaler.get_scale() < MIN_LOSS_SCALE:
        scale = scaler.get_scale()
        return f"the fp16 loss scale fell to {scale:.2g} (the gradients overflow at every step)"
    return None


def _fine_offset_sd(
    configuration: Configuration, plan: Plan, coarse_run: str | None
) -> list[float]:
    """Offsets of fine patches from their landmark, in fine voxels per axis: the coarse stage's
    measured validation error (RMS per axis) when its run is given, else two coarse voxels; at
    most a sixth of the fine patch, so that the landmark stays inside nearly every patch (a
    coarse estimate further off than half a patch cannot be refined anyway)."""
    coarse = plan.configurations[configuration.previous_stage]
    sd_coarse_voxels = [2.0] * configuration.spatial_dims
    if coarse_run is not None:
        record = read_run_record(coarse_run)
        measured = None if record.best is None else record.best.error_sd_voxels
        if record.plan.spatial_dims != plan.spatial_dims or record.landmarks != plan.landmarks:
            raise TrainingError(
                f"--coarse-run is a {record.plan.spatial_dims}D run of other landmarks "
                f"({record.dataset or 'another dataset'}), not the coarse stage of this "
                f"{plan.spatial_dims}D plan",
                Path(coarse_run) / RUN_FILE,
            )
        if (
            record.configuration != configuration.previous_stage
            or measured is None
            or len(measured) != configuration.spatial_dims
        ):
            raise TrainingError(
                f"{coarse_run} is not a validated run of {configuration.previous_stage}"
            )
        sd_coarse_voxels = measured
    else:
        info("fine stage: no --coarse-run given; patch offsets assume a coarse error of 2 voxels")
    ratio = np.asarray(coarse.spacing_mm) / np.asarray(configuration.spacing_mm)
    sd_fine_voxels = np.asarray(sd_coarse_voxels) * ratio
    limit = np.asarray(configuration.patch_size) / FINE_OFFSET_SD_PATCH_FRACTION
    if np.any(sd_fine_voxels > limit):
        info(
            f"fine stage: the coarse error ({_voxels(sd_fine_voxels)} fine voxels RMS) exceeds "
            f"a sixth of the patch; offsets limited to {_voxels(limit)}"
        )
    return [float(v) for v in np.minimum(sd_fine_voxels, limit)]


def _voxels(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.1f}" for v in values)


def _run_record(
    run_dir: Path,
    dataset: Dataset,
    plan: Plan,
    options: TrainOptions,
    settings: RunSettings,
    case_ids: tuple[list[str], list[str]],
    resume: bool,
) -> RunRecord:
    """The run's record: read back when resuming (the same network and configuration), else new."""
    if resume:
        if not (run_dir / RUN_FILE).is_file():
            raise TrainingError("nothing to resume: no run.json", run_dir)
        record = read_run_record(run_dir)
        if record.arch != options.arch or record.configuration != options.configuration:
            raise TrainingError(
                f"the run trained {record.arch} on {record.configuration}; cannot resume it as "
                f"{options.arch} on {options.configuration}",
                run_dir / RUN_FILE,
            )
        return record
    if (run_dir / CHECKPOINT_FILE).exists():
        raise TrainingError(
            "this run folder already holds a training; use --resume or another folder", run_dir
        )
    train_ids, val_ids = case_ids
    return RunRecord(
        dataset=plan.dataset,
        dataset_path=str(dataset.root.resolve()),
        arch=options.arch,
        configuration=options.configuration,
        fold=options.fold,
        plan=plan,
        landmarks=plan.landmarks,
        symmetric_pairs=dataset.spec.symmetric_pairs,
        spacing_mm=dataset.spec.spacing_mm,
        train_cases=train_ids,
        val_cases=val_ids,
        settings=settings,
        options=asdict(options),
    )


def _write_record(run_dir: Path, record: RunRecord, context: distributed.Context) -> None:
    """run.json, atomically; under DDP only rank 0 writes."""
    if context.is_main:
        write_run_record(run_dir, record)


def _save(run: _Run) -> None:
    """Everything needed to continue, atomically (rank 0 only)."""
    if run.context.is_main:
        run.state.save(run.run_dir / CHECKPOINT_FILE, run.plan)
    distributed.barrier(run.context)


def _resume(
    run_dir: Path, context: distributed.Context, state: TrainState, device: torch.device
) -> None:
    """Continue from the checkpoint, or from step 0 when the run was stopped before its first
    one (the fresh start is the same as the original's); stale partial files are removed."""
    if context.is_main:
        for name in (CHECKPOINT_FILE, BEST_WEIGHTS, FINAL_WEIGHTS, RUN_FILE, LOG_FILE):
            remove_partials(run_dir / name)
    if not (run_dir / CHECKPOINT_FILE).is_file():
        info(f"{run_dir} has no checkpoint yet: starting from step 0")
        return
    state.restore(run_dir / CHECKPOINT_FILE, device)


def _validate_and_keep_best(run: _Run, row: dict) -> None:
    """Validate the kept weights; when they are the best so far, keep them and recalibrate."""
    model = run.state.kept_weights()
    result = validated(
        model,
        run.val_cases,
        run.configuration,
        run.device,
        run.batches.sampler.fine_offset_sd_voxels,
        run.amp_dtype,
        run.settings.prediction,
        run.fine_centres,
    )
    row["val_mre_mm"], row["val_sdr_2mm"] = result.mre_mm, result.sdr.get("2.0")
    best = run.record.best
    if result.mre_mm is not None and (best is None or result.mre_mm < best.val_mre_mm):
        run.record.best = BestValidation(
            val_mre_mm=result.mre_mm,
            val_sdr=result.sdr,
            step=run.state.step,
            error_sd_voxels=result.error_sd_voxels,
        )
        save_weights(run.run_dir / BEST_WEIGHTS, model)
        calibrate_record(run.record, result, run.val_cases, run.settings.target)
        write_run_record(run.run_dir, run.record)
    if result.mre_mm is None:
        warn(f"step {run.state.step}: no landmark is present in the validation cases: no MRE")
        return
    sdr = result.sdr.get("2.0")
    sdr_text = "-" if sdr is None else f"{sdr:.1f}%"
    info(f"step {run.state.step}: validation MRE {result.mre_mm:.3f} mm, SDR@2mm {sdr_text}")


def validated(
    model: nn.Module,
    cases: Sequence[CachedCase],
    configuration: Configuration,
    device: torch.device,
    fine_offset_sd_voxels: Sequence[float] | None,
    amp_dtype: torch.dtype | None = None,
    prediction: str = "full_resolution",
    fine_centres: Sequence[np.ndarray] | None = None,
) -> Validation:
    """A validation as prediction uses the configuration: whole images for a single or coarse
    stage; for a cascade's fine stage, patches around the coarse stage's estimates
    (``fine_centres``), or around displaced landmarks without them."""
    if configuration.stage == "fine" and fine_offset_sd_voxels is not None:
        return validate_fine(
            model,
            cases,
            configuration.patch_size,
            device,
            fine_offset_sd_voxels,
            amp_dtype=amp_dtype,
            prediction=prediction,
            centres_index=fine_centres,
        )
    return validate(
        model, cases, configuration.patch_size, device, amp_dtype=amp_dtype, prediction=prediction
    )


def calibrate_record(
    record: RunRecord, result: Validation, val_cases: Sequence[CachedCase], target: str
) -> None:
    """In place: what a validation calibrates in ``record``: the presence threshold, the error
    bounds and the case checks (:mod:`medlandmark.verdict`; not for a fine stage, whose
    points prediction does not judge cases by)."""
    confidences = confidence_of(result.peaks, target)
    threshold = calibrate_presence_threshold(confidences, result.truly_present)
    record.presence_threshold = threshold
    record.error_bounds_mm = metrics.conformal_radii_mm(result.errors_mm)
    record.error_bound_level = metrics.ERROR_BOUND_LEVEL
    if record.plan_configuration.stage == "fine":  # its patches skip missing landmarks
        record.relative_presence_threshold = record.verdict_thresholds = None
        return
    record.relative_presence_threshold = calibrate_presence_threshold(
        relative_confidences(confidences), result.truly_present
    )
    shape = record.shape_model
    shape_model = None if shape is None else ShapeModel.from_dict(shape.model_dump())
    evidence = [
        case_evidence(confidences[i], confidences[i] >= threshold, points, shape_model, c.geometry)
        for i, (points, c) in enumerate(zip(result.points_mm, val_cases, strict=True))
    ]
    record.verdict_thresholds = verdict_thresholds(evidence)


def recalibrate(run_dir: str | Path, device: str = "auto") -> RunRecord:
    """Validate a run's best weights on its validation cases again, refit its shape model on its
    training cases, and store what they calibrate in ``run.json`` (for runs trained before a
    calibration existed, or after its rules changed). Returns the updated record."""
    run_dir = Path(run_dir)
    record = read_run_record(run_dir)
    if not record.val_cases:
        raise TrainingError(
            f"the run trained on fold {record.fold} without validation cases: nothing to "
            "calibrate on",
            run_dir / RUN_FILE,
        )
    if not (run_dir / BEST_WEIGHTS).is_file():
        raise TrainingError("the run has no best weights yet: nothing to calibrate", run_dir)
    preprocessed = preprocessed_folder(
        record.dataset_path or ".", record.options.get("preprocessed")
    )
    folder = cache_folder(preprocessed, record.plan_configuration)
    val_cases = [load_cached_case(folder, c) for c in record.val_cases]
    record.shape_model = _shape_model([load_cached_case(folder, c) for c in record.train_cases])
    torch_device = select_device(device)
    network = load_run_network(run_dir, record, "best", torch_device)
    settings = record.settings
    prediction = "full_resolution" if settings is None else settings.prediction
    configuration = record.plan_configuration
    offsets = None
    coarse_run = record.options.get("coarse_run")
    if configuration.stage == "fine":
        offsets = _fine_offset_sd(configuration, record.plan, coarse_run)
    result = validated(
        network,
        val_cases,
        configuration,
        torch_device,
        offsets,
        prediction=prediction,
        fine_centres=_fine_centres(configuration, coarse_run, val_cases, torch_device),
    )
    calibrate_record(record, result, val_cases, "gaussian" if settings is None else settings.target)
    write_run_record(run_dir, record)
    return record


def _log(run_dir: Path, row: dict) -> None:
    path = run_dir / LOG_FILE
    rows = list(csv.DictReader(path.open())) if path.is_file() else []
    rows = [r for r in rows if int(r["step"]) < row["step"]]
    rows.append({k: row.get(k, "") for k in LOG_COLUMNS})
    out = io.StringIO()
    writer = csv.DictWriter(out, LOG_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())


def _plot_curves(run_dir: Path) -> None:
    """``training_curve.png``: the training loss and the validation MRE over the steps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = run_dir / LOG_FILE
    rows = list(csv.DictReader(path.open())) if path.is_file() else []
    if not rows:
        return
    figure = Figure(figsize=(7, 4))
    FigureCanvasAgg(figure)
    loss_axis = figure.add_subplot()
    losses = [float(r["train_loss"]) for r in rows]
    loss_axis.plot([int(r["step"]) for r in rows], losses, label="training loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    if min(losses) > 0:
        loss_axis.set_yscale("log")
    validated = [r for r in rows if r["val_mre_mm"]]
    if validated:
        mre_axis = loss_axis.twinx()
        steps = [int(r["step"]) for r in validated]
        mre_axis.plot(steps, [float(r["val_mre_mm"]) for r in validated], "o-", color="tab:red")
        mre_axis.set_ylabel("validation MRE (mm)")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(run_dir / TRAINING_CURVE_FILE, buffer.getvalue())


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
