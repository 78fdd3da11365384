"""Seconds per U-Net training step (forward, backward, AdamW) on CPU, contiguous vs channels-last.

    .venv/bin/python benchmarks/train_step.py --dims 3 --size 24 --base-features 8 --batch 4

Random input, the network alone (no data loading or augmentation); prints each repeat's time.
"""

from __future__ import annotations

import argparse
import time

import torch

from medlandmark.models import build_model, channels_last
from medlandmark.planning.planner import architecture_sizes, network_topology


def step_seconds(
    dims: int, size: int, base_features: int, batch: int, layout: str, repeats: int
) -> list[float]:
    """Wall time of ``repeats`` training steps of the planned U-Net for a ``size``^dims patch."""
    topology = network_topology([size] * dims, [1.0] * dims, base_features)
    sizes = architecture_sizes(topology, dims, 1.0)["unet"]
    torch.manual_seed(0)
    model = build_model("unet", 7, 1, spatial_dims=dims, **sizes)
    x = torch.randn(batch, 1, *topology.patch_size)
    if layout == "channels-last":
        model, x = channels_last(model, dims), channels_last(x, dims)
    optimizer = torch.optim.AdamW(model.parameters())
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        loss = sum(o.float().pow(2).mean() for o in model(x))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dims", type=int, choices=[2, 3], default=3)
    parser.add_argument("--size", type=int, default=24)
    parser.add_argument("--base-features", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for layout in ("contiguous", "channels-last"):
        times = step_seconds(
            args.dims, args.size, args.base_features, args.batch, layout, args.repeats
        )
        print(
            f"{args.dims}D base {args.base_features} {args.size}^{args.dims} batch {args.batch} {layout}: "
            + " ".join(f"{t:.3f}" for t in times)
            + " s"
        )


if __name__ == "__main__":
    main()
