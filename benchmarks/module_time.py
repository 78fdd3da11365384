"""Where a training step of a run's network spends its time: the whole step (forward, backward,
AdamW update) and the forward time of each top-level block, on a batch of the run's patches.

    .venv/bin/python benchmarks/module_time.py RUN_DIR [--batch N] [--repeats 5] [--threads 1]

RUN_DIR is a run folder (its run.json gives the network, configuration and batch size). Prints
one row per block (forward seconds and share of the forward pass) and the step time; the median
of ``--repeats`` timed steps after one warm-up step. Run it alone: timings on a busy machine
measure the other jobs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from medlandmark.models import network_for
from medlandmark.records.run import read_run_record


def forward_times(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Seconds of each direct child's forward calls during one forward pass of ``model``."""
    times: dict[str, float] = {}
    started: dict[str, float] = {}
    handles = []
    for name, child in blocks_of(model):

        def before(_module, _inputs, name=name):
            started[name] = time.perf_counter()

        def after(_module, _inputs, _output, name=name):
            times[name] = times.get(name, 0.0) + time.perf_counter() - started[name]

        handles += [child.register_forward_pre_hook(before), child.register_forward_hook(after)]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return times


def blocks_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The direct children, with those of a ModuleList (never called itself) in its place."""
    blocks = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList | nn.ModuleDict):
            blocks += [(f"{name}.{n}", c) for n, c in child.named_children()]
        else:
            blocks.append((name, child))
    return blocks


def step_seconds(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of forward + backward (sum of the outputs' squares) + an AdamW step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    timings = []
    for index in range(repeats + 1):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = sum(o.float().square().mean() for o in model(x))
        loss.backward()
        optimizer.step()
        if index:  # the first one warms up
            timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path)
    parser.add_argument("--batch", type=int, default=None, help="default: the run's batch size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    record = read_run_record(args.run)
    configuration = record.plan_configuration
    channels = len(record.plan.modalities)
    torch.manual_seed(0)
    model = network_for(record.arch, configuration, len(record.landmarks), channels).train()
    batch = args.batch or record.settings.batch_size
    x = torch.randn(batch, channels, *configuration.patch_size)
    forward_times(model, x)  # warm-up
    blocks = forward_times(model, x)
    total = sum(blocks.values())
    step = step_seconds(model, x, args.repeats)
    print(
        f"{record.arch} {configuration.name}, batch {batch} of {configuration.patch_size}, "
        f"{torch.get_num_threads()} threads"
    )
    print("| block | forward s | share of forward |")
    print("|---|---:|---:|")
    for name, seconds in sorted(blocks.items(), key=lambda item: -item[1]):
        print(f"| {name} | {seconds:.3f} | {100 * seconds / total:.1f} % |")
    print(f"training step (forward, backward, AdamW): {step:.3f} s (median of {args.repeats})")


if __name__ == "__main__":
    main()
