"""The batches training draws: rigid in millimetres on anisotropic caches; folds that follow the seed."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medlandmark.augment import AugmentConfig, random_spatial_transform
from medlandmark.io.geometry import Geometry
from medlandmark.preprocessing import CachedCase
from medlandmark.training import distributed, loop
from medlandmark.training.options import TrainOptions, augment_config, run_settings

from .conftest import single_configuration_plan

SPACING_MM = (0.5, 2.0)  # array axis 0 four times finer than axis 1
LANDMARKS_INDEX = np.array([[60.0, 15.0], [76.0, 15.0], [60.0, 19.0]])  # 8 mm apart on each axis


def _anisotropic_case() -> CachedCase:
    geometry = Geometry(SPACING_MM, (0.0, 0.0), ((1.0, 0.0), (0.0, 1.0)), (136, 34))
    image = np.random.default_rng(0).normal(size=(1, 136, 34)).astype(np.float32)
    return CachedCase("c0", image, geometry, geometry, ["a", "b", "c"], LANDMARKS_INDEX.copy())


def _distances_mm(points_index: np.ndarray) -> list[float]:
    points_mm = points_index * np.asarray(SPACING_MM)
    return [float(np.linalg.norm(p - q)) for p, q in combinations(points_mm, 2)]


def test_training_rotations_are_rigid_in_millimetres_on_an_anisotropic_cache() -> None:
    """The batches the loop builds rotate the anatomy rigidly in mm: every distance between
    landmarks survives (a rotation in voxels would shear it by up to 4x here)."""
    rotation_only = AugmentConfig.identity(p_rotation=1.0, rotation_2d_deg=60.0).model_dump()
    options = TrainOptions(augment=rotation_only, seed=4)
    plan = single_configuration_plan("unet", {}, [64, 16], ["a", "b", "c"])
    configuration = plan.configurations["fine"]
    dataset = SimpleNamespace(spec=SimpleNamespace(landmarks=["a", "b", "c"], symmetric_pairs=[]))
    batches = loop._batches(
        [_anisotropic_case()],
        plan,
        configuration,
        dataset,
        options,
        run_settings(plan, options),
        distributed.Context(),
        augment_config(options.augment),
    )
    expected = _distances_mm(LANDMARKS_INDEX)
    whole = 0
    for step in range(6):
        _, points = batches.batch(step, 8, torch.device("cpu"))
        for sample in points.double().numpy():
            if np.isnan(sample).any():
                continue  # a landmark rotated out of the patch
            np.testing.assert_allclose(_distances_mm(sample), expected, atol=0.02)
            whole += 1
    assert whole >= 8


class _Cases(SimpleNamespace):
    def splits(self) -> dict:
        return {}


def test_folds_change_with_the_seed_and_seed_zero_keeps_the_earlier_folds() -> None:
    dataset = _Cases(case_ids=[f"case{i:02d}" for i in range(20)], root=Path("."))
    folds = {seed: loop.fold_case_ids(dataset, 0, 5, seed)[1] for seed in (0, 1, 2)}
    assert len({tuple(v) for v in folds.values()}) == 3
    earlier = np.random.default_rng(12345).permutation(20)  # the split every run used before
    assert folds[0] == sorted(f"case{i:02d}" for i in earlier[0::5])
    for seed in (0, 1, 2):
        training, validation = loop.fold_case_ids(dataset, 0, 5, seed)
        assert sorted(training + validation) == dataset.case_ids and not set(training) & set(
            validation
        )
    with pytest.raises(loop.TrainingError, match="no training or no validation"):
        loop.fold_case_ids(_Cases(case_ids=["only"], root=Path(".")), 0, 5, 3)


def test_isotropic_caches_draw_exactly_the_transforms_of_before() -> None:
    """On isotropic voxels the spacing changes nothing, bit for bit: the recipes (ISBI at 0.4 mm,
    AFIDs at 1.5 mm, both isotropic) train exactly as before the anisotropy fix."""
    config = AugmentConfig(p_rotation=1.0, p_shear=1.0)
    for ndim in (2, 3):
        patch = [24] * ndim
        plain = random_spatial_transform(
            4, [36] * ndim, patch, config, torch.Generator().manual_seed(3)
        )
        spaced = random_spatial_transform(
            4, [36] * ndim, patch, config, torch.Generator().manual_seed(3), spacing_mm=[1.5] * ndim
        )
        assert torch.equal(plain.matrix, spaced.matrix) and torch.equal(plain.offset, spaced.offset)
