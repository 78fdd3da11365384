"""Fine-tuning from a few cases on ISBI 2015: is a model trained elsewhere a better start than
nothing? A base cascade trains on cases 001-100 (the CPU recipe, 45 min); then, on ten of the
cases 101-150 alone, one cascade fine-tunes from the base for 5 minutes (``train --init-from``:
a fifth of the rate, one warm-up epoch) and two train from scratch for 5 and for 45 minutes.
Every arm is planned like the base (``plan --plans-from``), validated on fold 0 of its own
cases and reports test1 (151-300).

    .venv/bin/python benchmarks/fine_tune_isbi.py --arms prepare
    .venv/bin/python benchmarks/fine_tune_isbi.py --arms base scratch-45 --threads 1   # 2 jobs
    .venv/bin/python benchmarks/fine_tune_isbi.py --arms fine-tune-5 scratch-5 --threads 1
    .venv/bin/python benchmarks/fine_tune_isbi.py --arms report

Arms run in the order given and write WORK/<arm>/arm.json; ``report`` prints the table from
those files. Options: --source, --work (default benchmarks/work/isbi2015-finetune), --few
(case ids, default 101-110), --threads, --device.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import isbi2015
import recipes
import torch
from recipes import SHARED_DATA, WORK

from medlandmark.datasets.dataset import Dataset, load_spec, write_spec
from medlandmark.io.files import atomic_write_text
from medlandmark.planning import plan_dataset, transferred_plan
from medlandmark.preprocessing import preprocess_dataset
from medlandmark.records.plan import load_plan
from medlandmark.training.loop import TrainOptions
from medlandmark.training.options import FINE_TUNE_LEARNING_RATE_FACTOR

BASE_CASES = [f"{i:03d}" for i in range(1, 101)]
FEW_CASES = [f"{i:03d}" for i in range(101, 111)]
TEST_SPLIT = "test1"


@dataclass(frozen=True)
class Arm:
    """One trained cascade of the comparison."""

    name: str
    cases: str  # "base" (001-100) or "few" (the ten cases)
    minutes: float
    init_from_base: bool = False


ARMS = {
    arm.name: arm
    for arm in (
        Arm("base", "base", 45),
        Arm("fine-tune-5", "few", 5, init_from_base=True),
        Arm("scratch-5", "few", 5),
        Arm("scratch-45", "few", 45),
    )
}


def subset_dataset(full: Path, out: Path, train_ids: list[str]) -> Path:
    """A dataset folder of the cases ``train_ids``, its files linked to ``full``'s."""
    dataset = Dataset(full)
    for kind in ("images", "landmarks"):
        (out / kind).mkdir(parents=True, exist_ok=True)
    for case_id in train_ids:
        case = dataset.case(case_id)
        for path, kind in ((case.image_path, "images"), (case.landmarks_path, "landmarks")):
            link = out / kind / path.name
            if not link.exists():
                link.symlink_to(path.resolve())
    spec = load_spec(full).model_copy(update={"splits": {"train": train_ids}})
    write_spec(out, spec)
    return out


def prepare(work: Path, source: Path, few: list[str]) -> dict[str, tuple[Path, Path]]:
    """Both datasets, the base's plan (the CPU budget's), the same plan for the few cases, and
    both caches: {"full"|"base"|"few": (dataset, preprocessed)}."""
    full = recipes.dataset_ready(isbi2015.ISBI2015, source, work / "dataset")
    budget = isbi2015.BUDGETS["cpu"]
    folders = {}
    for kind, ids in (("base", BASE_CASES), ("few", few)):
        root = subset_dataset(full, work / f"dataset-{kind}", ids)
        folders[kind] = (root, work / f"preprocessed-{kind}")
    base_root, base_pre = folders["base"]
    if not (base_pre / "plans.json").is_file():
        plan_dataset(
            base_root,
            base_pre,
            budget.gpu_memory_gb,
            workers=2,
            base_features=budget.base_features,
            spacing_override_mm=[budget.target_spacing_mm],
        )
    few_root, few_pre = folders["few"]
    if not (few_pre / "plans.json").is_file():
        transferred_plan(few_root, load_plan(base_pre), few_pre, "the base plan")
    for root, pre in folders.values():
        preprocess_dataset(root, pre, configurations=recipes.stage_names(load_plan(pre)))
    return {**folders, "full": (full, None)}


def run_arm(
    arm: Arm,
    work: Path,
    folders: dict,
    command: str,
    args: argparse.Namespace,
) -> dict:
    """Train the arm's cascade within its minutes (times ``scale``: smoke tests), predict and
    evaluate the test split."""
    root, pre = folders[arm.cases]
    plan, out = load_plan(pre), work / arm.name
    budget = replace(isbi2015.BUDGETS["cpu"], minutes=arm.minutes * args.scale)
    init_from = str(work / "base" / "runs") if arm.init_from_base else None
    if init_from is not None:  # what train --init-from does to the plan's rate, to the budget's
        rates = {k: v * FINE_TUNE_LEARNING_RATE_FACTOR for k, v in budget.learning_rate.items()}
        budget = replace(budget, learning_rate=rates)
    load_at_start = os.getloadavg()
    training = TrainOptions(arch="unet", seed=0, device=args.device, init_from=init_from)
    trained = recipes.train_stages(root, pre, out, plan, budget, training)
    full = folders["full"][0]
    cases = Dataset(full).split(TEST_SPLIT)[: args.test_limit]
    test = recipes.evaluate_split(full, TEST_SPLIT, cases, out / "runs", out, args.device)
    record = {
        "arm": arm.name,
        "cases": BASE_CASES if arm.cases == "base" else Dataset(root).split("train"),
        "minutes": arm.minutes * args.scale,
        "init_from": init_from,
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": recipes.machine(),
        "load_at_start": [round(v, 2) for v in load_at_start],
        "stages": trained,
        "training_s": round(sum(s["total_s"] for s in trained), 1),
        TEST_SPLIT: test,
    }
    atomic_write_text(out / "arm.json", json.dumps(record, indent=1) + "\n")
    return record


def report(work: Path) -> str:
    """The table of every arm that has finished, as Markdown."""
    lines = [
        "| arm | training cases | training (min) | steps coarse / fine | test1 MRE (mm) | SDR 2 mm | SDR 4 mm |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ARMS:
        path = work / name / "arm.json"
        if not path.is_file():
            lines.append(f"| {name} | not run | | | | | |")
            continue
        arm = json.loads(path.read_text())
        test, steps = arm[TEST_SPLIT], " / ".join(str(s["steps"]) for s in arm["stages"])
        lines.append(
            f"| {name} | {len(arm['cases'])} | {arm['training_s'] / 60:.1f} | {steps} | "
            f"{test['mre_mm']:.3f} | {test['sdr_2mm']:.1f} % | {test['sdr_4mm']:.1f} % |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arms",
        nargs="+",
        default=["prepare", *ARMS, "report"],
        choices=["prepare", *ARMS, "report"],
    )
    parser.add_argument("--source", default=str(SHARED_DATA / "isbi2015"))
    parser.add_argument("--work", default=str(WORK / "isbi2015-finetune"))
    parser.add_argument("--few", nargs="+", default=FEW_CASES, metavar="ID")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--scale", type=float, default=1.0, help="of every arm's minutes (smoke)")
    parser.add_argument("--test-limit", type=int, default=None, help="test cases (smoke)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    work, started = Path(args.work), time.perf_counter()
    folders = prepare(work, Path(args.source), list(args.few))
    for name in args.arms:
        if name in ARMS:
            test = run_arm(ARMS[name], work, folders, command, args)[TEST_SPLIT]
            print(f"{name}: test1 MRE {test['mre_mm']:.3f} mm")
    if "report" in args.arms:
        print(report(work))
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
