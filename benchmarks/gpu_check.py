"""The GPU check: training speed, memory and the share of the bf16 peak of every network, and a
short real training run, in one command (under 8 minutes on one H200).

For unet, hyatt (2D) and h3de (3D), at the size the plan gives them (ISBI 2015's and AFIDs'
default 8 GB plans) and at the papers' size (width 1; HYATT-Net on 1024 x 1216 images, H3DE-Net
on 128 x 128 x 64 patches): training samples/s and peak memory in bf16 autocast with the
channels-last layout, with and without ``torch.compile``, and the share of the measured bf16
matrix peak that the training step reaches (its FLOPs, 3x the forward's, over the time).
Then ISBI 2015's coarse stage trains for ``--train-minutes`` (``train --time-budget``) and must
reach a validation MRE under 3 mm. Writes ``OUT/gpu_check.json`` and prints a table.

    python benchmarks/gpu_check.py --out $OUT            # on the GPU machine
    python benchmarks/gpu_check.py --tiny --out /tmp/gc  # the same code on a CPU, in seconds

See docs/training.md ("The GPU check") for running it through the device tool.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from medlandmark.datasets.converters import convert_isbi2015
from medlandmark.datasets.synthetic import make_synthetic_dataset
from medlandmark.models import channels_last, count_parameters, forward_flops, network_for
from medlandmark.planning import plan_dataset
from medlandmark.planning.planner import architecture_sizes, network_topology, training_defaults
from medlandmark.preprocessing import preprocess_dataset
from medlandmark.records.plan import Configuration
from medlandmark.records.run import RunSettings
from medlandmark.training.loop import TrainOptions, heatmap_training_loss, train

REPO = Path(__file__).resolve().parents[1]
ISBI = REPO.parent / "shared" / "data" / "isbi2015"
MRE_TARGET_MM = 3.0
LANDMARKS = {2: 19, 3: 32}  # ISBI 2015 and AFIDs


@dataclass(frozen=True)
class Case:
    """One network at one size: the architecture, which size, the patch, batch and width."""

    arch: str
    size: str  # "planned" or "paper"
    patch: tuple[int, ...]
    batch: int
    width: float


CASES = [
    Case("unet", "planned", (768, 640), 4, 1.0),
    Case("hyatt", "planned", (768, 640), 4, 0.5),
    Case("hyatt", "paper", (1024, 1216), 2, 1.0),
    Case("unet", "planned", (128, 128, 128), 2, 1.0),
    Case("h3de", "planned", (128, 128, 128), 2, 0.5),
    Case("h3de", "paper", (128, 128, 64), 2, 1.0),
]
TINY_CASES = [
    Case("unet", "planned", (64, 64), 2, 1.0),
    Case("hyatt", "paper", (64, 64), 2, 0.25),
    Case("h3de", "paper", (32, 32, 32), 2, 0.25),
]


def bf16_matmul_tflops(device: torch.device, size: int, repeats: int) -> float:
    """The measured bf16 matrix rate: ``size``^3 products on random data, median of ``repeats``."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        started = _synchronized_time(device)
        a @ b
        times.append(_synchronized_time(device) - started)
    return 2 * size**3 / statistics.median(times) / 1e12


def configuration_for(case: Case) -> Configuration:
    """A plan configuration of ``case``'s patch with the planner's sizes at ``case.width``."""
    ndim = len(case.patch)
    topology = network_topology(case.patch, [1.0] * ndim)
    return Configuration(
        name="check",
        stage="full",
        data_identifier="data_fullres",
        spacing_mm=[1.0] * ndim,
        patch_size=topology.patch_size,
        batch_size=case.batch,
        heatmap_sigma_mm=3.0,
        heatmap_sigma_voxels=[3.0] * ndim,
        architectures=architecture_sizes(topology, ndim, 8.0, width=case.width),
    )


def time_training(case: Case, device: torch.device, compiled: bool, steps: int) -> dict:
    """samples/s, peak memory and achieved TFLOP/s of ``steps`` timed training steps."""
    configuration = configuration_for(case)
    ndim = len(case.patch)
    landmarks = LANDMARKS[ndim]
    model = network_for(case.arch, configuration, landmarks)
    parameters = count_parameters(model)
    shape = (1, 1, *configuration.patch_size)
    flops_per_sample = 3 * forward_flops(network_for(case.arch, configuration, landmarks), shape)
    model = channels_last(model.to(device), ndim)
    settings = RunSettings(
        **{**training_defaults().model_dump(), "learning_rate": 1e-4, "batch_size": case.batch}
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = torch.compile(model) if compiled else model
    images = channels_last(
        torch.randn(case.batch, 1, *configuration.patch_size, device=device), ndim
    )
    points = torch.rand(case.batch, landmarks, ndim, device=device) * torch.tensor(
        configuration.patch_size, device=device
    )
    autocast = device.type == "cuda"

    def one_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            outputs = step(images)
        heatmap_training_loss(model, outputs, points, configuration, settings).backward()
        optimizer.step()

    started = time.perf_counter()
    for _ in range(2):  # warm-up (and compilation)
        one_step()
    warm_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        begin = _synchronized_time(device)
        one_step()
        times.append(_synchronized_time(device) - begin)
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    return {
        **asdict(case),
        "compiled": compiled,
        "parameters_m": round(parameters / 1e6, 2),
        "samples_per_s": round(case.batch / step_s, 2),
        "step_s": round(step_s, 4),
        "warm_up_s": round(warm_s, 1),
        "peak_memory_gb": round(peak, 2),
        "tflops": round(flops_per_sample * case.batch / step_s / 1e12, 2),
    }


def short_training(work: Path, minutes: float, tiny: bool, isbi: Path = ISBI) -> dict:
    """ISBI 2015's coarse stage trained for ``minutes`` (a synthetic set with ``tiny``): its
    best validation MRE, which must be under 3 mm on ISBI."""
    if tiny:
        root = make_synthetic_dataset(work / "data", num_cases=10, size_px=64)
        plan = plan_dataset(root, gpu_memory_gb=1.0, base_features=8)
    else:
        root = convert_isbi2015(isbi, work / "data")
        plan = plan_dataset(root, gpu_memory_gb=8.0, spacing_override_mm=[0.4])
    configuration = plan.default_configuration
    preprocess_dataset(root, configurations=[configuration], workers=8)
    options = TrainOptions(
        configuration=configuration,
        epochs=10_000,
        iterations_per_epoch=50 if not tiny else 5,
        validate_every=4 if not tiny else 1,
        learning_rate=3e-3,
        loss="balanced_mse_centroid",
        time_budget_s=60.0 * minutes,
    )
    record = train(root, work / "run", options)
    mre = None if record.best is None else record.best.val_mre_mm
    return {
        "dataset": "synthetic" if tiny else "isbi2015",
        "configuration": configuration,
        "minutes": minutes,
        "steps": record.step,
        "train_seconds": record.train_seconds,
        "best_validation_mre_mm": mre,
        "target_mm": MRE_TARGET_MM,
        "met": None if tiny else (mre is not None and mre < MRE_TARGET_MM),
    }


def _synchronized_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _table(results: dict) -> str:
    lines = [
        f"{results['device']}: bf16 matrix peak {results['bf16_peak_tflops']:.3g} TFLOP/s (measured)",
        f"{'network':<8} {'size':<8} {'patch':<14} {'batch':>5} {'compile':>7} {'params M':>9} "
        f"{'samples/s':>10} {'peak GB':>8} {'TFLOP/s':>8} {'of peak':>8}",
    ]
    for row in results["networks"]:
        if "error" in row:
            lines.append(
                f"{row['arch']:<8} {row['size']:<8} {'x'.join(map(str, row['patch'])):<14} {row['error']}"
            )
            continue
        share = row["tflops"] / results["bf16_peak_tflops"]
        lines.append(
            f"{row['arch']:<8} {row['size']:<8} {'x'.join(map(str, row['patch'])):<14} {row['batch']:>5} "
            f"{'yes' if row['compiled'] else 'no':>7} {row['parameters_m']:>9.2f} {row['samples_per_s']:>10.2f} "
            f"{row['peak_memory_gb']:>8.2f} {row['tflops']:>8.3f} {share:>8.1%}"
        )
    run = results["training"]
    lines.append(
        f"training: {run['dataset']} {run['configuration']}, {run['steps']} steps in {run['train_seconds']} s, "
        f"best validation MRE {run['best_validation_mre_mm']} mm (target < {MRE_TARGET_MM} mm: {run['met']})"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny sizes on any device (the CPU test)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per network (default 10, tiny 2)"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--train-minutes", type=float, default=None, help="default 3 (tiny 0.1)")
    parser.add_argument("--isbi", type=Path, default=ISBI, help="ISBI 2015 (official layout)")
    parser.add_argument(
        "--deadline-minutes", type=float, default=7.5, help="skip what would start later"
    )
    args = parser.parse_args()
    device, started = torch.device(args.device), time.perf_counter()
    steps = args.steps or (2 if args.tiny else 10)
    results = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "bf16_peak_tflops": bf16_matmul_tflops(
            device, 512 if args.tiny else 8192, 3 if args.tiny else 10
        ),
        "networks": [],
    }
    minutes = args.train_minutes if args.train_minutes is not None else (0.1 if args.tiny else 3.0)
    reserve_s = 60.0 * minutes + (10 if args.tiny else 60)  # the training run and its set-up
    for case in TINY_CASES if args.tiny else CASES:
        for compiled in (False,) if args.no_compile else (False, True):
            if time.perf_counter() - started > 60 * args.deadline_minutes - reserve_s:
                results["networks"].append(
                    {**asdict(case), "compiled": compiled, "error": "skipped: deadline"}
                )
                continue
            try:
                results["networks"].append(time_training(case, device, compiled, steps))
            except (
                Exception
            ) as error:  # one network's failure (memory, compiler) is reported, not fatal
                message = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
                results["networks"].append({**asdict(case), "compiled": compiled, "error": message})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as work:
        results["training"] = short_training(Path(work), minutes, args.tiny, args.isbi)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1) + "\n")
    print(_table(results))
    print(f"wall {results['wall_s']} s; wrote {args.out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
