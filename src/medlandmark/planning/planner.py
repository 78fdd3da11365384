"""From a fingerprint to a plan: every size the pipeline uses, decided by written rules.

The rules start from nnU-Net v2's (see ../shared/design/ANCHORS.md) and adapt them to landmark
heatmaps: a coarse-to-fine cascade whenever the image is much larger than one patch, a heatmap
sigma from the spacing and the landmark statistics, and sizes for every architecture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medlandmark.records.plan import (
    Configuration,
    Normalization,
    Plan,
    Topology,
    TrainingSettings,
)

ANISOTROPY_THRESHOLD = 3.0
MIN_FEATURE_MAP = 4
MAX_POOLS = {2: 6, 3: 5}
INITIAL_PATCH_VOXELS = {2: 2048**2, 3: 256**3}
MAX_FEATURES = {2: 512, 3: 320}
BASE_FEATURES = 32
# Landmark identity needs global context (which incisor, which side), so unlike nnU-Net's 4x
# rule for segmentation, a cascade starts as soon as one patch sees less than half the image.
CASCADE_AREA_RATIO = 2.0
MIN_FINE_PATCH = {2: 64, 3: 32}
HEATMAP_SIGMA_VOXELS = (2.0, 5.0)  # bounds; 3 voxels without landmark statistics
BYTES_PER_ACTIVATION = 2  # bf16/fp16 activations under mixed precision
ACTIVATIONS_PER_STAGE = 15  # conv, norm, nonlinearity x2 per side, transposed conv, skip concat
BYTES_PER_PARAMETER = 16  # fp32 weight, gradient and two AdamW moments
RESERVED_GPU_GB = 0.75  # CUDA context and allocator slack
BATCH_DATASET_FRACTION = 0.05
MIN_BATCH = 2


def target_spacing_mm(spacings_mm: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Median spacing per axis; for an axis much coarser than the others that also has few
    voxels, its 10th percentile instead (never finer than the other axes)."""
    spacings_mm, shapes = np.asarray(spacings_mm, float), np.asarray(shapes, float)
    target = np.median(spacings_mm, axis=0)
    if len(target) < 3:
        return target
    median_shape = np.median(shapes * spacings_mm / target, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    anisotropic_spacing = target[worst] > ANISOTROPY_THRESHOLD * target[others].max()
    few_voxels = median_shape[worst] * ANISOTROPY_THRESHOLD < median_shape[others].min()
    if anisotropic_spacing and few_voxels:
        finer = np.percentile(spacings_mm[:, worst], 10)
        target[worst] = max(finer, target[others].max() + 1e-5)
    return target


def checked_spacing_override(spacing_mm: Sequence[float], ndim: int) -> np.ndarray:
    """A target spacing given by hand, per image axis: one value for every axis, or one each."""
    values = np.asarray(list(spacing_mm), float).ravel()
    if len(values) == 1:
        values = np.repeat(values, ndim)
    if len(values) != ndim or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(
            f"target spacing {list(spacing_mm)}: give one positive value in mm, or {ndim}"
        )
    return values


def transpose_axes(spacing_mm: Sequence[float]) -> list[int]:
    """Axis order for the cache: a 3D volume's coarsest axis goes first when it is anisotropic."""
    spacing = np.asarray(spacing_mm)
    if len(spacing) == 3 and spacing.max() > ANISOTROPY_THRESHOLD * spacing.min():
        worst = int(np.argmax(spacing))
        return [worst] + [a for a in range(3) if a != worst]
    return list(range(len(spacing)))


@dataclass
class PatchTopology:
    """A patch and the U-Net topology it allows: strides and kernels per stage, poolings per
    axis, the divisor each patch axis must be a multiple of, and features per stage."""

    patch_size: list[int]
    strides: list[list[int]]
    kernel_sizes: list[list[int]]
    pools_per_axis: list[int]
    divisor: list[int]
    features_per_stage: list[int]

    @classmethod
    def of(cls, configuration: Configuration) -> PatchTopology | None:
        """The topology a plan configuration records (None in plans without one)."""
        topology = configuration.topology
        if topology is None:
            return None
        return cls(
            configuration.patch_size,
            topology.strides,
            topology.kernel_sizes,
            topology.pools_per_axis,
            [2**p for p in topology.pools_per_axis],
            topology.features_per_stage,
        )

    def to_record(self) -> Topology:
        """What ``plans.json`` keeps of it."""
        return Topology(
            strides=self.strides,
            kernel_sizes=self.kernel_sizes,
            pools_per_axis=self.pools_per_axis,
            features_per_stage=self.features_per_stage,
        )


def network_topology(
    patch_size: Sequence[int], spacing_mm: Sequence[float], base_features: int = BASE_FEATURES
) -> PatchTopology:
    """Pooling per axis and kernel sizes per stage (nnU-Net's rules), the patch size rounded up
    to be divisible by the total pooling of each axis, and features doubling from ``base_features``."""
    ndim = len(patch_size)
    size, spacing = [float(s) for s in patch_size], [float(s) for s in spacing_mm]
    kernel = [1] * ndim
    pools_per_axis = [0] * ndim
    strides, kernels = [[1] * ndim], []
    while True:
        finest = min(spacing)
        for axis in range(ndim):
            if spacing[axis] / finest < 2:
                kernel[axis] = 3
        axes = [
            a
            for a in range(ndim)
            if size[a] >= 2 * MIN_FEATURE_MAP
            and spacing[a] / finest < 2
            and pools_per_axis[a] < MAX_POOLS[ndim]
        ]
        if len(axes) == 1 and size[axes[0]] < 3 * MIN_FEATURE_MAP:
            axes = []
        kernels.append(list(kernel))
        if not axes or len(strides) > MAX_POOLS[ndim]:
            break
        stride = [2 if a in axes else 1 for a in range(ndim)]
        for a in axes:
            pools_per_axis[a] += 1
            spacing[a] *= 2
            size[a] = math.ceil(size[a] / 2)
        strides.append(stride)
    kernels[-1] = [3] * ndim  # the bottleneck always sees 3 voxels per axis
    divisor = [2**p for p in pools_per_axis]
    patch = [int(math.ceil(p / d) * d) for p, d in zip(patch_size, divisor, strict=True)]
    features = [min(base_features * 2**i, MAX_FEATURES[ndim]) for i in range(len(strides))]
    return PatchTopology(patch, strides, kernels, pools_per_axis, divisor, features)


def training_memory_gb(topology: PatchTopology, batch_size: int, num_landmarks: int) -> float:
    """Estimated GPU memory of one training step of the U-Net: activations kept for the
    backward pass (both sides of every stage) plus weights, gradients and optimiser state."""
    voxels = float(np.prod(topology.patch_size))
    activations, parameters = 0.0, 0.0
    in_features = 1
    for stride, kernel, features in zip(
        topology.strides, topology.kernel_sizes, topology.features_per_stage, strict=True
    ):
        voxels /= float(np.prod(stride))
        activations += voxels * features * ACTIVATIONS_PER_STAGE
        taps = float(np.prod(kernel))
        parameters += (
            taps * features * (in_features + 3 * features) + float(np.prod(stride)) * features**2
        )
        in_features = features
    activations += float(np.prod(topology.patch_size)) * num_landmarks * 3
    total_bytes = batch_size * activations * BYTES_PER_ACTIVATION + parameters * BYTES_PER_PARAMETER
    return total_bytes / 1024**3


def fit_patch_to_budget(
    spacing_mm: Sequence[float],
    median_shape: Sequence[float],
    gpu_memory_gb: float,
    num_landmarks: int,
    initial_voxels: float | None = None,
    base_features: int = BASE_FEATURES,
) -> PatchTopology:
    """The largest patch (aspect ratio 1/spacing, at most the median shape) whose training step
    at batch size 2 fits the budget; shrinks the axis largest relative to the image first."""
    ndim = len(spacing_mm)
    budget = gpu_memory_gb - RESERVED_GPU_GB
    initial_voxels = initial_voxels or INITIAL_PATCH_VOXELS[ndim]
    inverse = 1.0 / np.asarray(spacing_mm, float)
    patch = inverse * (initial_voxels / np.prod(inverse)) ** (1.0 / ndim)
    patch = np.minimum(np.round(patch), np.asarray(median_shape, float)).astype(int)
    topology = network_topology(patch, spacing_mm, base_features)
    while training_memory_gb(topology, MIN_BATCH, num_landmarks) > budget:
        ratio = np.asarray(topology.patch_size) / np.asarray(median_shape, float)
        axis = int(np.argmax(ratio))
        patch = np.asarray(topology.patch_size)
        patch[axis] -= topology.divisor[axis]
        if patch[axis] < 2 * MIN_FEATURE_MAP:
            raise ValueError(f"no patch fits in {gpu_memory_gb} GB of GPU memory")
        topology = network_topology(patch, spacing_mm, base_features)
    return topology


def batch_size(
    topology: PatchTopology, gpu_memory_gb: float, num_landmarks: int, dataset_voxels: float
) -> int:
    """As many samples as fit the budget, at most 5 % of the dataset's voxels, at least 2."""
    size = largest_batch(topology, gpu_memory_gb - RESERVED_GPU_GB, num_landmarks)
    size = max(MIN_BATCH, size)
    cap = int(BATCH_DATASET_FRACTION * dataset_voxels / float(np.prod(topology.patch_size)))
    return max(MIN_BATCH, min(size, cap))


def largest_batch(topology: PatchTopology, memory_gb: float, num_landmarks: int) -> int:
    """The largest batch whose training step fits ``memory_gb`` by :func:`training_memory_gb`
    (0 when not even one sample does). Memory grows linearly with the batch, so the batch is
    solved for, then checked against the estimate itself: a large budget costs no more time."""
    fixed = training_memory_gb(topology, 0, num_landmarks)
    per_sample = training_memory_gb(topology, 1, num_landmarks) - fixed
    size = max(0, int((memory_gb - fixed) / per_sample))
    while size > 0 and training_memory_gb(topology, size, num_landmarks) > memory_gb:
        size -= 1
    while training_memory_gb(topology, size + 1, num_landmarks) <= memory_gb:
        size += 1
    return size


def heatmap_sigma_mm(spacing_mm: Sequence[float], smallest_distance_mm: float | None) -> float:
    """Gaussian sigma: half the typical (median over cases) smallest distance between two
    landmarks of a case, so that neighbours' targets barely overlap (exp(-2) at the other
    point), kept between 2 and 5 voxels of the configuration's coarsest axis."""
    voxel = float(max(spacing_mm))
    low, high = HEATMAP_SIGMA_VOXELS
    if not smallest_distance_mm:
        return 3.0 * voxel
    return float(np.clip(smallest_distance_mm / 2.0, low * voxel, high * voxel))


def normalization(modalities: Sequence[str], intensity: Sequence[dict]) -> list[Normalization]:
    """CT: clip to the global 0.5/99.5 percentiles then the global z-score; otherwise per image."""
    schemes = []
    for modality, stats in zip(modalities, intensity, strict=True):
        if modality == "ct":
            clip = (stats["percentile_00_5"], stats["percentile_99_5"])
            std = max(stats["std"], 1e-8)
            schemes.append(Normalization(scheme="ct", clip=clip, mean=stats["mean"], std=std))
        else:
            schemes.append(Normalization(scheme="zscore_per_image"))
    return schemes


def planned_width(gpu_memory_gb: float) -> float:
    """The attention networks' width multiplier for a GPU budget: the papers' full width (1.0)
    from 24 GB on, narrower as sqrt(budget / 24 GB) in steps of 1/8 below, at least 0.25."""
    width = float(np.clip(math.sqrt(gpu_memory_gb / 24.0), 0.25, 1.0))
    return math.floor(width * 8 + 1e-9) / 8


def architecture_sizes(
    topology: PatchTopology, spatial_dims: int, gpu_memory_gb: float, width: float | None = None
) -> dict:
    """Sizes for every architecture, from the patch and the budget (``width``: the attention
    networks' width multiplier instead of the budget's, see :func:`planned_width`)."""
    patch = np.asarray(topology.patch_size)
    width = planned_width(gpu_memory_gb) if width is None else float(width)
    sizes = {
        "unet": {
            "features_per_stage": topology.features_per_stage,
            "strides": topology.strides,
            "kernel_sizes": topology.kernel_sizes,
            "n_conv_per_stage": 2,
            "deep_supervision": True,
        }
    }
    if spatial_dims == 2:
        regions = []
        for stage, reference in enumerate((16, 16, 16, 8, 8), start=1):
            side = int(patch.min()) // 2**stage
            regions.append(int(np.clip(side // 4, 1, reference)))
        sizes["hyatt"] = {
            "width_multiplier": width,
            "depths": [1, 1, 1, 1, 1],
            "n_win": regions,
            "topk": [1, 4, 8, 16, -2],  # the last stage: global attention (the official -2)
            "kv_pool": 4,
            "mlp_ratios": [8, 8, 8, 4, 4],
            "head_dim": 32,
        }
    else:
        feature = patch // 4  # after the stride-4 stem
        # 8-voxel regions, as the official (4, 4, 2) grid on its 128 x 128 x 64 patches
        regions = np.clip(feature // 8, 1, 4).astype(int).tolist()
        sizes["h3de"] = {
            "width_multiplier": width,
            "widths": [64, 128, 256, 512],
            "depths": [2, 2, 4, 2],
            "n_win": regions,
            "topk": [1, 4, 16, 16],
            "mlp_ratio": 4,
        }
    return sizes


@dataclass
class _PlanningContext:
    """What every configuration of one plan is sized from."""

    fingerprint: dict
    gpu_memory_gb: float
    width_multiplier: float | None = None  # given by hand; None: planned_width(gpu_memory_gb)

    @property
    def num_landmarks(self) -> int:
        return len(self.fingerprint["landmarks"])


def _configuration(
    context: _PlanningContext,
    name: str,
    stage: str,
    spacing_mm: np.ndarray,
    topology: PatchTopology,
    dataset_voxels: float,
    **extra: object,
) -> Configuration:
    """One configuration at ``spacing_mm`` (``dataset_voxels``: the training cases' voxels at
    that spacing); ``extra`` links the stages of a cascade."""
    smallest = context.fingerprint["landmark_statistics"].get("median_smallest_distance_mm")
    sigma_mm = heatmap_sigma_mm(spacing_mm, smallest)
    batch = batch_size(topology, context.gpu_memory_gb, context.num_landmarks, dataset_voxels)
    memory = training_memory_gb(topology, MIN_BATCH, context.num_landmarks)
    return Configuration(
        name=name,
        stage=stage,
        data_identifier="data_coarse" if stage == "coarse" else "data_fullres",
        spacing_mm=[float(s) for s in spacing_mm],
        patch_size=topology.patch_size,
        batch_size=batch,
        heatmap_sigma_mm=sigma_mm,
        heatmap_sigma_voxels=[sigma_mm / s for s in spacing_mm],
        estimated_gpu_memory_gb=round(memory, 3),
        topology=topology.to_record(),
        architectures=architecture_sizes(
            topology, len(spacing_mm), context.gpu_memory_gb, context.width_multiplier
        ),
        **extra,
    )


def make_plan(
    fingerprint: dict,
    gpu_memory_gb: float = 8.0,
    base_features: int = BASE_FEATURES,
    spacing_override_mm: Sequence[float] | None = None,
    width_multiplier: float | None = None,
) -> Plan:
    """The whole plan for a fingerprint: spacing, transposition, normalisation, configurations.
    ``base_features`` sets the U-Net's first-stage width (nnU-Net's 32; narrower for CPU budgets);
    ``spacing_override_mm`` (one value, or one per image axis) replaces the planned target
    spacing, like nnU-Net's ``overwrite_target_spacing``; ``width_multiplier`` sizes HYATT-Net and
    H3DE-Net instead of the budget (1.0: the papers' width)."""
    ndim = fingerprint["spatial_dims"]
    spacings = np.asarray(fingerprint["spacings_mm"], float)
    shapes = np.asarray(fingerprint["shapes"], float)
    axes = transpose_axes(np.median(spacings, axis=0))
    spacings, shapes = spacings[:, axes], shapes[:, axes]
    target = target_spacing_mm(spacings, shapes)
    if spacing_override_mm is not None:
        target = checked_spacing_override(spacing_override_mm, ndim)[axes]
    shapes_at_target = shapes * spacings / target
    median_shape = np.median(shapes_at_target, axis=0)
    if int(base_features) < 1:
        raise ValueError(f"base features {base_features}: the U-Net needs at least 1")
    if width_multiplier is not None and not 0 < width_multiplier <= 4:
        raise ValueError(f"width {width_multiplier}: give a multiplier above 0 and at most 4")
    context = _PlanningContext(fingerprint, gpu_memory_gb, width_multiplier)
    configurations = _configurations(
        context, target, median_shape, float(np.prod(shapes_at_target, axis=1).sum()), base_features
    )
    return Plan(
        dataset=fingerprint["dataset"],
        spatial_dims=ndim,
        landmarks=fingerprint["landmarks"],
        modalities=fingerprint["modalities"],
        gpu_memory_gb=gpu_memory_gb,
        base_features=base_features,
        target_spacing_overridden=spacing_override_mm is not None,
        width_multiplier=width_multiplier,
        reorient=True,  # every image permuted and flipped to the canonical orientation first
        fingerprint_signature=fingerprint["input_signature"],
        transpose_forward=axes,
        transpose_backward=[int(i) for i in np.argsort(axes)],
        target_spacing_mm=[float(s) for s in target],
        median_shape_at_target=[float(s) for s in median_shape],
        normalization=normalization(fingerprint["modalities"], fingerprint["intensity"]),
        default_configuration=next(iter(configurations)),
        configurations=configurations,
        training=training_defaults(),
    )


def _configurations(
    context: _PlanningContext,
    target: np.ndarray,
    median_shape: np.ndarray,
    dataset_voxels: float,
    base_features: int,
) -> dict[str, Configuration]:
    """The full-resolution configuration, preceded by a coarse-to-fine cascade (the default,
    listed first) when one patch sees less than half the median image."""
    ndim = len(target)
    full = fit_patch_to_budget(
        target,
        median_shape,
        context.gpu_memory_gb,
        context.num_landmarks,
        base_features=base_features,
    )
    base = "2d" if ndim == 2 else "3d"
    configurations = {}
    if np.prod(median_shape) > CASCADE_AREA_RATIO * np.prod(full.patch_size):
        factor = float(np.max(median_shape / np.asarray(full.patch_size)))
        coarse_spacing = target * factor
        coarse_shape = np.ceil(median_shape / factor)
        coarse = network_topology(coarse_shape.astype(int), coarse_spacing, base_features)
        fine_patch = np.maximum(np.asarray(full.patch_size) / factor, MIN_FINE_PATCH[ndim])
        fine_patch = np.minimum(fine_patch, median_shape).astype(int)
        fine = network_topology(fine_patch, target, base_features)
        configurations[f"{base}_coarse"] = _configuration(
            context,
            f"{base}_coarse",
            "coarse",
            coarse_spacing,
            coarse,
            dataset_voxels / factor**ndim,
            next_stage=f"{base}_fine",
            downsampling_factor=factor,
        )
        configurations[f"{base}_fine"] = _configuration(
            context,
            f"{base}_fine",
            "fine",
            target,
            fine,
            dataset_voxels,
            previous_stage=f"{base}_coarse",
        )
    full_name = "2d" if ndim == 2 else "3d_fullres"
    configurations[full_name] = _configuration(
        context, full_name, "full", target, full, dataset_voxels
    )
    return configurations


def training_defaults() -> TrainingSettings:
    """How to train, unless the command line says otherwise: AdamW with a linear warm-up and
    a cosine decay; learning rates per architecture from their papers (HYATT-Net 4.5e-4,
    H3DE-Net 1e-3) and 1e-3 for the U-Net; nnU-Net's gradient clipping and landmark share; the
    balanced heatmap loss (plain MSE stalls on an empty map when landmarks cover < 1 % of a patch)."""
    return TrainingSettings(
        epochs=200,
        iterations_per_epoch=250,
        optimizer="adamw",
        schedule="cosine",
        learning_rate={"unet": 1e-3, "hyatt": 4.5e-4, "h3de": 1e-3},
        weight_decay=0.01,
        sgd_momentum=0.99,
        warmup_epochs=10,
        grad_clip=12.0,
        landmark_fraction=0.33,
        validate_every=10,
        ema_decay=None,
        loss="balanced_mse",
        missing_target="mask",
        folds=5,
    )


def plan_summary(plan: Plan) -> str:
    """A few human-readable lines describing the plan's decisions."""
    lines = [
        f"dataset {plan.dataset}: {plan.spatial_dims}D, {len(plan.landmarks)} landmarks, "
        f"GPU budget {plan.gpu_memory_gb} GB",
        f"target spacing {_mm(plan.target_spacing_mm)} (axes {plan.transpose_forward}), "
        f"median image {'x'.join(str(round(s)) for s in plan.median_shape_at_target)} voxels",
        "normalisation: " + ", ".join(n.scheme for n in plan.normalization),
    ]
    for name, config in plan.configurations.items():
        stages = len(config.topology.strides) if config.topology is not None else "?"
        lines.append(
            f"  {name:<10} {config.stage:<6} spacing {_mm(config.spacing_mm)}  patch "
            f"{'x'.join(map(str, config.patch_size))}  batch {config.batch_size}  "
            f"stages {stages}  sigma {config.heatmap_sigma_mm:.3g} mm  "
            f"~{config.estimated_gpu_memory_gb:.1f} GB  ({network_widths(config)})"
        )
    lines.append(f"default configuration: {plan.default_configuration}")
    return "\n".join(lines)


def network_widths(configuration: Configuration) -> str:
    """How wide each planned network is: the U-Net's first-stage features, the attention
    networks' width multiplier (1 = the paper's)."""
    parts = []
    for arch, sizes in configuration.architectures.items():
        if "width_multiplier" in sizes:
            parts.append(f"{arch} width {sizes['width_multiplier']:g}")
        elif "features_per_stage" in sizes:
            parts.append(f"{arch} {sizes['features_per_stage'][0]} base features")
    return ", ".join(parts)


def _mm(values: Sequence[float]) -> str:
    return "x".join(f"{v:.3g}" for v in values) + " mm"
