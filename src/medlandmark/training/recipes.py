"""The papers' training recipes by name (``train --recipe``), so that a user can reproduce them.

A recipe replaces the plan's training settings where the paper's differ (loss, targets,
optimiser, schedule, prediction rule); the plan still gives the patch, the spacing, the batch
size and the length of the run, and the command line still overrides everything. Read from the
official code (github ECNUACRush/HYATT-Net ``configs/ISBI2015_dataset``, ECNUACRush/H3DE-Net
``main_baseline.py`` and ``models/losses.py``); ``docs/training.md`` says what differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NO_CLIPPING = 1e6  # the papers do not clip gradients; a norm this large never binds


@dataclass(frozen=True)
class Recipe:
    """A paper's training: its network and the run settings (fields of ``RunSettings``) it
    changes."""

    name: str
    arch: str
    summary: str
    settings: dict = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            "hyatt-paper",
            "hyatt",
            "MSE on the three heads (weights 3000/3000/1000), Gaussians of 4 input pixels at "
            "full resolution (4/4/8 at strides 1/2/4), AdamW 4.5e-4 with weight decay 0.01, "
            "linear warm-up over a quarter of the run then cosine, no gradient clipping; "
            "prediction: the mean of the three heads' points",
            {
                "loss": "mse",
                "heatmap_sigma_voxels": 4.0,
                "optimizer": "adamw",
                "learning_rate": 4.5e-4,
                "adam_betas": (0.9, 0.999),
                "weight_decay": 0.01,
                "schedule": "cosine",
                "warmup_share": 0.25,
                "grad_clip": NO_CLIPPING,
                "ema_decay": None,
                "deep_supervision": True,
                "prediction": "mean_of_heads",
            },
        ),
        Recipe(
            "h3de-paper",
            "h3de",
            "targets 2 exp(-d^2 / 0.2 R^2) within R = 20 voxels (on 128-voxel patches, fewer on "
            "smaller ones) and -1 elsewhere, SmoothL1 on that ball and on as many hardest voxels "
            "outside it, full-resolution output only, Adam "
            "1e-3 with betas (0.9, 0.98) and L2 weight decay 5e-4, x 0.98 per epoch down to 3 %, "
            "no gradient clipping; missing landmarks trained toward -1 everywhere",
            {
                "loss": "hard_negative_smooth_l1",
                "target": "radius_bump",
                "optimizer": "adam",
                "learning_rate": 1e-3,
                "adam_betas": (0.9, 0.98),
                "weight_decay": 5e-4,
                "schedule": "exponential",
                "warmup_share": 0.0,
                "grad_clip": NO_CLIPPING,
                "ema_decay": None,
                "missing_target": "zero",
                "deep_supervision": False,
                "prediction": "full_resolution",
            },
        ),
    )
}


def recipe_named(name: str) -> Recipe:
    """The recipe called ``name``; a ValueError listing the recipes otherwise."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe '{name}' (use {', '.join(RECIPES)})")
    return RECIPES[name]


def recipe_arch(name: str | None, arch: str | None) -> str:
    """The network to train: ``arch`` when given, else the recipe's, else the U-Net."""
    if arch is not None:
        return arch
    return "unet" if name is None else recipe_named(name).arch
