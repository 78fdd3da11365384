"""Peer comparison: the `landmarker` toolkit (predict-idlab, PyPI ``landmarker``) on ISBI 2015,
same data, split and CPU budget as ``benchmarks/isbi2015.py``: train on 001-150, report test1
(151-300) against the mean of the senior and junior annotators, 0.1 mm per pixel. Prints MRE, SD
and SDR at 2 / 2.5 / 3 / 4 mm (same definitions as medlandmark) and training samples/s, and writes
OUT/results.json. It does not import medlandmark: it runs in landmarker's own environment.

The model is the one landmarker's documentation recommends for 2D (Getting Started and the
ISBI 2015 example): OriginalSpatialConfigurationNet, adaptive (learnable) Gaussian heatmaps
(sigma 3, gamma 100) on 512x512 resized-and-padded images, GaussianHeatmapL2Loss(alpha=5),
SGD lr 1e-6, momentum 0.99 Nesterov, weight decay 1e-3, batch 1, the example's MONAI
augmentation, local soft-argmax decoding. Unlike the example, test1 is not used for validation,
early stopping or the plateau scheduler (it is the test split); the scheduler steps on the
epoch's training loss instead.

Environment (separate from the project's .venv; landmarker and torchvision are not project
dependencies). The torchvision wheels on PyPI are CUDA builds; 0.28.0 is the one made for
torch 2.13.0 (``Requires-Dist: torch==2.13.0``), which the CPU build ``2.13.0+cpu`` satisfies:

    python3 -m venv /tmp/landmarker-venv
    /tmp/landmarker-venv/bin/pip install torch==2.13.0            # the CPU build on this machine
    echo "torch==2.13.0" > /tmp/landmarker-constraints.txt
    PIP_CONSTRAINT=/tmp/landmarker-constraints.txt /tmp/landmarker-venv/bin/pip install landmarker==0.4.1

pip then resolves torchvision 0.28.0+cu130. Its compiled ops (torchvision/_C.so) link
libc10_cuda.so / libtorch_cuda.so / libcudart.so.13, which the CPU torch does not have, so
``import torchvision`` fails with "RuntimeError: operator torchvision::nms does not exist" (its
_meta_registrations registers fake kernels for nms and qnms unconditionally). landmarker only
uses the pure-Python ``torchvision.transforms.functional.pad`` / ``resize``, so this script
declares the schemas of those two operators (no kernels) before importing landmarker:
see ``declare_torchvision_ops_if_unloadable``. Every compiled torchvision op still raises if
called; nothing on landmarker's heatmap path calls one.

    /tmp/landmarker-venv/bin/python benchmarks/landmarker_isbi.py --budget-minutes 45 --threads 1
    /tmp/landmarker-venv/bin/python benchmarks/landmarker_isbi.py --budget-minutes 1 \\
        --max-train-cases 4 --max-test-cases 4 --threads 1                  # smoke test

Options: --source (default ../shared/data/isbi2015), --out (default
benchmarks/work/landmarker_isbi/<run>), --image-size (default 512, landmarker's), --lr (default
1e-6, landmarker's), --threads, --seed.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from host import cpu_model
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "isbi2015"
DEFAULT_WORK = ROOT / "benchmarks" / "work" / "landmarker_isbi"
SPACING_MM = 0.1
N_LANDMARKS = 19
RADII_MM = (2.0, 2.5, 3.0, 4.0)
SDR_TOLERANCE_MM = 1e-6  # as medlandmark: an error equal to the radius is a success
SPLITS = {"train": ("TrainingData", range(1, 151)), "test1": ("Test1Data", range(151, 301))}
ANNOTATORS = ("400_senior", "400_junior")

# landmarker's documented recipe (Getting Started; examples/2D-example-ISBI2015-adaptive-...)
RECIPE = {
    "model": "OriginalSpatialConfigurationNet(in_channels=1, out_channels=19)",
    "heatmaps": "GaussianHeatmapGenerator(sigmas=3, gamma=100, learnable=True)",
    "loss": "GaussianHeatmapL2Loss(alpha=5)",
    "optimizer": "SGD(lr=1e-6 unless --lr, momentum=0.99, nesterov=True), weight decay 1e-3 on the model",
    "scheduler": "ReduceLROnPlateau(factor=0.5, patience=10, cooldown=10) on the epoch's training loss",
    "batch_size": 1,
    "decoder": "heatmap_to_coord(method='local_soft_argmax')",
    "resize": "resize_with_pad to a square image (landmarker's LandmarkDataset dim_img)",
}
SIGMA, GAMMA, ALPHA, LR, MOMENTUM, WEIGHT_DECAY = 3.0, 100.0, 5.0, 1e-6, 0.99, 1e-3

_TORCHVISION_SHIM = None  # the torch.library.Library that declares the ops; kept alive


def declare_torchvision_ops_if_unloadable() -> str:
    """Load torchvision's compiled ops; where they cannot load against this torch, declare the
    two operators its import registers fake kernels for, so that ``import torchvision`` works."""
    global _TORCHVISION_SHIM
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "torchvision is not installed here: run with the landmarker venv's python (see the docstring)"
        )
    libraries = sorted(Path(spec.origin).parent.glob("_C*.so"))
    if not libraries:
        return "torchvision has no compiled ops library"
    try:
        torch.ops.load_library(str(libraries[0]))
        return f"compiled ops loaded ({libraries[0].name})"
    except OSError:
        reason = dlopen_error(libraries[0])
    _TORCHVISION_SHIM = torch.library.Library("torchvision", "DEF")
    for name in ("nms", "qnms"):
        _TORCHVISION_SHIM.define(
            f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
        )
    return f"compiled ops not loadable ({libraries[0].name}: {reason}); nms/qnms schemas declared, no kernels"


def dlopen_error(library: Path) -> str:
    """Why the dynamic loader refuses ``library`` (torch's own message does not say)."""
    try:
        ctypes.CDLL(str(library))
    except OSError as error:
        return str(error)
    return "loads with ctypes, not with torch.ops.load_library"


TORCHVISION_OPS = declare_torchvision_ops_if_unloadable()

import landmarker  # noqa: E402  (after the torchvision declaration above)
import torchvision  # noqa: E402
from landmarker.data import LandmarkDataset  # noqa: E402
from landmarker.heatmap import GaussianHeatmapGenerator, heatmap_to_coord  # noqa: E402
from landmarker.losses import GaussianHeatmapL2Loss  # noqa: E402
from landmarker.models import OriginalSpatialConfigurationNet  # noqa: E402
from landmarker.transforms.images import resize_with_pad  # noqa: E402
from landmarker.transforms.landmarks import resize_landmarks  # noqa: E402
from landmarker.utils import pixel_to_unit  # noqa: E402
from monai.transforms import (  # noqa: E402
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandHistogramShiftd,
    RandScaleIntensityd,
    ScaleIntensityd,
)
from torch.utils.data import DataLoader  # noqa: E402

# --- data ----------------------------------------------------------------------------------------


def case_ids(split: str, limit: int | None) -> list[str]:
    """The split's case ids ``001``..., the first ``limit`` of them when given."""
    ids = [f"{i:03d}" for i in SPLITS[split][1]]
    return ids[:limit] if limit else ids


def annotation_px(path: Path) -> np.ndarray:
    """The 19 ``x,y`` pixel points of one ISBI annotation file as (19, 2) floats."""
    lines = [line for line in path.read_text().splitlines() if line.strip()][:N_LANDMARKS]
    points = np.array([[float(v) for v in line.split(",")[:2]] for line in lines])
    if points.shape != (N_LANDMARKS, 2):
        raise SystemExit(f"{path}: expected {N_LANDMARKS} lines 'x,y', got {points.shape[0]}")
    return points


def ground_truth_yx_px(source: Path, case: str) -> np.ndarray:
    """Mean of the senior and junior annotators, in landmarker's (row, column) order."""
    xy = np.mean(
        [annotation_px(source / "AnnotationsByMD" / a / f"{case}.txt") for a in ANNOTATORS], axis=0
    )
    return xy[:, ::-1].copy()


def image_path(source: Path, split: str, case: str) -> Path:
    """The case's image (JPEG re-encodings here; BMP in the official release)."""
    folder = source / "RawImage" / SPLITS[split][0]
    for suffix in (".jpg", ".bmp", ".png"):
        if (folder / f"{case}{suffix}").is_file():
            return folder / f"{case}{suffix}"
    raise SystemExit(f"{folder}: no image for case {case}")


def grey_image(path: Path) -> torch.Tensor:
    """The image as a (1, rows, cols) float tensor (the three channels are identical)."""
    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32).copy())[None]


def load_split(source: Path, split: str, limit: int | None, size: int) -> dict:
    """Images resized-and-padded to ``size`` square and landmarks in that frame, exactly as
    landmarker's LandmarkDataset(dim_img=...) does, one image at a time (the dataset class reads
    every full-size image first, as 3 x 1935 x 2400 float32: 8.4 GB per 150-image split)."""
    images, points, dims, paddings, truths = [], [], [], [], []
    ids = case_ids(split, limit)
    for case in ids:
        img = grey_image(image_path(source, split, case))
        truth = torch.from_numpy(ground_truth_yx_px(source, case)).float()
        dim_original = torch.tensor(img.shape[-2:]).float()
        img, pad = resize_with_pad(img, (size, size))
        padding = torch.Tensor(pad)
        images.append(img)
        points.append(resize_landmarks(truth, dim_original, (size, size), padding))
        dims.append(dim_original)
        paddings.append(padding)
        truths.append(truth)
    return {
        "ids": ids,
        "images": images,
        "points": torch.stack(points),
        "dims": torch.stack(dims),
        "paddings": torch.stack(paddings),
        "truth_px": torch.stack(truths),
    }


def train_transform(seed: int) -> Compose:
    """The ISBI example's augmentation (its UseOnlyFirstChannel is moot: images are grey)."""
    keys = ("image",)
    transform = Compose(
        [
            ScaleIntensityd(keys),
            RandGaussianNoised(keys, prob=0.2, mean=0, std=0.1),
            RandScaleIntensityd(keys, factors=0.25, prob=0.2),
            RandAdjustContrastd(keys, prob=0.2, gamma=(0.5, 4.5)),
            RandHistogramShiftd(keys, prob=0.2),
            ScaleIntensityd(keys),
            RandAffined(
                keys,
                prob=1,
                rotate_range=(-np.pi / 12, np.pi / 12),
                translate_range=(-10, 10),
                scale_range=(-0.1, 0.1),
                shear_range=(-0.1, 0.1),
            ),
        ]
    )
    transform.set_random_state(seed=seed)
    return transform


# --- training and prediction ---------------------------------------------------------------------


def train_within_budget(
    train: dict, size: int, budget_s: float, seed: int, lr: float
) -> tuple[torch.nn.Module, dict]:
    """landmarker's training loop, stopped before a step that would end past the budget."""
    torch.manual_seed(seed)
    dataset = LandmarkDataset(
        imgs=train["images"],
        landmarks=train["points"],
        pixel_spacing=(SPACING_MM, SPACING_MM),
        transform=train_transform(seed),
        store_imgs=True,
        dim_img=None,
    )
    loader = DataLoader(
        dataset,
        batch_size=RECIPE["batch_size"],
        shuffle=True,
        num_workers=0,
        generator=torch.Generator().manual_seed(seed),
    )
    model = OriginalSpatialConfigurationNet(in_channels=1, out_channels=N_LANDMARKS)
    generator = GaussianHeatmapGenerator(
        nb_landmarks=N_LANDMARKS,
        sigmas=SIGMA,
        gamma=GAMMA,
        heatmap_size=(size, size),
        learnable=True,
    )
    optimizer = torch.optim.SGD(
        [
            {"params": model.parameters(), "weight_decay": WEIGHT_DECAY},
            {"params": generator.sigmas},
            {"params": generator.rotation},
        ],
        lr=lr,
        momentum=MOMENTUM,
        nesterov=True,
    )
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.5, patience=10, cooldown=10
    )
    criterion = GaussianHeatmapL2Loss(alpha=ALPHA)
    step_s, steps, epochs, losses, started = [], 0, 0, [], time.perf_counter()
    model.train()
    while not over_budget(started, step_s, budget_s):
        epoch_losses = []
        for batch in loader:
            if over_budget(started, step_s, budget_s):
                break
            step_started = time.perf_counter()
            optimizer.zero_grad()
            outputs = model(batch["image"])
            loss = criterion(outputs, generator.sigmas, generator(batch["landmark"]))
            loss.backward()
            optimizer.step()
            step_s.append(time.perf_counter() - step_started)
            epoch_losses.append(loss.item())
            steps += 1
            print(
                f"step {steps} (epoch {epochs + 1}): loss {loss.item():.4g}, {step_s[-1]:.1f} s",
                file=sys.stderr,
            )
        if len(epoch_losses) == len(loader):
            epochs += 1
            scheduler.step(float(np.mean(epoch_losses)))
        losses += epoch_losses
    training_s = time.perf_counter() - started
    samples = steps * RECIPE["batch_size"]
    return model, {
        "budget_s": budget_s,
        "training_s": round(training_s, 1),
        "within_budget": training_s <= budget_s,
        "steps": steps,
        "samples": samples,
        "epochs_completed": epochs,
        "train_cases": len(dataset),
        "samples_per_s": round(samples / training_s, 4) if training_s > 0 else None,
        "median_step_s": round(float(np.median(step_s)), 2) if step_s else None,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "learned_sigma_mean": round(float(generator.sigmas.detach().mean()), 4),
    }


def over_budget(started: float, step_s: list[float], budget_s: float) -> bool:
    """The next step (as long as the last one) would end past the budget."""
    return time.perf_counter() - started + (step_s[-1] if step_s else 0.0) > budget_s


@torch.no_grad()
def predict_px(model: torch.nn.Module, test: dict, size: int) -> tuple[torch.Tensor, float]:
    """(N, 19, 2) predictions in original (row, column) pixels, and seconds per case."""
    model.eval()
    scale = ScaleIntensityd(("image",))
    predictions, started = [], time.perf_counter()
    for i, img in enumerate(test["images"]):
        scaled = scale({"image": img})["image"]
        heatmaps = model(
            torch.Tensor(scaled.as_tensor() if hasattr(scaled, "as_tensor") else scaled)[None]
        )
        coords = heatmap_to_coord(heatmaps, method="local_soft_argmax")
        predictions.append(
            pixel_to_unit(
                coords.float(),
                pixel_spacing=torch.ones(1, 2),
                dim=(size, size),
                dim_orig=test["dims"][i : i + 1],
                padding=test["paddings"][i : i + 1],
            )[0]
        )
    return torch.stack(predictions), (time.perf_counter() - started) / max(len(test["images"]), 1)


# --- metrics (medlandmark's definitions, recomputed here) ----------------------------------------


def radial_errors_mm(pred_px: torch.Tensor, truth_px: torch.Tensor) -> np.ndarray:
    """Euclidean distances (N, 19) in mm between predicted and ground-truth points."""
    return np.linalg.norm((pred_px.double() - truth_px.double()).numpy() * SPACING_MM, axis=-1)


def error_summary(errors_mm: np.ndarray) -> dict:
    """MRE, population SD, median, max and SDR (percent with error <= r) over all points."""
    values = errors_mm.ravel()
    return {
        "n_points": int(values.size),
        "mre_mm": float(values.mean()),
        "sd_mm": float(values.std(ddof=0)),
        "median_mm": float(np.median(values)),
        "max_mm": float(values.max()),
        "sdr": {str(r): float(100.0 * np.mean(values <= r + SDR_TOLERANCE_MM)) for r in RADII_MM},
        "mre_per_landmark_mm": [round(float(v), 4) for v in errors_mm.mean(axis=0)],
    }


# --- the run -------------------------------------------------------------------------------------


def environment() -> dict:
    """Package versions, torchvision's ops status, CPU, threads and load."""
    return {
        "landmarker": landmarker.__version__
        if hasattr(landmarker, "__version__")
        else version("landmarker"),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "monai": version("monai"),
        "torchvision_ops": TORCHVISION_OPS,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_1_5_15": [round(v, 2) for v in os.getloadavg()],
    }


def results_text(results: dict) -> str:
    """The run as Markdown: environment, training and the test1 row."""
    env, train, test = results["environment"], results["training"], results["test1"]
    sdr = " / ".join(f"{test['sdr'][str(r)]:.3f}" for r in RADII_MM)
    return "\n".join(
        [
            f"## landmarker {env['landmarker']} on ISBI 2015: {train['budget_s'] / 60:g} min of training, "
            f"{results['config']['image_size']}x{results['config']['image_size']} SCN",
            f"machine: {env['cpu']}, {env['cores']} cores, torch {env['torch']} ({env['torch_threads']} threads), "
            f"torchvision {env['torchvision']}, monai {env['monai']}; load {' / '.join(map(str, results['load_at_start']))} "
            f"at the start, {' / '.join(map(str, env['load_1_5_15']))} at the end",
            f"torchvision ops: {env['torchvision_ops']}",
            f"date: {results['date']}",
            f"command: {results['command']}",
            "",
            "| train cases | steps (epochs) | s/step (median) | samples/s | budget s | used s | within | data prep s |",
            "|---|---|---|---|---|---|---|---|",
            f"| {train['train_cases']} | {train['steps']} ({train['epochs_completed']}) | {train['median_step_s']} "
            f"| {train['samples_per_s']} | {train['budget_s']:.0f} | {train['training_s']:.0f} "
            f"| {'yes' if train['within_budget'] else 'NO'} | {results['data_prep_s']:.1f} |",
            "",
            "| split | cases | points | MRE | SD | SDR 2 / 2.5 / 3 / 4 mm | s per case |",
            "|---|---|---|---|---|---|---|",
            f"| test1 | {test['n_cases']} | {test['n_points']} | {test['mre_mm']:.3f} mm | {test['sd_mm']:.3f} mm "
            f"| {sdr} % | {test['predict_s_per_case']:.2f} |",
        ]
    )


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, suffix=".partial", delete=False, encoding="utf-8"
    ) as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


def run_name(args: argparse.Namespace) -> str:
    """``45min``, with what else the command line changed."""
    parts = [
        f"{args.budget_minutes:g}min",
        f"{args.image_size}px" if args.image_size != 512 else "",
        f"train{args.max_train_cases}" if args.max_train_cases else "",
        f"test{args.max_test_cases}" if args.max_test_cases else "",
        f"lr{args.lr:g}" if args.lr != LR else "",
        f"seed{args.seed}" if args.seed else "",
    ]
    return "-".join(filter(None, parts))


def main(argv: list[str] | None = None) -> dict:
    """Load both splits, train within the budget, predict test1, print and write the results."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=45.0,
        help="training wall clock (default: %(default)s)",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=DEFAULT_SOURCE,
        help="ISBI 2015 folder (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default: benchmarks/work/landmarker_isbi/<run>)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=512,
        help="square network input (landmarker's example: 512)",
    )
    parser.add_argument(
        "--max-train-cases",
        type=int,
        default=None,
        help="first N training cases only (smoke tests)",
    )
    parser.add_argument(
        "--max-test-cases", type=int, default=None, help="first N test1 cases only (smoke tests)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="PyTorch CPU threads (default: torch's)"
    )
    parser.add_argument(
        "--lr", type=float, default=LR, help="SGD learning rate (landmarker's: %(default)g)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (args.source / "RawImage").is_dir():
        raise SystemExit(f"{args.source}: ISBI 2015 data not found (RawImage/ missing)")
    if args.threads:
        torch.set_num_threads(args.threads)
    started, load_at_start = time.perf_counter(), [round(v, 2) for v in os.getloadavg()]
    train = load_split(args.source, "train", args.max_train_cases, args.image_size)
    test = load_split(args.source, "test1", args.max_test_cases, args.image_size)
    data_prep_s = time.perf_counter() - started
    model, training = train_within_budget(
        train, args.image_size, args.budget_minutes * 60, args.seed, args.lr
    )
    pred_px, predict_s = predict_px(model, test, args.image_size)
    errors_mm = radial_errors_mm(pred_px, test["truth_px"])
    out = args.out or DEFAULT_WORK / run_name(args)
    results = {
        "tool": "landmarker",
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_at_start": load_at_start,
        "config": {
            **RECIPE,
            "lr": args.lr,
            "image_size": args.image_size,
            "seed": args.seed,
            "source": str(args.source),
        },
        "data_prep_s": round(data_prep_s, 1),
        "training": training,
        "test1": {
            "n_cases": len(test["ids"]),
            **error_summary(errors_mm),
            "predict_s_per_case": round(predict_s, 3),
        },
        "predictions_px_yx": {case: pred_px[i].tolist() for i, case in enumerate(test["ids"])},
        "total_s": round(time.perf_counter() - started, 1),
    }
    results["environment"] = environment()
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    print(results_text(results))
    print(f"results: {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
