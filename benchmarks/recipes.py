"""Shared steps of the benchmark recipes (``benchmarks/isbi2015.py``, ``benchmarks/afids3d.py``).

A recipe trains within a wall-clock budget. Each stage of the plan (its one configuration, or a
coarse stage and then its fine stage) first times a short probe run, then trains for as many
steps as fit in what is left of the stage's share; every test split is then predicted and
evaluated, and the numbers are printed and written to ``results.json``.

Work folder layout (every step is reused when the benchmark is run again)::

    WORK/dataset/                               the converted or generated dataset
    WORK/preprocessed-<GB>gb-<F>f[-<S>mm]/      plan and caches for one plan budget (and spacing)
    WORK/<budget>-<arch>[-<overrides>]/         runs/<configuration>/, predictions/<split>/,
                                                evaluation/<split>/, results.json
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from host import cpu_model

from medlandmark.cli import name_value_argument
from medlandmark.console import info, warn
from medlandmark.datasets.check import check_dataset, print_check_report
from medlandmark.datasets.dataset import Dataset
from medlandmark.errors import MedlandmarkError
from medlandmark.evaluation import evaluate
from medlandmark.inference.batch import PredictOptions, predict_files
from medlandmark.io.files import atomic_write_text
from medlandmark.metrics import DEFAULT_RADII_MM as RADII_MM
from medlandmark.planning import plan_dataset
from medlandmark.preprocessing import preprocess_dataset
from medlandmark.records.plan import Plan
from medlandmark.records.run import LOG_FILE, RUN_FILE
from medlandmark.training.loop import TrainOptions, train
from medlandmark.training.options import augment_config
from medlandmark.training.recipes import RECIPES, recipe_arch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
WORK = REPO / "benchmarks" / "work"
SAFETY = 0.9  # of the time left after the probe: the probe's rate is an estimate
PROBE_EPOCHS, PROBE_ITERATIONS = 3, 5  # a warm-up epoch, a timed one, a timed one that validates
TARGET_EPOCHS = 20  # a checkpoint per epoch: few enough that saving costs little
VALIDATIONS = 4  # at most, per stage (every validate_every epochs; the last epoch's included)
MAX_ITERATIONS_PER_EPOCH = 250
STEP_CAP_FACTOR = 2  # steps allowed beyond the probe's estimate: the time budget ends the run
BUDGET_FILE = (
    "budget.json"  # in a run folder, beside run.json: what the budget decided, and the time used
)
# Every stage trains on fold 0: its held-out fifth picks the best weights and calibrates the
# presence threshold, the verdict and the error bounds. A fine stage is validated as prediction
# uses it (patches around the landmarks displaced by the coarse error spread), so the cascade's
# bounds are the fine stage's own, not the coarse stage's.
FOLD_BY_STAGE = {"coarse": 0, "full": 0, "fine": 0}


@dataclass(frozen=True)
class Budget:
    """What ``--budget`` means for one benchmark."""

    minutes: float  # training wall clock, probes and every stage included
    gpu_memory_gb: float  # the plan's budget: patch and batch sizes
    base_features: int  # the U-Net's first-stage width
    shares: dict[str, float]  # share of the budget per stage kind ("coarse", "fine", "full")
    target_spacing_mm: float | None = None  # instead of the planned (median) spacing
    batch_size: dict[str, int] = field(default_factory=dict)  # per stage kind; absent: the plan's
    learning_rate: dict[str, float] = field(default_factory=dict)  # per arch; absent: the plan's
    loss: str | None = None  # heatmap loss; None: the plan's


@dataclass(frozen=True)
class Target:
    """A number the benchmark should reach on its main test split."""

    metric: str  # a key of a split's summary: mre_mm, sdr_2mm, missing_recall...
    at_most: bool
    value: float

    def text(self) -> str:
        return f"{self.metric} {'<=' if self.at_most else '>='} {self.value:g}"

    def met(self, measured: float | None) -> bool | None:
        if measured is None:
            return None
        return measured <= self.value if self.at_most else measured >= self.value


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: how its dataset is made, its budgets and its targets."""

    name: str
    make_dataset: Callable[[Path, Path], Path]  # (source, WORK/dataset) -> dataset root
    dataset_current: Callable[[Path, Path], bool]  # (source, WORK/dataset): no need to remake it
    budgets: dict[str, Budget]
    targets: dict[str, list[Target]]
    main_split: str
    archs: tuple[str, ...]
    default_source: Path


def argument_parser(benchmark: Benchmark, doc: str) -> argparse.ArgumentParser:
    """The options every recipe has."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", choices=sorted(benchmark.budgets), default="cpu")
    parser.add_argument(
        "--arch", choices=benchmark.archs, default=None, help="default: the recipe's, or unet"
    )
    parser.add_argument(
        "--recipe",
        choices=[r for r in RECIPES if RECIPES[r].arch in benchmark.archs],
        default=None,
        help="train as the network's paper did (train --recipe); the budget's loss and "
        "learning rate are then not used",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=benchmark.default_source,
        help="the public data (default: %(default)s)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=WORK / benchmark.name,
        help="work folder, reused when run again (default: %(default)s)",
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="training budget instead of the budget's (smoke tests)",
    )
    parser.add_argument(
        "--gpu-memory", type=float, default=None, help="plan budget in GB instead of the budget's"
    )
    parser.add_argument(
        "--base-features", type=int, default=None, help="U-Net width instead of the budget's"
    )
    parser.add_argument(
        "--target-spacing",
        type=float,
        default=None,
        metavar="MM",
        help="plan's target spacing instead of the budget's",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1...")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="PyTorch CPU threads (default: one per core); 1 on a machine busy with other jobs",
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument(
        "--augment",
        type=name_value_argument,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an augmentation setting of every stage (repeatable, as train --augment), e.g. "
        "p_field_of_view_cut=0.3",
    )
    return parser


def main(benchmark: Benchmark, doc: str, argv: list[str] | None = None) -> dict:
    """Parse a recipe's command line (``sys.argv`` when ``argv`` is None) and run it; the command
    recorded in ``results.json`` is the one typed, or ``<name>.py ARGV``."""
    parser = argument_parser(benchmark, doc)
    args = parser.parse_args(argv)
    try:
        augment_config(dict(args.augment))  # refused before the dataset and plan steps
    except MedlandmarkError as error:
        parser.error(str(error))
    command = shlex.join(sys.orig_argv if argv is None else [f"{benchmark.name}.py", *argv])
    return run_benchmark(benchmark, args, command)


def chosen_budget(benchmark: Benchmark, args: argparse.Namespace) -> Budget:
    """The budget named by ``--budget``, with the command line's overrides."""
    budget = benchmark.budgets[args.budget]
    overrides = {
        "minutes": args.minutes,
        "gpu_memory_gb": args.gpu_memory,
        "base_features": args.base_features,
        "target_spacing_mm": args.target_spacing,
    }
    return replace(budget, **{k: v for k, v in overrides.items() if v is not None})


def run_benchmark(benchmark: Benchmark, args: argparse.Namespace, command: str) -> dict:
    """Dataset -> plan -> preprocess -> budgeted training per stage -> predict and evaluate each
    test split; prints the tables and returns what ``results.json`` holds."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or previous_threads)
    try:
        warn_if_busy()
        return _run_benchmark(benchmark, args, command)
    finally:
        torch.set_num_threads(previous_threads)


def warn_if_busy() -> None:
    """Say so when other jobs hold the cores: PyTorch threads that outnumber the free cores wait
    for one another, and every timing (the probe's too) suffers."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cores and torch.get_num_threads() > 1:
        warn(
            f"load average {load:.1f} on {cores} cores: other jobs are running; with "
            f"{torch.get_num_threads()} PyTorch threads, steps may be many times slower (--threads 1 avoids that)"
        )


def _run_benchmark(benchmark: Benchmark, args: argparse.Namespace, command: str) -> dict:
    started, load_at_start, budget = (
        time.perf_counter(),
        os.getloadavg(),
        chosen_budget(benchmark, args),
    )
    work = Path(args.work)
    root = dataset_ready(benchmark, Path(args.source), work / "dataset")
    spacing = [budget.target_spacing_mm] if budget.target_spacing_mm else None
    preprocessed = (
        work
        / f"preprocessed-{budget.gpu_memory_gb:g}gb-{budget.base_features}f{f'-{spacing[0]:g}mm' if spacing else ''}"
    )
    plan = plan_dataset(
        root,
        preprocessed,
        budget.gpu_memory_gb,
        workers=2,
        base_features=budget.base_features,
        spacing_override_mm=spacing,
    )
    stages = stage_names(plan)
    preprocess_dataset(root, preprocessed, configurations=stages)
    out = work / run_name(args)
    arch = recipe_arch(args.recipe, args.arch)
    training = TrainOptions(
        arch=arch,
        recipe=args.recipe,
        seed=args.seed,
        device=args.device,
        augment=dict(args.augment),
    )
    trained = train_stages(root, preprocessed, out, plan, budget, training)
    splits = evaluate_test_splits(root, out / "runs", out, args.device)
    results = {
        "benchmark": benchmark.name,
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_at_start": [round(v, 2) for v in load_at_start],
        "budget_name": args.budget,
        "arch": arch,
        "recipe": args.recipe,
        "seed": args.seed,
        "budget": asdict(budget),
        "work": str(out),
        "plan": plan_sizes(plan, stages),
        "stages": trained,
        "training_s": round(sum(s["total_s"] for s in trained), 1),
        "training_budget_s": budget.minutes * 60,
        "splits": splits,
        "main_split": benchmark.main_split,
        "targets": target_results(
            benchmark.targets.get(args.budget, []), splits.get(benchmark.main_split)
        ),
        "total_s": round(time.perf_counter() - started, 1),
    }
    results["training_within_budget"] = results["training_s"] <= results["training_budget_s"]
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    print(results_text(results))
    print(f"results: {out / 'results.json'}")
    return results


def run_name(args: argparse.Namespace) -> str:
    """The folder of one benchmark run: ``cpu-unet``, with what the command line overrode."""
    overrides = [
        f"{args.minutes:g}min" if args.minutes is not None else "",
        f"{args.gpu_memory:g}gb" if args.gpu_memory is not None else "",
        f"{args.base_features}f" if args.base_features is not None else "",
        f"{args.target_spacing:g}mm" if args.target_spacing is not None else "",
        f"seed{args.seed}" if args.seed else "",
        *(augment_tag(name, value) for name, value in args.augment),
    ]
    trainer = args.recipe or recipe_arch(None, args.arch)
    return "-".join([args.budget, trainer, *filter(None, overrides)])


def augment_tag(name: str, value: object) -> str:
    """An augmentation override as a folder-name part: ``p_field_of_view_cut=0.3`` gives
    ``aug-p_field_of_view_cut0.3``."""
    return "aug-" + re.sub(r"[^A-Za-z0-9_.]+", "", f"{name}{value}")


# --- dataset and plan ----------------------------------------------------------------------------


def dataset_ready(benchmark: Benchmark, source: Path, out: Path) -> Path:
    """The benchmark's dataset: made (and checked) once, then reused while it is current."""
    if (out / "dataset.json").is_file() and benchmark.dataset_current(source, out):
        info(f"reusing the dataset in {out}")
        return out
    root = benchmark.make_dataset(source, out)
    report = check_dataset(root)
    print_check_report(report)
    if not report.ok:
        raise SystemExit(f"{root}: the dataset check failed")
    return root


def stage_names(plan: Plan) -> list[str]:
    """The configurations to train, in order: the default one, then its fine stage if any."""
    first = plan.configuration()
    return [first.name] + ([first.next_stage] if first.next_stage else [])


def plan_sizes(plan: Plan, stages: list[str]) -> dict:
    """The planned sizes of the trained configurations."""
    keys = {"stage", "spacing_mm", "patch_size", "batch_size", "heatmap_sigma_mm"}
    return {name: plan.configurations[name].model_dump(include=keys) for name in stages}


# --- budgeted training ---------------------------------------------------------------------------


def train_stages(
    root: Path,
    preprocessed: Path,
    out: Path,
    plan: Plan,
    budget: Budget,
    training: TrainOptions,
) -> list[dict]:
    """Train every stage within the budget, with ``training``'s network, recipe, seed and
    device: a stage gets its share of the total, and the last stage gets whatever the earlier
    ones left (an overrun there is taken from it)."""
    stages, records, coarse_run = stage_names(plan), [], None
    shares = [budget.shares[plan.configurations[name].stage] for name in stages]
    for index, name in enumerate(stages):
        spent_s = sum(r["total_s"] for r in records)
        if index == len(stages) - 1:
            budget_s = budget.minutes * 60 - spent_s
        else:
            budget_s = budget.minutes * 60 * shares[index] / sum(shares)
        options = stage_options(plan, name, budget, training, str(preprocessed), coarse_run)
        record = budgeted_training(root, out / "runs" / name, out / "probe", options, budget_s)
        records.append({"configuration": name, **record})
        coarse_run = str(out / "runs" / name)
    return records


def stage_options(
    plan: Plan,
    name: str,
    budget: Budget,
    training: TrainOptions,
    preprocessed: str,
    coarse_run: str | None,
) -> TrainOptions:
    """Training options of one stage, before the budget sets its length. A paper's recipe
    keeps its own learning rate and loss; the budget's are medlandmark's own training."""
    kind = plan.configurations[name].stage
    own_training = training.recipe is None
    return replace(
        training,
        configuration=name,
        fold=FOLD_BY_STAGE[kind],
        batch_size=budget.batch_size.get(kind),
        learning_rate=budget.learning_rate.get(training.arch) if own_training else None,
        loss=budget.loss if own_training else None,
        preprocessed=preprocessed,
        coarse_run=coarse_run if kind == "fine" else None,
    )


def budgeted_training(
    root: Path, run: Path, probe_dir: Path, options: TrainOptions, budget_s: float
) -> dict:
    """Train one stage for what fits in ``budget_s`` (probe included); a finished run is reused
    and an interrupted one resumed. Returns what the budget decided and the time it took."""
    record = _read_json(run / BUDGET_FILE)
    if (
        record.get("status") == "finished"
        and _read_json(run / RUN_FILE).get("status") == "finished"
    ):
        info(f"reusing the finished run {run}")
        return {**record, "reused": True}
    if record:  # planned before: resume (or restart) the same training, no new probe
        options, resumed = TrainOptions(**record["options"]), (run / RUN_FILE).is_file()
    else:
        probe = probe_rate(root, probe_dir, options)
        options, resumed = budgeted_options(options, probe, budget_s), False
        record = {
            "budget_s": round(budget_s, 1),
            "probe": probe,
            "options": asdict(options),
            "status": "planned",
        }
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / BUDGET_FILE, json.dumps(record, indent=1) + "\n")
    started = time.perf_counter()
    summary = train(root, run, options, resume=resumed)
    train_s = time.perf_counter() - started
    if summary.status != "finished":
        raise SystemExit(
            f"{run}: training {summary.status} at step {summary.step}; run the same command again to resume"
        )
    record.update(
        status=summary.status,
        resumed=resumed,
        train_s=round(train_s, 1),
        total_s=round(train_s + record["probe"]["wall_s"], 1),
        steps=summary.step,
        validation=None if summary.best is None else summary.best.val_mre_mm,
    )
    record["within_budget"] = None if resumed else record["total_s"] <= record["budget_s"]
    atomic_write_text(run / BUDGET_FILE, json.dumps(record, indent=1) + "\n")
    return {**record, "reused": False}


def probe_rate(root: Path, scratch: Path, options: TrainOptions) -> dict:
    """Time a few epochs of a few steps in a scratch run (deleted afterwards): seconds per
    step, per validation, and the rest (start-up, checkpoints, final weights)."""
    shutil.rmtree(scratch, ignore_errors=True)
    probe = replace(
        options,
        epochs=PROBE_EPOCHS,
        iterations_per_epoch=PROBE_ITERATIONS,
        validate_every=PROBE_EPOCHS,
    )
    started = time.perf_counter()
    train(root, scratch, probe)
    wall_s = time.perf_counter() - started
    with (scratch / LOG_FILE).open(newline="") as file:
        epoch_s = [float(row["seconds"]) for row in csv.DictReader(file)]
    shutil.rmtree(scratch, ignore_errors=True)
    step_s = epoch_s[1] / PROBE_ITERATIONS  # the first epoch warms up; the last one validates
    validation_s = max(0.0, epoch_s[2] - epoch_s[1]) if options.fold != "all" else 0.0
    rest_s = max(0.0, wall_s - sum(epoch_s))
    return {
        "wall_s": round(wall_s, 2),
        "step_s": round(step_s, 4),
        "validation_s": round(validation_s, 2),
        "rest_s": round(rest_s, 2),
    }


def budgeted_options(options: TrainOptions, probe: dict, budget_s: float) -> TrainOptions:
    """Train for ``SAFETY`` x (budget - probe) - start-up seconds (``time_budget_s``: the clock,
    not the probe, ends the run and paces the cosine schedule, so a slow stretch costs only its
    own time). The probe's rate only shapes the epochs: about ``TARGET_EPOCHS`` of them and
    ``VALIDATIONS`` validations if the whole run goes at the probe's pace, and twice the steps
    as a cap that a faster run could reach."""
    time_budget_s = max(1.0, SAFETY * (budget_s - probe["wall_s"]) - probe["rest_s"])
    usable_s = time_budget_s - VALIDATIONS * probe["validation_s"]
    steps = max(1, int(usable_s / probe["step_s"]))
    iterations = min(MAX_ITERATIONS_PER_EPOCH, max(1, math.ceil(steps / TARGET_EPOCHS)))
    epochs = max(1, steps // iterations)
    return replace(
        options,
        epochs=STEP_CAP_FACTOR * epochs,
        iterations_per_epoch=iterations,
        validate_every=max(1, math.ceil(epochs / VALIDATIONS)),
        time_budget_s=time_budget_s,
    )


# --- prediction and evaluation -------------------------------------------------------------------


def evaluate_test_splits(root: Path, runs: Path, out: Path, device: str) -> dict[str, dict]:
    """Predict and evaluate every split but ``train``; the summary of each."""
    return {
        split: evaluate_split(root, split, case_ids, runs, out, device)
        for split, case_ids in Dataset(root).splits().items()
        if split != "train"
    }


def evaluate_split(
    root: Path, split: str, case_ids: list[str], runs: Path, out: Path, device: str
) -> dict:
    """Predict ``case_ids`` of the dataset at ``root`` with ``runs`` into
    ``out/predictions/<split>``, evaluate them into ``out/evaluation/<split>``; the summary."""
    dataset, predictions = Dataset(root), out / "predictions" / split
    images = [dataset.case(case_id).image_path for case_id in case_ids]
    started = time.perf_counter()
    rows = predict_files(runs, images, predictions, PredictOptions(device=device))
    seconds = time.perf_counter() - started
    metrics = evaluate(predictions, root, out / "evaluation" / split, radii=RADII_MM)
    return split_summary(metrics, rows, seconds)


def split_summary(metrics: dict, rows: list[dict], predict_s: float) -> dict:
    """The figures of one split: MRE, SD, SDR per radius and the missing-landmark confusion
    ("missing" is the positive class: recall = tp / (tp + fn), precision = tp / (tp + fp))."""
    missing = metrics["missing"]
    return {
        "n_cases": metrics["n_cases"],
        "n_points": metrics["n_points"],
        "failed": sum(r["status"] != "ok" for r in rows),
        "mre_mm": metrics["mre_mm"],
        "sd_mm": metrics["sd_mm"],
        "median_mm": metrics["median_mm"],
        "sdr": metrics["sdr"],
        **{f"sdr_{k.removesuffix('.0')}mm": v for k, v in metrics["sdr"].items()},
        "missing": missing,
        "missing_recall": _ratio(missing["tp"], missing["tp"] + missing["fn"]),
        "missing_precision": _ratio(missing["tp"], missing["tp"] + missing["fp"]),
        "predict_s_per_case": round(predict_s / max(1, len(rows)), 2),
    }


def target_results(targets: list[Target], split: dict | None) -> list[dict]:
    """Each target with the measured value and whether it was met (None: not measurable)."""
    rows = []
    for target in targets:
        measured = None if split is None else split.get(target.metric)
        rows.append({"target": target.text(), "measured": measured, "met": target.met(measured)})
    return rows


# --- the printed record --------------------------------------------------------------------------


def machine() -> dict:
    """CPU model, cores, torch and its threads, GPU; the load when the benchmark ended."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "load_1_5_15": [round(v, 2) for v in os.getloadavg()],
    }


def results_text(results: dict) -> str:
    """Machine, command, training per stage and one table row per split, as Markdown."""
    m = results["machine"]
    lines = [
        f"## {results['benchmark']}: budget {results['budget_name']} ({results['budget']['minutes']:g} min of training), {results['arch']}",
        f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"GPU {m['gpu'] or 'none'}; load average {' / '.join(map(str, results['load_at_start']))} at the start, "
        f"{' / '.join(map(str, m['load_1_5_15']))} at the end",
        f"date: {results['date']}",
        f"command: {results['command']}",
        "",
        "| stage | patch | batch | steps (cap: epochs x iterations) | s/step | validation MRE | budget s | used s | within |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for stage in results["stages"]:
        plan, options = results["plan"][stage["configuration"]], stage["options"]
        batch = options["batch_size"] or plan["batch_size"]
        validation = "-" if stage["validation"] is None else f"{stage['validation']:.3f} mm"
        within = {True: "yes", False: "NO", None: "resumed"}[stage["within_budget"]]
        lines.append(
            f"| {stage['configuration']}{' (reused)' if stage['reused'] else ''} | {'x'.join(map(str, plan['patch_size']))} "
            f"@ {'x'.join(f'{v:.3g}' for v in plan['spacing_mm'])} mm | {batch} | {stage['steps']} (cap {options['epochs']} x {options['iterations_per_epoch']}) "
            f"| {stage['probe']['step_s']:.3g} | {validation} | {stage['budget_s']:.0f} | {stage['total_s']:.0f} | {within} |"
        )
    lines += [
        f"training: {results['training_s']:.0f} s of {results['training_budget_s']:.0f} s "
        f"({'within' if results['training_within_budget'] else 'OVER'} budget); whole benchmark {results['total_s']:.0f} s",
        "",
        "| split | cases | points | MRE | SD | SDR 2 / 2.5 / 3 / 4 mm | missing precision / recall (tp/fp/fn/tn) | s per case |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for split, s in results["splits"].items():
        sdr = " / ".join(_number(s["sdr"].get(str(r))) for r in RADII_MM)
        c = s["missing"]
        lines.append(
            f"| {split} | {s['n_cases']} | {s['n_points']} | {_number(s['mre_mm'])} mm | {_number(s['sd_mm'])} mm | {sdr} % "
            f"| {_number(s['missing_precision'])} / {_number(s['missing_recall'])} ({c['tp']}/{c['fp']}/{c['fn']}/{c['tn']}) "
            f"| {s['predict_s_per_case']} |"
        )
    for target in results["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measurable"}[target["met"]]
        lines.append(
            f"target on {results['main_split']}: {target['target']}: {verdict} ({_number(target['measured'])})"
        )
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ratio(numerator: int, denominator: int) -> float | None:
    return None if denominator == 0 else numerator / denominator


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
