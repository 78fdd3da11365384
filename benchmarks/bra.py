"""Forward+backward time and peak memory of our BRA against the gather-based baseline.

    python benchmarks/bra.py [--json] [--device cpu|cuda] [--dtype float32|bfloat16]
                             [--cases NAME,NAME] [--reps 5] [--warmup 1]

Cases (batch 1): HYATT-Net stage 1 (1024x1216 input after the stride-2 conv: 512x608, dim 64,
2 heads, 16x16 regions, kv pooled to 4x4 per region), also at half size (256x304), and H3DE-Net
stage 1 (128x128x64 crop after the two stride-2 stem convs: 32x32x16, dim 64, 8 heads, 4x4x2
regions, no pooling); each with topk 1 (the papers' stage 1) and topk 4.

Before timing, each case asserts that both modules, holding the same weights, give the same
output and input gradient (largest difference at most 1e-4 in float32, 5e-2 in bfloat16, times
max(1, largest magnitude)). Time: median of ``--reps`` forward+backward
steps after ``--warmup`` steps, the two implementations interleaved, default thread count (the
1-minute load average at start and end is recorded: other processes on a shared machine slow
both implementations and add noise).
Peak memory: every (case, implementation) runs in a fresh subprocess that does one warm-up
step, then measures one step. On CPU it reads the peak resident set size (VmHWM, reset through
/proc/self/clear_refs after the warm-up) minus the resident size just before the step, with
glibc's MALLOC_MMAP_THRESHOLD_=65536 so freed tensors go back to the system at once and the
resident size follows live memory. On CUDA it is torch.cuda.max_memory_allocated minus the
memory allocated before the step. Both count the input gradient and outputs, equally for both.
The CPU measurement needs Linux (/proc).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bra_baseline import GatherBiLevelRoutingAttention  # noqa: E402

from medlandmark.models.routing_attention import BiLevelRoutingAttention  # noqa: E402

HYATT = {"dim": 64, "num_heads": 2, "n_win": 16, "kv_pool": 4, "spatial_dims": 2}
H3DE = {"dim": 64, "num_heads": 8, "n_win": (4, 4, 2), "kv_pool": None, "spatial_dims": 3}
CASES = {
    "hyatt_s1_top1": {**HYATT, "size": (512, 608), "topk": 1},
    "hyatt_s1_top4": {**HYATT, "size": (512, 608), "topk": 4},
    "hyatt_s1_half_top1": {**HYATT, "size": (256, 304), "topk": 1},
    "hyatt_s1_half_top4": {**HYATT, "size": (256, 304), "topk": 4},
    "h3de_s1_top1": {**H3DE, "size": (32, 32, 16), "topk": 1},
    "h3de_s1_top4": {**H3DE, "size": (32, 32, 16), "topk": 4},
}
IMPLS = {"ours": BiLevelRoutingAttention, "baseline": GatherBiLevelRoutingAttention}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def build(case: str, impl: str, device: str, dtype: torch.dtype):
    """(module, input, output gradient) of one case, with weights shared by both impls."""
    config = dict(CASES[case])
    size = config.pop("size")
    torch.manual_seed(0)
    reference = BiLevelRoutingAttention(**config)
    module = IMPLS[impl](**config)
    module.load_state_dict(reference.state_dict())
    module = module.to(device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(1)
    shape = (1, config["dim"], *size)
    x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype).requires_grad_()
    grad = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    return module, x, grad


def step(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    """One forward+backward."""
    module(x).backward(grad)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_same(case: str, device: str, dtype: torch.dtype) -> dict:
    """Assert both implementations agree on output and input gradient; the largest differences."""
    results = []
    for impl in IMPLS:
        module, x, grad = build(case, impl, device, dtype)
        out = module(x)
        out.backward(grad)
        results.append((out.detach().float(), x.grad.float()))
        del module, x, grad, out
    (out_a, grad_a), (out_b, grad_b) = results
    diffs = {}
    for key, ours, base in [("out", out_a, out_b), ("grad", grad_a, grad_b)]:
        diff = (ours - base).abs().max().item()
        if not diff <= TOLERANCE[dtype] * max(1.0, base.abs().max().item()):
            raise AssertionError(f"{case}: ours and baseline differ (max |{key} diff| {diff:.3g})")
        diffs[f"max_abs_diff_{key}"] = diff
    return diffs


def time_ms(case: str, device: str, dtype: torch.dtype, reps: int, warmup: int) -> dict:
    """Median forward+backward milliseconds per implementation, interleaved."""
    built = {impl: build(case, impl, device, dtype) for impl in IMPLS}
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for i in range(warmup + reps):
        for impl, (module, x, grad) in built.items():
            x.grad = None
            module.zero_grad(set_to_none=True)
            sync(device)
            start = time.perf_counter()
            step(module, x, grad)
            sync(device)
            if i >= warmup:
                times[impl].append((time.perf_counter() - start) * 1e3)
    return {f"{impl}_ms": round(statistics.median(t), 1) for impl, t in times.items()}


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def peak_mb(case: str, impl: str, device: str, dtype: torch.dtype) -> float:
    """Peak extra memory of one forward+backward (run in a fresh process; see module doc)."""
    module, x, grad = build(case, impl, device, dtype)
    step(module, x, grad)
    x.grad = None
    module.zero_grad(set_to_none=True)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(module, x, grad)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = _status_kib("VmRSS")
    step(module, x, grad)
    return (_status_kib("VmHWM") - before) / 1024


def peak_mb_in_subprocess(case: str, impl: str, device: str, dtype_name: str) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    command = [sys.executable, __file__, "--worker", case, impl, "--device", device]
    command += ["--dtype", dtype_name]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory worker for {case}/{impl} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]


def run_case(case: str, device: str, dtype_name: str, reps: int, warmup: int) -> dict:
    dtype = getattr(torch, dtype_name)
    config = CASES[case]
    row = {
        "size": list(config["size"]),
        "batch": 1,
        "dim": config["dim"],
        "heads": config["num_heads"],
        "n_win": config["n_win"],
        "topk": config["topk"],
        "kv_pool": config["kv_pool"],
    }
    row.update(check_same(case, device, dtype))
    gc.collect()
    row.update(time_ms(case, device, dtype, reps, warmup))
    gc.collect()
    for impl in IMPLS:
        row[f"{impl}_peak_mb"] = round(peak_mb_in_subprocess(case, impl, device, dtype_name), 1)
    row["speedup"] = round(row["baseline_ms"] / row["ours_ms"], 2)
    row["memory_ratio"] = round(row["ours_peak_mb"] / row["baseline_peak_mb"], 3)
    return row


def print_table(results: dict) -> None:
    header = f"{'case':<20} {'ours ms':>9} {'base ms':>9} {'speedup':>8} "
    header += f"{'ours MB':>9} {'base MB':>9} {'mem ratio':>9}"
    print(header)
    for case, r in results["cases"].items():
        print(
            f"{case:<20} {r['ours_ms']:>9.1f} {r['baseline_ms']:>9.1f} {r['speedup']:>8.2f} "
            f"{r['ours_peak_mb']:>9.1f} {r['baseline_peak_mb']:>9.1f} {r['memory_ratio']:>9.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        case, impl = args.worker
        print(json.dumps({"peak_mb": peak_mb(case, impl, args.device, getattr(torch, args.dtype))}))
        return 0
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    started = time.perf_counter()
    results = {
        "meta": {
            "device": args.device,
            "dtype": args.dtype,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "reps": args.reps,
            "warmup": args.warmup,
            "timing": "median forward+backward ms",
            "memory": "peak extra MB of one forward+backward, fresh process per implementation",
            "loadavg_1min_start": round(os.getloadavg()[0], 2),
        },
        "cases": {},
    }
    for case in cases:
        results["cases"][case] = run_case(case, args.device, args.dtype, args.reps, args.warmup)
        if not args.json:
            print(f"done {case}", file=sys.stderr)
    results["meta"]["wall_s"] = round(time.perf_counter() - started, 1)
    results["meta"]["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    if args.json:
        print(json.dumps(results))
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
