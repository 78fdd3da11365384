"""Planner decisions on synthetic fingerprints, checked against the written rules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from medlandmark.io.geometry import Geometry
from medlandmark.planning.fingerprint import landmark_statistics, orientation_code
from medlandmark.planning.planner import (
    CASCADE_AREA_RATIO,
    architecture_sizes,
    make_plan,
    network_topology,
    plan_summary,
    planned_width,
    target_spacing_mm,
    training_memory_gb,
)


def fingerprint(
    spacings, shapes, modality="mr", num_landmarks=5, smallest=10.0, spread=3.0
) -> dict:
    """A fingerprint as compute_fingerprint writes it, with chosen spacings and shapes."""
    spacings, shapes = np.asarray(spacings, float), np.asarray(shapes, float)
    names = [f"L{i}" for i in range(num_landmarks)]
    return {
        "dataset": "synthetic",
        "spatial_dims": spacings.shape[1],
        "landmarks": names,
        "modalities": [modality],
        "num_cases": len(spacings),
        "input_signature": "x",
        "spacings_mm": spacings.tolist(),
        "shapes": shapes.tolist(),
        "intensity": [
            {
                "mean": 40.0,
                "std": 300.0,
                "median": 30.0,
                "min": -1024.0,
                "max": 3000.0,
                "percentile_00_5": -1000.0,
                "percentile_99_5": 1500.0,
            }
        ],
        "landmark_statistics": {
            "smallest_distance_mm": smallest / 3,
            "median_smallest_distance_mm": smallest,
            "median_spread_mm": spread,
            "fraction_missing": dict.fromkeys(names, 0.0),
        },
    }


def _rounds(n: int, value) -> list:
    return [value] * n


def test_isotropic_mr_plans_one_isotropic_fullres_configuration() -> None:
    plan = make_plan(fingerprint(_rounds(30, [1.0, 1.0, 1.0]), _rounds(30, [120, 140, 130])))
    assert plan.target_spacing_mm == [1.0, 1.0, 1.0]
    assert plan.transpose_forward == [0, 1, 2]
    assert list(plan.configurations) == ["3d_fullres"]  # one patch covers over half the image
    config = plan.configurations["3d_fullres"]
    patch = np.asarray(config.patch_size)
    divisor = 2 ** np.asarray(config.topology.pools_per_axis)
    assert (
        patch <= np.ceil(np.array([120, 140, 130]) / divisor) * divisor
    ).all()  # within the image
    assert np.prod(patch) * CASCADE_AREA_RATIO >= 120 * 140 * 130  # why there is no cascade
    assert all(k == [3, 3, 3] for k in config.topology.kernel_sizes)
    assert len(set(config.topology.pools_per_axis)) == 1  # pooled alike on every axis
    assert [n.model_dump(exclude_none=True) for n in plan.normalization] == [
        {"scheme": "zscore_per_image"}
    ]
    assert config.estimated_gpu_memory_gb <= 8.0 - 0.75
    assert config.heatmap_sigma_mm == pytest.approx(
        5.0
    )  # half the smallest distance, within 2-5 voxels


def test_anisotropic_ct_takes_10th_percentile_spacing_transposes_and_skips_pooling_thick_axis() -> (
    None
):
    rng = np.random.default_rng(0)
    thick = rng.choice([2.5, 3.0, 5.0, 5.0, 5.0], size=40)
    spacings = [[0.7, 0.7, float(z)] for z in thick]  # (x, y, z)-like array order: thick axis last
    shapes = [[512, 512, int(300 / z)] for z in thick]
    plan = make_plan(fingerprint(spacings, shapes, modality="ct"))
    assert plan.transpose_forward == [2, 0, 1]  # thick axis first
    assert plan.transpose_backward == [1, 2, 0]
    assert plan.target_spacing_mm[0] == pytest.approx(np.percentile(thick, 10))
    assert plan.target_spacing_mm[1:] == [0.7, 0.7]
    config = plan.configurations[next(iter(plan.configurations))]
    first_kernel = config.topology.kernel_sizes[0]
    assert first_kernel == [1, 3, 3]  # 2.5 mm is over 2x the in-plane spacing
    assert config.topology.strides[1] == [1, 2, 2]  # in-plane pooled first
    assert plan.normalization[0].scheme == "ct"
    assert plan.normalization[0].clip == (-1000.0, 1500.0)


def test_median_spacing_when_thick_axis_has_many_voxels() -> None:
    spacings = np.array([[0.8, 0.8, 4.0]] * 10)
    shapes = np.array([[256, 256, 400]] * 10)  # long but coarse axis: not "few voxels"
    assert target_spacing_mm(spacings, shapes).tolist() == [0.8, 0.8, 4.0]


def test_large_radiograph_gets_a_cascade_covering_the_whole_image() -> None:
    plan = make_plan(
        fingerprint(
            _rounds(150, [0.1, 0.1]), _rounds(150, [2400, 1935]), modality="xray", smallest=1.5
        )
    )
    configs = plan.configurations
    assert {"2d_coarse", "2d_fine", "2d"} <= set(configs)
    coarse, fine = configs["2d_coarse"], configs["2d_fine"]
    assert plan.default_configuration == "2d_coarse"
    assert coarse.next_stage == "2d_fine" and fine.previous_stage == "2d_coarse"
    assert fine.spacing_mm == [0.1, 0.1]
    coarse_image = np.array([2400, 1935]) * 0.1 / np.array(coarse.spacing_mm)
    assert (
        np.asarray(coarse.patch_size) >= np.floor(coarse_image)
    ).all()  # whole image in one patch
    assert np.prod(configs["2d"].patch_size) * CASCADE_AREA_RATIO < 2400 * 1935
    assert coarse.data_identifier != fine.data_identifier == configs["2d"].data_identifier
    # sigma: half of 1.5 mm = 0.75 mm; at 0.1 mm that is over 5 voxels, so 0.5 mm
    assert fine.heatmap_sigma_mm == pytest.approx(0.5)
    assert "hyatt" in fine.architectures and "h3de" not in fine.architectures


def test_target_spacing_override_is_per_image_axis_and_moves_every_stage() -> None:
    spacings, shapes = _rounds(20, [0.7, 0.7, 5.0]), _rounds(20, [512, 512, 60])
    planned = make_plan(fingerprint(spacings, shapes, modality="ct"))
    assert planned.transpose_forward == [2, 0, 1] and planned.target_spacing_overridden is False
    plan = make_plan(
        fingerprint(spacings, shapes, modality="ct"), spacing_override_mm=[1.5, 1.5, 3.0]
    )
    assert plan.target_spacing_overridden is True
    assert plan.target_spacing_mm == [3.0, 1.5, 1.5]  # given in image axes, stored transposed
    assert plan.median_shape_at_target == pytest.approx([100.0, 238.93, 238.93], abs=0.01)
    radiograph = fingerprint(
        _rounds(10, [0.1, 0.1]), _rounds(10, [2400, 1935]), modality="xray", smallest=3.0
    )
    one_value = make_plan(
        radiograph, gpu_memory_gb=1.0, base_features=16, spacing_override_mm=[0.4]
    )
    assert one_value.configurations["2d_fine"].spacing_mm == [0.4, 0.4]
    for bad in ([0.0], [float("nan")], [1.0, 1.0, 1.0], [-1.0]):
        with pytest.raises(ValueError, match="target spacing"):
            make_plan(radiograph, spacing_override_mm=bad)


def test_tiny_2d_image_is_one_patch_with_minimum_batch() -> None:
    plan = make_plan(fingerprint(_rounds(20, [0.5, 0.5]), _rounds(20, [64, 64]), modality="xray"))
    assert list(plan.configurations) == ["2d"]
    config = plan.configurations["2d"]
    assert config.patch_size == [64, 64]
    assert config.batch_size == 2  # 5 % of 20 images is less than one patch: the minimum
    assert config.topology.pools_per_axis == [4, 4]  # down to 4 x 4 feature maps


def test_bigger_budget_never_gives_a_smaller_patch() -> None:
    fp = fingerprint(_rounds(10, [1.0, 1.0, 1.0]), _rounds(10, [300, 300, 300]))
    sizes = [
        np.prod(make_plan(fp, gpu_memory_gb=gb).configurations["3d_fullres"].patch_size)
        for gb in (4, 8, 16, 40)
    ]
    assert sizes == sorted(sizes)
    assert sizes[0] < sizes[-1]


def test_topology_patch_is_divisible_and_memory_grows_with_batch() -> None:
    topology = network_topology([100, 90], [1.0, 1.0])
    assert all(p % d == 0 for p, d in zip(topology.patch_size, topology.divisor, strict=True))
    assert training_memory_gb(topology, 4, 10) > training_memory_gb(topology, 2, 10)


def test_landmark_statistics_on_known_points() -> None:
    shape = np.array([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
    points = np.stack([shape + [5.0, 7.0], shape + [-2.0, 1.0], shape.copy()])
    points[2, 2] = np.nan
    stats = landmark_statistics(points, np.array([[100.0, 100.0]] * 3), ["a", "b", "c"])
    assert stats["fraction_missing"] == {"a": 0.0, "b": 0.0, "c": pytest.approx(1 / 3)}
    assert stats["smallest_distance_mm"] == pytest.approx(5.0)
    assert stats["cloud_extent_fraction"] == pytest.approx(0.1)
    # translated copies: no spread once centred, except where the missing point moved the centroid
    assert stats["spread_mm"]["a"] < 3.0


def test_orientation_code_reads_direction() -> None:
    assert orientation_code(Geometry.identity((4, 5, 6))) == "SPL"
    flipped = Geometry((1, 1, 1), (0, 0, 0), ((-1, 0, 0), (0, -1, 0), (0, 0, 1)), (2, 2, 2))
    assert orientation_code(flipped) == "RAS"


GOLDEN = Path(__file__).parent / "golden"
RUN_SPECIFIC = ("dataset_path", "fingerprint_signature")


def _close(actual, expected, where: str = "") -> None:
    if isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for key in expected:
            _close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _close(a, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-9, abs=1e-12), where
    else:
        assert actual == expected, where


@pytest.mark.parametrize("name", ["isbi2015", "hand_xray", "afids"])
def test_plans_of_the_real_datasets_match_the_golden_files(
    real_datasets: dict[str, Path], name: str
) -> None:
    """A change of any planning decision shows up here; regenerate deliberately with
    MEDLANDMARK_UPDATE_GOLDEN=1 and review the diff."""
    plan = json.loads((real_datasets[name] / "preprocessed" / "plans.json").read_text())
    plan = {k: v for k, v in plan.items() if k not in RUN_SPECIFIC}
    golden = GOLDEN / f"plans_{name}.json"
    if os.environ.get("MEDLANDMARK_UPDATE_GOLDEN") == "1":
        golden.write_text(json.dumps(plan, indent=1) + "\n")
    _close(plan, json.loads(golden.read_text()), name)


def test_the_attention_networks_width_is_planned_from_the_budget_shown_and_can_be_given() -> None:
    radiograph = fingerprint(_rounds(10, [0.1, 0.1]), _rounds(10, [2400, 1935]), modality="xray")
    volume = fingerprint(_rounds(10, [1.0, 1.0, 1.0]), _rounds(10, [160, 192, 160]))
    for gb, width in (
        (24.0, 1.0),
        (80.0, 1.0),
        (8.0, 0.5),
        (1.0, 0.25),
    ):  # 24 GB and up: the papers'
        assert planned_width(gb) == width
        for fp, arch in ((radiograph, "hyatt"), (volume, "h3de")):
            plan = make_plan(fp, gpu_memory_gb=gb)
            assert {
                c.architectures[arch]["width_multiplier"] for c in plan.configurations.values()
            } == {width}
            assert plan.width_multiplier is None and f"{arch} width {width:g}" in plan_summary(plan)
    given = make_plan(radiograph, gpu_memory_gb=1.0, width_multiplier=0.75)
    assert given.width_multiplier == 0.75
    assert {
        c.architectures["hyatt"]["width_multiplier"] for c in given.configurations.values()
    } == {0.75}
    assert "hyatt width 0.75" in plan_summary(given) and "unet 32 base features" in plan_summary(
        given
    )
    with pytest.raises(ValueError, match="width 0"):
        make_plan(radiograph, width_multiplier=0.0)


def test_models_prints_each_networks_width_and_size(tmp_path: Path, capfd) -> None:
    from medlandmark.cli import main
    from medlandmark.datasets.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "ds", num_cases=4, size_px=64)
    assert main(["plan", str(root), "--gpu-memory", "2", "--width", "0.375", "-q"]) == 0
    capfd.readouterr()
    assert main(["models", str(root)]) == 0
    table = capfd.readouterr().err
    assert "width" in table and "x0.375" in table and "first-stage" in table
    with pytest.raises(SystemExit) as refused:  # argparse: usage line and exit 2
        main(["plan", str(root), "--width", "0", "-q"])
    assert refused.value.code == 2 and "must be a positive finite number" in capfd.readouterr().err


def test_h3de_regions_hold_8_voxels_per_axis_as_the_official_grid() -> None:
    """The official grid (4, 4, 2) on 128 x 128 x 64 patches: 8-voxel regions of the stride-4 map,
    whatever the axis order."""
    for patch, grid in (
        ([128, 128, 64], [4, 4, 2]),
        ([64, 128, 128], [2, 4, 4]),
        ([32, 32, 32], [1, 1, 1]),
    ):
        sizes = architecture_sizes(network_topology(patch, [1.0, 1.0, 1.0]), 3, 24.0)
        assert sizes["h3de"]["n_win"] == grid and sizes["h3de"]["width_multiplier"] == 1.0


def test_a_unet_without_features_is_refused_when_planning(tmp_path: Path, capfd) -> None:
    from medlandmark.cli import main

    with pytest.raises(ValueError, match="base features 0"):
        make_plan(fingerprint(_rounds(10, [1.0, 1.0]), _rounds(10, [64, 64])), base_features=0)
    with pytest.raises(SystemExit) as refused:
        main(["plan", str(tmp_path), "--base-features", "0"])
    assert (
        refused.value.code == 2
        and "--base-features: must be 1 or more, got 0" in capfd.readouterr().err
    )


def test_a_huge_gpu_budget_plans_as_fast_as_a_small_one(monkeypatch) -> None:
    """The batch size was found by adding one sample at a time: 10 000 GB took 56 s, 10^6 GB
    about 1.5 h. Now the estimate is evaluated a handful of times per configuration."""
    from medlandmark.planning import planner

    calls, original = [0], planner.training_memory_gb

    def counted(*args):
        calls[0] += 1
        return original(*args)

    monkeypatch.setattr(planner, "training_memory_gb", counted)
    volume = fingerprint(_rounds(10, [1.0, 1.0, 1.0]), _rounds(10, [300, 300, 300]))
    for gb in (1e4, 1e6):
        calls[0] = 0
        plan = make_plan(volume, gpu_memory_gb=gb)
        assert calls[0] < 200 and plan.configuration().batch_size >= 2


def test_a_dataset_without_any_present_landmark_is_refused_in_one_line(tmp_path: Path) -> None:
    """In a fresh process, so that numpy's warnings reach stderr as a user sees them."""
    import subprocess
    import sys

    from medlandmark.datasets.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "ds", num_cases=4, size_px=32)
    for path in (root / "landmarks").glob("*.csv"):  # every point of every case missing
        rows = path.read_text().splitlines()
        path.write_text("\n".join(rows[:2] + [f"{row.split(',')[0]},," for row in rows[2:]]) + "\n")
    command = [sys.executable, "-m", "medlandmark", "plan", str(root), "-q"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "landmarks: no training case has any landmark present" in result.stderr
    assert "Mean of empty slice" not in result.stderr and "Warning" not in result.stderr
