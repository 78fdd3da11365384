"""Command line: argument parsing only; each verb is one call into the package."""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from pathlib import Path

from rich.markup import escape

from medlandmark import __version__
from medlandmark.console import configure, console
from medlandmark.errors import MedlandmarkError
from medlandmark.metrics import DEFAULT_RADII_MM
from medlandmark.training.recipes import RECIPES, recipe_arch

EXIT_PROBLEMS = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
DEFAULT_ISBI2015 = Path(
    "../shared/data/isbi2015"
)  # where the project's data lives, next to a clone


FORCE_HELP = (
    "into an existing dataset whose dataset.json has other splits (edited by hand): replace them"
)


def _radii(text: str) -> list[float]:
    try:
        radii = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"radii must be numbers in mm, e.g. 2,2.5,3,4; got {text!r}"
        ) from None
    if not radii or any(r <= 0 for r in radii):
        raise argparse.ArgumentTypeError("radii must be positive millimetres")
    return radii


class _Flattened(argparse.Action):
    """Store the values of an option whose every word may hold several (``2 3`` or ``2,3``)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, [v for value in values for v in value])


_COMMON = argparse.ArgumentParser(add_help=False)
_COMMON.add_argument("-q", "--quiet", action="store_true", help="print only results and errors")
_COMMON.add_argument(
    "-v", "--verbose", action="store_true", help="more detail; tracebacks on errors"
)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < math.inf:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text}")
    return value


def _fold(text: str) -> int | str:
    """``all`` or a fold number (whether the plan has that fold is train's to say)."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fold number (0, 1, ...) or 'all', got {text!r}"
        ) from None


def name_value_argument(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` with the value read as JSON (a number, a list...) or else kept as text."""
    name, equals, value = text.partition("=")
    if not equals or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name.strip(), json.loads(value)
    except json.JSONDecodeError:
        return name.strip(), value


def _dataset_arguments(
    verb: argparse.ArgumentParser, dataset_help: str, preprocessed_help: str
) -> None:
    """The DATASET positional and --preprocessed, shared by the verbs that read the plan."""
    verb.add_argument("dataset", type=Path, help=dataset_help)
    verb.add_argument("--preprocessed", type=Path, default=None, help=preprocessed_help)


def _verb(sub, name: str, summary: str, description: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=summary,
        description=f"{summary}\n\n{description}\n\nexample:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_COMMON],
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``medlandmark`` parser: one sub-command per verb, its handler in ``func``."""
    parser = argparse.ArgumentParser(
        prog="medlandmark",
        description=(
            "Find anatomical landmarks in 2D radiographs and 3D CT/MRI, in world millimetres.\n\n"
            "A dataset is a folder with dataset.json, images/ and landmarks/; the verbs below\n"
            "convert public datasets into it, check it, plan and preprocess it, and evaluate\n"
            "predictions against it."
        ),
        epilog="Run 'medlandmark VERB --help' for each verb's inputs, outputs and an example.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"medlandmark {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add_verb in (
        _add_convert,
        _add_check,
        _add_plan,
        _add_preprocess,
        _add_models,
        _add_train,
        _add_calibrate,
        _add_predict,
        _add_export,
        _add_evaluate,
        _add_review,
        _add_demo,
    ):
        add_verb(sub)
    return parser


def _add_review(sub) -> None:
    review = _verb(
        sub,
        "review",
        "Check and correct predicted landmarks in the browser.",
        "Serves a local web app listing the cases of PREDICTIONS (failed and doubtful first) over\n"
        "their images: drag a landmark to move it, mark it missing or present, undo; 3D volumes\n"
        "show three world-aligned slices. Every change is saved at once into CORRECTED, a dataset\n"
        "folder (dataset.json, images/, landmarks/ in world mm) that check passes and train\n"
        "accepts; CORRECTED/corrections.jsonl logs who changed what. PREDICTIONS is only read.",
        "medlandmark review predictions/test1 --images data/isbi2015 -o data/isbi2015-reviewed",
    )
    review.add_argument("predictions", help="folder of predicted landmark files (predict -o)")
    review.add_argument(
        "--images", required=True, help="the images: a dataset folder or a folder of images"
    )
    review.add_argument(
        "-o",
        "--out",
        default=None,
        help="corrected dataset folder (default: PREDICTIONS-corrected beside it)",
    )
    review.add_argument(
        "--spacing",
        type=_positive,
        nargs="+",
        default=None,
        metavar="MM",
        help="pixel spacing (x y) for PNG/JPEG/BMP/TIFF (a dataset folder's dataset.json gives it)",
    )
    review.add_argument("--port", type=_positive_int, default=8765, help="(default 8765)")
    review.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine)"
    )
    review.add_argument(
        "--allow-remote",
        action="store_true",
        help="needed to listen on an address other machines can reach",
    )
    review.add_argument("--no-browser", action="store_true", help="do not open a browser")
    review.add_argument("--user", default=None, help="name in the correction log (default: login)")
    review.set_defaults(func=_review)


def _add_convert(sub) -> None:
    convert = _verb(
        sub,
        "convert",
        "Convert a public dataset into a medlandmark dataset folder.",
        "Writes OUT/dataset.json, OUT/images/ and OUT/landmarks/ (world mm), plus splits.",
        "medlandmark convert isbi2015 ../shared/data/isbi2015 data/isbi2015",
    )
    kinds = convert.add_subparsers(dest="kind", required=True, metavar="KIND")
    for add_kind in (_add_isbi2015, _add_hand_xray, _add_afids, _add_afids_synth):
        add_kind(kinds)


def _add_isbi2015(kinds) -> None:
    isbi = _verb(
        kinds,
        "isbi2015",
        "ISBI 2015 cephalometric X-rays (19 landmarks, 0.1 mm pixels).",
        "SRC is the official layout (RawImage/, AnnotationsByMD/). Splits: train 001-150,\n"
        "test1 151-300, test2 301-400 when present. Ground truth: the annotators' mean by default.",
        "medlandmark convert isbi2015 ../shared/data/isbi2015 data/isbi2015 --annotator senior",
    )
    isbi.add_argument("src", type=Path, help="folder with RawImage/ and AnnotationsByMD/")
    isbi.add_argument("out", type=Path, help="dataset folder to create")
    isbi.add_argument("--annotator", choices=["mean", "senior", "junior"], default="mean")
    isbi.add_argument("--force", action="store_true", help=FORCE_HELP)
    isbi.set_defaults(func=_convert_isbi2015)


def _add_hand_xray(kinds) -> None:
    hand = _verb(
        kinds,
        "hand-xray",
        "Digital Hand Atlas radiographs (37 landmarks).",
        "SRC holds images/*.mha and landmarks_px.csv (id,x1,y1,...; pixels); spacing comes from\n"
        "each MHA header.",
        "medlandmark convert hand-xray ../shared/data/hand_xray data/hand",
    )
    hand.add_argument("src", type=Path, help="folder with images/ and landmarks_px.csv")
    hand.add_argument("out", type=Path, help="dataset folder to create")
    hand.add_argument("--force", action="store_true", help=FORCE_HELP)
    hand.set_defaults(func=_convert_hand_xray)


def _add_afids(kinds) -> None:
    afids = _verb(
        kinds,
        "afids",
        "One 3D case from an image and a 3D Slicer fiducial file (AFIDs).",
        "Writes the image and its 32 AFIDs landmarks (Slicer .mrk.json, LPS) as one case.",
        "medlandmark convert afids ../shared/data/afids_mni152/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz "
        "../shared/data/afids_mni152/tpl-MNI152NLin2009cAsym_res-01_desc-groundtruth_afids.fcsv data/afids",
    )
    afids.add_argument("image", type=Path, help="3D image (NIfTI, NRRD, MHA...)")
    afids.add_argument("fcsv", type=Path, help="Slicer .fcsv or .mrk.json with the 32 AFIDs")
    afids.add_argument("out", type=Path, help="dataset folder to create (or add the case to)")
    afids.add_argument("--case-id", default=None, help="case id (default: the image file name)")
    afids.set_defaults(func=_convert_afids)


def _add_afids_synth(kinds) -> None:
    afids_synth = _verb(
        kinds,
        "afids-synth",
        "A 3D training set: random warps of one template with its 32 AFIDs.",
        "Each case is TEMPLATE seen through a random, exactly known warp (affine and smooth elastic),\n"
        "resampled to another spacing (1, 1.2, 1.5 mm or 3 mm slabs), orientation and field of view\n"
        "(30 % of cases are cut through the landmarks: those outside are written as missing), with\n"
        "new contrast, bias field and Rician noise. Writes OUT/images/synthNNN.nii.gz,\n"
        "OUT/landmarks/synthNNN.mrk.json (LPS, mapped exactly) and OUT/dataset.json with splits:\n"
        "60 cases or more: test = cases 40-59, train = the others; fewer: the last third is test.\n"
        "The same seed gives the same files.",
        "medlandmark convert afids-synth ../shared/data/afids_mni152/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz "
        "../shared/data/afids_mni152/tpl-MNI152NLin2009cAsym_res-01_desc-groundtruth_afids.fcsv "
        "data/afids_synth --cases 60 --seed 0",
    )
    afids_synth.add_argument("template", type=Path, help="3D template image (NIfTI, NRRD, MHA...)")
    afids_synth.add_argument("fcsv", type=Path, help="Slicer .fcsv or .mrk.json with its 32 AFIDs")
    afids_synth.add_argument("out", type=Path, help="dataset folder to create")
    afids_synth.add_argument("--cases", type=int, default=60, help="number of cases (default 60)")
    afids_synth.add_argument(
        "--seed", type=int, default=0, help="random seed, 0 or more (default 0)"
    )
    afids_synth.add_argument(
        "--variation",
        choices=["default", "strong"],
        default="default",
        help="ranges of the random draws: default (what the benchmarks train on) or strong "
        "(wider spacings, larger turns, mirrored grids, stronger contrast, bias and noise: a "
        "shifted test set)",
    )
    afids_synth.set_defaults(func=_convert_afids_synth)


def _add_check(sub) -> None:
    check = _verb(
        sub,
        "check",
        "Check a dataset folder and report every problem, each with its file.",
        "Reads every image and landmark file. Exit 0 when clean (warnings allowed), 1 with problems.",
        "medlandmark check data/isbi2015",
    )
    check.add_argument("dataset", type=Path, help="dataset folder (with dataset.json)")
    check.set_defaults(func=_check)


def _add_plan(sub) -> None:
    plan = _verb(
        sub,
        "plan",
        "Fingerprint a dataset and decide every size: write plans.json.",
        "Computes (or reuses) PREPROCESSED/fingerprint.json, then writes PREPROCESSED/plans.json:\n"
        "target spacing, normalisation, patch sizes, networks and the coarse-to-fine cascade.\n"
        "PREPROCESSED defaults to DATASET/preprocessed.",
        "medlandmark plan data/isbi2015 --gpu-memory 8",
    )
    _dataset_arguments(plan, "dataset folder (with dataset.json)", "folder for plans and caches")
    plan.add_argument(
        "--gpu-memory",
        type=_positive,
        default=8.0,
        metavar="GB",
        help="GPU memory budget (default 8)",
    )
    plan.add_argument(
        "--base-features",
        type=_positive_int,
        default=32,
        metavar="N",
        help="U-Net first-stage width, doubling per stage (default 32, nnU-Net's; 8-16 for CPU budgets)",
    )
    plan.add_argument(
        "--target-spacing",
        type=_positive,
        nargs="+",
        default=None,
        metavar="MM",
        help="target spacing instead of the planned one (the median): one value, or one per image axis",
    )
    plan.add_argument(
        "--width",
        type=_positive,
        default=None,
        metavar="W",
        help="HYATT-Net and H3DE-Net width multiplier instead of the budget's (1 = the papers'; "
        "the budget's is 1 from 24 GB on, sqrt(GB / 24) in steps of 1/8 below, at least 0.25)",
    )
    plan.add_argument(
        "--workers", type=_positive_int, default=2, help="parallel readers (default 2)"
    )
    plan.add_argument(
        "--plans-from",
        default=None,
        metavar="RUN_OR_MODEL",
        help="copy the plan of a trained run, folder of runs or shipped model (its spacing, "
        "patches and networks; the dataset's landmarks) instead of planning: for train --init-from",
    )
    plan.set_defaults(func=_plan)


def _add_preprocess(sub) -> None:
    preprocess = _verb(
        sub,
        "preprocess",
        "Resample and normalise every case into the cache, as plans.json says.",
        "Writes PREPROCESSED/<data>/<case>.npy (float16, memory-mappable) and <case>.json (geometry,\n"
        "landmarks in cache voxels). Up-to-date cases are skipped; interrupted runs resume.",
        "medlandmark preprocess data/isbi2015 -c 2d_coarse 2d_fine --workers 2",
    )
    _dataset_arguments(preprocess, "dataset folder (with dataset.json)", "folder with plans.json")
    preprocess.add_argument(
        "-c", "--configurations", nargs="+", default=None, help="default: all in the plan"
    )
    preprocess.add_argument(
        "--workers", type=_positive_int, default=2, help="parallel processes (default 2)"
    )
    preprocess.set_defaults(func=_preprocess)


def _add_models(sub) -> None:
    models = _verb(
        sub,
        "models",
        "Print each network's parameter count and forward FLOPs for a plan.",
        "Builds every architecture that fits the plan (unet; hyatt in 2D; h3de in 3D) at the\n"
        "configuration's patch size, counting on the meta device (no memory, no compute).\n"
        "'models list' lists the models shipped with medlandmark, 'models show NAME' prints one's card.",
        "medlandmark models data/isbi2015 -c 2d_coarse",
    )
    _dataset_arguments(
        models,
        "dataset folder whose plan to read; or 'list', or 'show NAME', for the shipped models "
        "(./list is a folder called list)",
        "folder with plans.json",
    )
    models.add_argument("name", nargs="?", default=None, help="with 'show': the shipped model")
    models.add_argument("-c", "--configuration", default=None, help="default: every configuration")
    models.set_defaults(func=_models)


def _add_train(sub) -> None:
    train = _verb(
        sub,
        "train",
        "Train a landmark network on the preprocessed cache.",
        "Writes RUN_DIR/run.json, checkpoint_latest.pt (resumable), model_best.safetensors,\n"
        "model_final.safetensors, log.csv and training_curve.png. Ctrl-C or SIGTERM saves and stops;\n"
        "--resume continues. Under torchrun every process trains on its own shard (DDP).",
        "medlandmark train data/isbi2015 -c 2d_coarse -a hyatt --fold 0 -o runs/isbi_coarse",
    )
    _dataset_arguments(
        train, "dataset folder (planned and preprocessed)", "folder with plans.json and caches"
    )
    train.add_argument("-o", "--out", type=Path, required=True, help="run folder")
    train.add_argument(
        "-c", "--configuration", default=None, help="plan configuration (default: the plan's)"
    )
    train.add_argument(
        "-a",
        "--arch",
        default=None,
        choices=["unet", "hyatt", "h3de"],
        help="network (default: the recipe's, or unet)",
    )
    train.add_argument(
        "--fold",
        type=_fold,
        default=0,
        help="cross-validation fold (0..4) or 'all' (no validation)",
    )
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--iterations", type=int, default=None, help="iterations per epoch")
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--lr", type=_positive, default=None, help="base learning rate")
    train.add_argument(
        "--validate-every", type=int, default=None, help="epochs between validations"
    )
    train.add_argument(
        "--max-steps", type=int, default=None, help="stop (resumably) after this many steps"
    )
    train.add_argument(
        "--time-budget",
        type=_positive,
        default=None,
        metavar="MIN",
        help="train for this many minutes (validations and checkpoints included); the learning "
        "rate schedule runs over the time used, so a slow stretch costs its own minutes, not the "
        "schedule; --epochs x --iterations then caps the steps",
    )
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    train.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    train.add_argument(
        "--ema", type=float, default=None, metavar="DECAY", help="keep a weight moving average"
    )
    _add_train_tuning(train)
    train.set_defaults(func=_train)


def _add_train_tuning(train: argparse.ArgumentParser) -> None:
    """train's options for the recipe, missing-landmark target, augmentation, loss, seeds and
    resumption."""
    train.add_argument(
        "--recipe",
        default=None,
        choices=list(RECIPES),
        help="train as the network's paper did (loss, targets, optimiser, schedule, prediction "
        "rule; docs/training.md); the plan still sets patch, batch and length, and the options "
        "here still win",
    )
    train.add_argument("--missing-target", choices=["mask", "zero"], default=None)
    train.add_argument(
        "--augment",
        type=name_value_argument,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="change an augmentation setting (repeatable), e.g. p_field_of_view_cut=0.3 or scale=[0.8,1.2]; "
        "the names are AugmentConfig's (docs/training.md)",
    )
    train.add_argument(
        "--loss",
        choices=[
            "mse",
            "smooth_l1",
            "balanced_mse",
            "balanced_mse_centroid",
            "hard_negative_smooth_l1",
        ],
        default=None,
        help="heatmap loss (default: the plan's, balanced_mse, which weighs each landmark's neighbourhood "
        "as much as the background and leaves the empty-map plateau far sooner than mse on large images)",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--deterministic", action="store_true", help="deterministic algorithms (slower)"
    )
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument(
        "--coarse-run",
        type=Path,
        default=None,
        help="fine stage: the coarse stage's run (its error sets patch offsets)",
    )
    train.add_argument(
        "--init-from",
        default=None,
        metavar="RUN_OR_MODEL",
        help="start from another run's weights (a run folder, a folder of runs, or a shipped "
        "model's name): landmarks matched by name, a fifth of the plan's learning rate and one "
        "warm-up epoch unless --lr says otherwise",
    )


def _add_predict(sub) -> None:
    predict = _verb(
        sub,
        "predict",
        "Predict landmarks in new images, in world mm of each original image.",
        "MODEL_DIR is a run folder, or a folder of runs: runs of one configuration are averaged\n"
        "(folds), a coarse and a fine configuration form a cascade. INPUT: image files, folders of\n"
        "images, DICOM series folders, or a dataset folder. Writes OUT/<case>.<format> (confidence\n"
        "per point; points judged absent are marked missing) and OUT/summary.csv. Exit 1 when an\n"
        "image failed (the others still complete). --model NAME predicts with a shipped model\n"
        "instead of MODEL_DIR: predict --model ceph-isbi2015-19 my_ceph.png -o out/",
        "medlandmark predict runs/isbi images/*.jpg -o predictions --format json --tta",
    )
    predict.add_argument(
        "paths",
        type=Path,
        nargs="+",
        metavar="[MODEL_DIR] INPUT",
        help="a run folder or folder of runs (unless --model names a shipped model), then "
        "images, folders or DICOM series",
    )
    predict.add_argument(
        "--model", default=None, metavar="NAME", help="a shipped model (medlandmark models list)"
    )
    predict.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    predict.add_argument("--format", default="json", choices=["csv", "json", "mrk.json", "fcsv"])
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    predict.add_argument(
        "--tta",
        action="store_true",
        help="average with the mirrored image (symmetric pairs swapped)",
    )
    predict.add_argument(
        "--overlay", action="store_true", help="also write OUT/overlays/<case>.png"
    )
    predict.add_argument(
        "--spacing",
        type=_positive,
        nargs="+",
        default=None,
        metavar="MM",
        help="pixel spacing (x y) for PNG/JPEG/BMP/TIFF",
    )
    predict.add_argument("--weights", choices=["best", "final"], default="best")
    _add_judgement_options(predict)
    predict.add_argument(
        "--onnx",
        nargs="?",
        const="run",
        default=None,
        metavar="MODEL.onnx",
        help="run with onnxruntime: this file, or each run's model.onnx when no file is given",
    )
    predict.set_defaults(func=_predict)


def _add_judgement_options(parser) -> None:
    """``predict``'s options on what to trust: the shape check, the orientation, presence."""
    parser.add_argument(
        "--no-shape-check",
        dest="shape_check",
        action="store_false",
        help="keep landmarks that the training constellation, fitted to the landmarks found, places outside the image",
    )
    parser.add_argument(
        "--orientation",
        choices=["auto", "search", "fixed"],
        default="auto",
        help="search: try every mirror and turn of the image (3D: axis flips) and keep the one "
        "whose landmarks fit the training shape best; fixed: trust the image as given; auto "
        "(default): search 2D images, trust 3D headers",
    )
    parser.add_argument(
        "--presence",
        choices=["auto", "absolute", "relative", "shape"],
        default="auto",
        help="auto (default): shape in 3D, absolute in 2D; absolute: a landmark is present when its confidence reaches the run's threshold; "
        "relative: when its confidence over the case's reference level (the mean of its upper "
        "half) reaches the run's relative threshold, which a contrast shift does not move; "
        "shape: present unless far weaker than the case's others (a quarter of its reference) "
        "or placed outside the field of view by the shape check",
    )
    parser.add_argument(
        "--window-orientation",
        choices=["auto", "image", "anatomy"],
        default="auto",
        help="a cascade's fine windows: along the image's axes (image), or turned so that the "
        "anatomy the first stage found lies as in the training images (anatomy); auto "
        "(default): anatomy in 3D, image in 2D",
    )


def _add_calibrate(sub) -> None:
    calibrate = _verb(
        sub,
        "calibrate",
        "Recalibrate a trained run on its validation cases.",
        "Validates the run's best weights on its validation cases again and stores in run.json\n"
        "what they calibrate: the presence threshold, the error bounds and the limits of the case\n"
        "verdicts (training does this at each best validation; this is for runs trained before).",
        "medlandmark calibrate runs/isbi/2d_coarse_fold0",
    )
    calibrate.add_argument("run_dir", type=Path, help="a training run folder with validation cases")
    calibrate.add_argument("--device", default="auto")
    calibrate.set_defaults(func=_calibrate)


def _add_export(sub) -> None:
    export = _verb(
        sub,
        "export",
        "Export a run's network to ONNX and check it against PyTorch.",
        "Writes the network (full-resolution heatmaps of one patch, any batch size) and prints the\n"
        "largest heatmap difference between onnxruntime and PyTorch on the same input; fails if\n"
        "it exceeds the tolerance. 'predict --onnx' then runs without PyTorch's network code.",
        "medlandmark export runs/isbi_coarse --onnx runs/isbi_coarse/model.onnx",
    )
    export.add_argument("run_dir", type=Path, help="a training run folder")
    export.add_argument(
        "--onnx", type=Path, default=None, help="output file (default RUN_DIR/model.onnx)"
    )
    export.add_argument("--weights", choices=["best", "final"], default="best")
    export.add_argument("--opset", type=int, default=None)
    export.set_defaults(func=_export)


def _add_evaluate(sub) -> None:
    evaluate = _verb(
        sub,
        "evaluate",
        "Compare predicted landmarks with ground truth, in world mm.",
        "Evaluates the cases in --pred. Writes OUT/metrics.json (every figure), OUT/report.md and\n"
        "OUT/report.html (the same for a browser, with plots), OUT/radial_errors.csv (one row per\n"
        "case and landmark) and PNG plots; prints MRE, SDR and how many truly missing landmarks were\n"
        "found missing and how many present ones were called missing.",
        "medlandmark evaluate --pred runs/isbi/pred --gt data/isbi2015 --out runs/isbi/eval",
    )
    evaluate.add_argument(
        "--pred", type=Path, required=True, help="folder of predicted landmark files"
    )
    evaluate.add_argument(
        "--gt", type=Path, required=True, help="dataset folder or folder of landmark files"
    )
    evaluate.add_argument(
        "--out", type=Path, required=True, help="folder for metrics.json, report.md, plots"
    )
    evaluate.add_argument(
        "--radii",
        type=_radii,
        nargs="+",
        action=_Flattened,
        default=list(DEFAULT_RADII_MM),
        metavar="MM",
        help="SDR radii in mm, as 2 2.5 3 4 or 2,2.5,3,4 (default: %(default)s)",
    )
    evaluate.set_defaults(func=_evaluate)


def _add_demo(sub) -> None:
    demo = _verb(
        sub,
        "demo",
        "Run the whole pipeline end to end on a small dataset, in minutes on a CPU.",
        "check -> plan -> preprocess -> train -> predict -> evaluate with a small configuration, on\n"
        "a procedural synthetic 2D dataset (hands), 3D with --3d (bodies), or ISBI 2015 cephalograms\n"
        "with --isbi2015 [PATH] (default ../shared/data/isbi2015). Writes OUT/dataset, OUT/run,\n"
        "OUT/predictions and OUT/evaluation (metrics.json, report.md, report.html); prints the metrics.",
        "medlandmark demo -o demo_output --3d",
    )
    demo.add_argument("-o", "--out", type=Path, default=Path("demo_output"), help="output folder")
    demo_data = demo.add_mutually_exclusive_group()
    demo_data.add_argument(
        "--3d", dest="three_d", action="store_true", help="synthetic 3D volumes instead of 2D"
    )
    demo_data.add_argument(
        "--isbi2015",
        type=Path,
        nargs="?",
        const=DEFAULT_ISBI2015,
        default=None,
        metavar="PATH",
        help="ISBI 2015 challenge folder (official layout) instead of synthetic data",
    )
    demo.set_defaults(func=_demo)


def _convert_isbi2015(args: argparse.Namespace) -> int:
    from medlandmark.datasets.converters import convert_isbi2015

    convert_isbi2015(args.src, args.out, annotator=args.annotator, force=args.force)
    return 0


def _convert_hand_xray(args: argparse.Namespace) -> int:
    from medlandmark.datasets.converters import convert_hand_xray

    convert_hand_xray(args.src, args.out, force=args.force)
    return 0


def _convert_afids(args: argparse.Namespace) -> int:
    from medlandmark.datasets.converters import convert_afids

    convert_afids(args.image, args.fcsv, args.out, case_id=args.case_id)
    return 0


def _convert_afids_synth(args: argparse.Namespace) -> int:
    from medlandmark.datasets.afids_synth import convert_afids_synth

    convert_afids_synth(
        args.template,
        args.fcsv,
        args.out,
        cases=args.cases,
        seed=args.seed,
        variation=args.variation,
    )
    return 0


def _check(args: argparse.Namespace) -> int:
    from medlandmark.datasets.check import check_dataset, print_check_report

    report = check_dataset(args.dataset)
    print_check_report(report)
    return 0 if report.ok else EXIT_PROBLEMS


def _plan(args: argparse.Namespace) -> int:
    from medlandmark.planning import plan_dataset, plan_like

    if args.plans_from is not None:
        plan_like(args.dataset, args.plans_from, args.preprocessed)
        return 0
    plan_dataset(
        args.dataset,
        args.preprocessed,
        gpu_memory_gb=args.gpu_memory,
        workers=args.workers,
        base_features=args.base_features,
        spacing_override_mm=args.target_spacing,
        width_multiplier=args.width,
    )
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from medlandmark.preprocessing import preprocess_dataset

    preprocess_dataset(args.dataset, args.preprocessed, args.configurations, workers=args.workers)
    return 0


def _models(args: argparse.Namespace) -> int:
    from medlandmark.models import describe_models, print_model_table
    from medlandmark.planning import load_plan, preprocessed_folder

    if str(args.dataset) in ("list", "show"):
        return _shipped_models(str(args.dataset), args.name)
    if args.name is not None:
        raise MedlandmarkError(f"unexpected argument '{args.name}' after the dataset folder")
    plan = load_plan(preprocessed_folder(args.dataset, args.preprocessed))
    names = [args.configuration] if args.configuration else list(plan.configurations)
    print_model_table([row for name in names for row in describe_models(plan, name)])
    return 0


def _shipped_models(action: str, name: str | None) -> int:
    from medlandmark.inference.shipped import print_model_card, print_shipped_models
    from medlandmark.records.model_card import shipped_model, shipped_models

    if action == "list":
        print_shipped_models(shipped_models())
    elif name is None:
        raise MedlandmarkError("models show needs the name of a shipped model (models list)")
    else:
        print_model_card(shipped_model(name))
    return 0


def _train(args: argparse.Namespace) -> int:
    from medlandmark.training.loop import TrainOptions, train

    options = TrainOptions(
        configuration=args.configuration,
        arch=recipe_arch(args.recipe, args.arch),
        recipe=args.recipe,
        fold=args.fold,
        epochs=args.epochs,
        iterations_per_epoch=args.iterations,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        validate_every=args.validate_every,
        max_steps=args.max_steps,
        time_budget_s=None if args.time_budget is None else 60.0 * args.time_budget,
        device=args.device,
        seed=args.seed,
        deterministic=args.deterministic,
        amp=args.amp,
        ema_decay=args.ema,
        missing_target=args.missing_target,
        loss=args.loss,
        augment=dict(args.augment),
        preprocessed=None if args.preprocessed is None else str(args.preprocessed),
        coarse_run=None if args.coarse_run is None else str(args.coarse_run),
        init_from=args.init_from,
    )
    record = train(args.dataset, args.out, options, resume=args.resume)
    return EXIT_INTERRUPTED if record.status == "interrupted" else 0


def _predict(args: argparse.Namespace) -> int:
    from medlandmark.inference.batch import PredictOptions, predict_files

    options = PredictOptions(
        output_format=args.format,
        device=args.device,
        tta=args.tta,
        overlay=args.overlay,
        spacing_xy_mm=args.spacing,
        weights=args.weights,
        onnx=args.onnx,
        shape_check=args.shape_check,
        orientation=args.orientation,
        presence=args.presence,
        window_orientation=args.window_orientation,
    )
    if args.model is not None:
        from medlandmark.records.model_card import shipped_model

        model_dir, inputs = shipped_model(args.model).runs, args.paths
    elif len(args.paths) < 2:
        raise MedlandmarkError("predict needs a run folder and at least one input (or --model)")
    else:
        model_dir, inputs = args.paths[0], args.paths[1:]
    rows = predict_files(model_dir, inputs, args.out, options)
    return EXIT_PROBLEMS if any(r["status"] == "failed" for r in rows) else 0


def _review(args: argparse.Namespace) -> int:
    from medlandmark.review import ReviewSession, serve

    predictions = Path(args.predictions)
    out = args.out or predictions.parent / f"{predictions.name}-corrected"
    session = ReviewSession(predictions, args.images, out, args.spacing, args.user)
    serve(session, args.host, args.port, args.allow_remote, not args.no_browser)
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from medlandmark.training.loop import recalibrate

    record = recalibrate(args.run_dir, args.device)
    checks = record.verdict_thresholds
    typical = "-" if checks is None else f"{checks.confidence_typical:.2f}"
    console.print(
        f"calibrated {args.run_dir} on {len(record.val_cases)} validation cases: presence "
        f"threshold {record.presence_threshold:.3f}, typical mean confidence {typical}"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from medlandmark.inference.export import export_onnx

    out = args.onnx or args.run_dir / "model.onnx"
    report = export_onnx(args.run_dir, out, args.weights, args.opset)
    console.print(
        f"wrote {report['onnx_path']} (opset {report['opset']}, input {report['input_shape']}); "
        f"largest heatmap difference to PyTorch {report['max_abs_heatmap_difference']:.2e} "
        f"(heatmap range {report['max_abs_heatmap']:.3g}, tolerance {report['tolerance']:.2e})"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from medlandmark.evaluation import evaluate, print_summary

    print_summary(evaluate(args.pred, args.gt, args.out, radii=args.radii), args.out)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from medlandmark.demo import run_demo

    return run_demo(args.out, kind="3d" if args.three_d else "2d", isbi2015=args.isbi2015)


def run(args: argparse.Namespace) -> int:
    """Run one parsed command; returns the exit code."""
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure(quiet=getattr(args, "quiet", False), verbose=getattr(args, "verbose", False))
    try:
        return run(args)
    except MedlandmarkError as error:
        if args.verbose:
            traceback.print_exc()
        console.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        console.print("interrupted")
        return EXIT_INTERRUPTED
    except OSError as error:  # a file the system refuses (permissions, full disk...)
        if args.verbose:
            traceback.print_exc()
        where = f"{error.filename}: " if error.filename else ""
        console.print(
            f"[red]error:[/red] {escape(where + (error.strerror or str(error)))}", soft_wrap=True
        )
        return EXIT_ERROR
    except Exception as error:  # the last resort: one line, the traceback with --verbose
        if args.verbose:
            traceback.print_exc()
        console.print(
            f"[red]internal error[/red] in '{args.verb}': {escape(f'{type(error).__name__}: {error}')}"
            " (run again with --verbose for the traceback, and please report it)",
            soft_wrap=True,
        )
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
