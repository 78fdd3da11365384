"""What a training run is asked to do: :class:`TrainOptions`, resolved against the plan."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import ValidationError

from medlandmark.augment import AugmentConfig
from medlandmark.errors import MedlandmarkError, validation_problems
from medlandmark.planning.planner import PatchTopology, largest_batch, training_memory_gb
from medlandmark.records.plan import Configuration, Plan
from medlandmark.records.run import RunSettings
from medlandmark.training.losses import HEATMAP_LOSSES
from medlandmark.training.recipes import recipe_named

OVERRIDABLE_SETTINGS = (
    "epochs",
    "iterations_per_epoch",
    "batch_size",
    "learning_rate",
    "validate_every",
    "ema_decay",
    "missing_target",
    "loss",
)
FINE_TUNE_LEARNING_RATE_FACTOR = 0.2  # of the plan's rate, when a run starts from another's
FINE_TUNE_WARMUP_EPOCHS = 1


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
    time_budget_s: float | None = None  # stop after this much training; the schedule follows it
    device: str = "auto"
    seed: int = 0
    deterministic: bool = False
    amp: str = "auto"
    ema_decay: float | None = None
    missing_target: str | None = None
    loss: str | None = None
    recipe: str | None = None  # a paper's training (medlandmark.training.recipes)
    preprocessed: str | None = None
    coarse_run: str | None = None
    init_from: str | None = None  # a run, a folder of runs or a shipped model to start from
    augment: dict = field(default_factory=dict)


def run_settings(plan: Plan, options: TrainOptions) -> RunSettings:
    """The plan's training settings for ``options.arch`` and configuration, with the options'
    changes; a TrainingError naming what is wrong."""
    configuration = plan.configuration(options.configuration)
    try:
        learning_rate = plan.training.learning_rate_for(options.arch)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    settings = {
        **plan.training.model_dump(),
        "learning_rate": learning_rate,
        "batch_size": configuration.batch_size,
        **_recipe_settings(options),
    }
    if options.init_from is not None:  # fine-tuning: smaller steps, a short warm-up
        settings["learning_rate"] *= FINE_TUNE_LEARNING_RATE_FACTOR
        settings["warmup_epochs"] = min(settings["warmup_epochs"], FINE_TUNE_WARMUP_EPOCHS)
    for name in OVERRIDABLE_SETTINGS:
        value = getattr(options, name)
        if value is not None:
            settings[name] = value
    budget = options.time_budget_s
    if budget is not None and not 0 < budget < float("inf"):
        raise TrainingError(f"the time budget must be a positive number of seconds, got {budget}")
    if settings["loss"] not in HEATMAP_LOSSES:
        raise TrainingError(f"unknown loss '{settings['loss']}' (use {', '.join(HEATMAP_LOSSES)})")
    try:
        return RunSettings.model_validate(settings)
    except ValidationError as error:
        raise TrainingError(
            f"bad training setting: {validation_problems(error, 'settings')}"
        ) from None


def _recipe_settings(options: TrainOptions) -> dict:
    """The run settings ``options.recipe`` changes (none without one); a TrainingError for an
    unknown recipe or one made for another network."""
    if options.recipe is None:
        return {}
    try:
        recipe = recipe_named(options.recipe)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    if recipe.arch != options.arch:
        raise TrainingError(
            f"the recipe {recipe.name} trains {recipe.arch}, not {options.arch} "
            f"(use -a {recipe.arch}, or leave -a out)"
        )
    return {**recipe.settings, "recipe": recipe.name}


def augment_config(overrides: dict) -> AugmentConfig:
    """The augmentation with ``overrides`` (names of :class:`AugmentConfig`), or a TrainingError."""
    try:
        return AugmentConfig(**overrides)
    except ValidationError as error:
        raise TrainingError(
            f"bad augmentation setting: {validation_problems(error, 'augment')}"
        ) from None


def check_batch_fits(
    configuration: Configuration, settings: RunSettings, num_landmarks: int, memory_gb: float
) -> None:
    """A TrainingError when one training step of ``settings.batch_size`` patches needs more than
    ``memory_gb`` by the planner's estimate (a U-Net's, in half precision: a lower bound), so
    that an absurd batch fails at once with the largest that fits, not with the kernel's kill."""
    topology = PatchTopology.of(configuration)
    if topology is None:
        return
    needed = training_memory_gb(topology, settings.batch_size, num_landmarks)
    if needed <= memory_gb:
        return
    fits = largest_batch(topology, memory_gb, num_landmarks)
    advice = f"use --batch-size {fits} or less" if fits else "plan a smaller patch"
    raise TrainingError(
        f"batch size {settings.batch_size} needs at least {needed:.0f} GB for one training step "
        f"of {configuration.name}, more than the {memory_gb:.0f} GB here: {advice}"
    )
