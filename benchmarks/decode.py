"""Sub-voxel decoding accuracy: every method of `decode_heatmaps` on synthetic heatmaps whose
true centre is known, in 2D and 3D (error = Euclidean distance in voxels).

Conditions (sigma 1.5-5 voxels, random sub-voxel centres away from the borders):
  clean     isotropic Gaussians, peak 1
  noise05   the same + additive Gaussian noise, std 0.05 (5 % of the peak)
  noise10   the same + additive Gaussian noise, std 0.10
  blob      network-like: a rotated anisotropic (axes x0.75-1.33) non-Gaussian blob
            exp(-m^(beta/2)/2), beta 1.5-3 (cusp to flat top), peak 0.5-1, noise std 0.03

    python benchmarks/decode.py [--trials 2000] [--seed 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from medlandmark.heatmaps import AUTO_METHOD, decode_heatmaps

SIZE = {2: 48, 3: 32}  # array side per dimensionality
MARGIN = {2: 12, 3: 10}  # voxels kept clear of the borders
METHODS = {  # label -> (method, window)
    "argmax": ("argmax", 6),
    "quadratic": ("quadratic", 6),
    "centroid": ("centroid", 6),
    "centroid_w2": ("centroid", 2),
    "gaussian_fit": ("gaussian_fit", 6),
}
CONDITIONS = ("clean", "noise05", "noise10", "blob")


def synthetic(condition: str, ndim: int, trials: int, generator: torch.Generator):
    """Heatmaps (1, trials, *shape) of ``condition`` and their true centres (1, trials, D)."""
    side, margin = SIZE[ndim], MARGIN[ndim]
    centres = margin + torch.rand(trials, ndim, generator=generator) * (side - 1 - 2 * margin)
    sigma = 1.5 + 3.5 * torch.rand(trials, 1, generator=generator)
    if condition == "blob":
        axes = sigma * torch.exp(
            torch.empty(trials, ndim).uniform_(-0.29, 0.29, generator=generator)
        )
        rotation, _ = torch.linalg.qr(torch.randn(trials, ndim, ndim, generator=generator))
        beta = torch.empty(trials, 1).uniform_(1.5, 3.0, generator=generator)
        amplitude = torch.empty(trials, 1).uniform_(0.5, 1.0, generator=generator)
        noise = 0.03
    else:
        axes = sigma.expand(trials, ndim)
        rotation = torch.eye(ndim).expand(trials, ndim, ndim)
        beta, amplitude = torch.full((trials, 1), 2.0), torch.ones(trials, 1)
        noise = {"clean": 0.0, "noise05": 0.05, "noise10": 0.10}[condition]
    grid = torch.stack(
        torch.meshgrid(*[torch.arange(side, dtype=torch.float32)] * ndim, indexing="ij"), -1
    )
    grid = grid.reshape(-1, ndim)
    heatmaps = []
    for start in range(0, trials, 100):
        part = slice(start, start + 100)
        # coordinates along the blob's own axes
        local = (grid[None] - centres[part, None]) @ rotation[part]
        squared = ((local / axes[part, None]) ** 2).sum(-1)
        heatmaps.append(amplitude[part] * torch.exp(-0.5 * squared ** (beta[part] / 2)))
    heatmaps = torch.cat(heatmaps).reshape(1, trials, *[side] * ndim)
    heatmaps = heatmaps + noise * torch.randn(heatmaps.shape, generator=generator)
    return heatmaps, centres[None]


def measure(trials: int, seed: int) -> list[dict]:
    """Mean and max error (voxels) and decoding time per dimensionality, condition and method."""
    rows = []
    for ndim in (2, 3):
        count = trials if ndim == 2 else max(trials // 4, 1)
        for index, condition in enumerate(CONDITIONS):
            generator = torch.Generator().manual_seed(seed * 100 + ndim * 10 + index)
            heatmaps, truth = synthetic(condition, ndim, count, generator)
            for label, (method, window) in METHODS.items():
                start = time.perf_counter()
                decoded = decode_heatmaps(heatmaps, method, window=window)
                seconds = time.perf_counter() - start
                error = (decoded.points - truth).norm(dim=-1)
                rows.append(
                    {
                        "ndim": ndim,
                        "condition": condition,
                        "method": label,
                        "trials": count,
                        "mean_voxels": round(error.mean().item(), 4),
                        "max_voxels": round(error.max().item(), 4),
                        "ms_per_1000_channels": round(1e6 * seconds / count, 1),
                    }
                )
    return rows


def print_table(rows: list[dict]) -> None:
    """Mean / max error per method (columns) and dimensionality + condition (rows)."""
    labels = list(METHODS)
    print(f"{'D':>2} {'condition':<9} " + " ".join(f"{label:>17}" for label in labels))
    for ndim in (2, 3):
        for condition in CONDITIONS:
            cells = {
                r["method"]: r for r in rows if r["ndim"] == ndim and r["condition"] == condition
            }
            text = " ".join(
                f"{cells[label]['mean_voxels']:>8.4f}/{cells[label]['max_voxels']:<8.4f}"
                for label in labels
            )
            print(f"{ndim:>2} {condition:<9} {text}")
    print(f"(mean/max error in voxels; auto = {AUTO_METHOD})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--trials", type=int, default=2000, help="channels per 2D condition (3D: a quarter)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    rows = measure(args.trials, args.seed)
    if args.json:
        print(
            json.dumps(
                {
                    "auto": AUTO_METHOD,
                    "seed": args.seed,
                    "torch": torch.__version__,
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                    "rows": rows,
                },
                indent=1,
            )
        )
    else:
        print_table(rows)


if __name__ == "__main__":
    main()
