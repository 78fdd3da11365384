"""Every command in docs/*.md runs on small data or at least parses; every --help has an example.

Marker convention. Each fenced ```bash or ```python block in docs/*.md is preceded (blank lines
allowed) by an HTML comment that says what this test does with it:

    <!-- docs-test: run SCENARIO; OLD -> NEW; ... -->
        Run every command of the block for real, in document order, in the working folder of
        SCENARIO (see SCENARIOS: which documents share it, in which order). Before that, each
        OLD text of the block is replaced by NEW, in the order written; NEW may name a prepared
        input as {isbi2015} (a few ISBI 2015 images in the official layout).
    <!-- docs-test: parse-only REASON -->
        Do not run, only parse: `medlandmark ...` with medlandmark.cli.build_parser; `torchrun ...`
        with torchrun's own parser, then what it runs (`-m medlandmark`) with build_parser;
        `make TARGET` by finding TARGET in the Makefile; `python benchmarks/RECIPE.py ...` with the
        recipe's own parser. REASON (why it cannot run) is required.

Other blocks may carry a marker too:

    <!-- docs-test: landmarks GROUP FILE [names=A,B] -->  a landmark file example: written to FILE
        and read; every example of a GROUP must give the same world LPS points (GROUP_GEOMETRY).
    <!-- docs-test: dataset-json -->                       a dataset.json example: validated.
    <!-- docs-test: expect SCENARIO FILE -->               a JSON excerpt: every key and value of it
        must equal those of FILE in SCENARIO's folder at that point of the run.

The only other change to a command is SHRINK, appended (argparse keeps an option's last value):
every `medlandmark train`, also under torchrun, trains 1 epoch of 2 steps of 2 patches, and every
`medlandmark preprocess` uses 1 worker.

How commands run: `medlandmark ...` in this process through medlandmark.cli.main (fast: torch is
imported once), which must return 0; `torchrun ...` as `python -m torch.distributed.run ...` in a
subprocess; anything else (mkdir, cp, a heredoc, `python -c`) with bash, with this Python's bin
folder first on PATH. ```python blocks are executed in the scenario's folder. Run commands are
also parsed by test_every_command_block_is_marked_and_parses, so that the ISBI commands are
checked even where ../shared/data/isbi2015 is absent.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from glob import glob
from pathlib import Path

import numpy as np
import pytest
import torch

from medlandmark.cli import build_parser, main
from medlandmark.datasets.dataset import DatasetSpec
from medlandmark.io.geometry import Geometry, index_to_world
from medlandmark.io.images import write_image
from medlandmark.io.landmarks import (
    FORMAT_BY_SUFFIX,
    PARSERS,
    LandmarkSet,
    landmark_format,
    read_landmarks,
    write_landmarks,
)

from .conftest import shared_path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
SCENARIOS = {
    "isbi": ("quickstart.md", "evaluation.md"),
    "synthetic": ("self-configuration.md", "training.md", "prediction.md", "evaluation.md"),
    "byod": ("bring-your-own-data.md", "dataset-format.md"),
    "hand": ("hand-xray.md",),
}
SHRINK = {
    "train": ["--epochs", "1", "--iterations", "2", "--batch-size", "2"],
    "preprocess": ["--workers", "1"],
}
PLACEHOLDERS = ("isbi2015", "hand_xray")
PENDING_PAGES = {"reliability.md"}  # linked from docs/README.md, being written
ISBI_CASES = {"TrainingData": ("001", "002"), "Test1Data": ("151",)}
GROUP_GEOMETRY = {  # the images the landmark examples of dataset-format.md are placed on
    "ceph": Geometry.identity((2400, 1935), (0.1, 0.1)),  # 1935 x 2400 PNG of 0.1 mm pixels
    "brain": None,  # world coordinates only (3D)
}
GROUP_NDIM = {"ceph": 2, "brain": 3}
MARKER = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
TORCHRUN_TIMEOUT_S = 300


# --- the documents ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A fenced block of a document and the marker before it (None: unmarked)."""

    doc: str
    line: int
    language: str
    text: str
    marker: str | None

    @property
    def where(self) -> str:
        return f"docs/{self.doc}:{self.line}"

    @property
    def mode(self) -> str:
        return (self.marker or "").split(maxsplit=1)[0] if self.marker else ""

    @property
    def argument(self) -> str:
        parts = (self.marker or "").split(maxsplit=1)
        return parts[1] if len(parts) > 1 else ""


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced block of a markdown file, with the docs-test marker just before it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, number = [], 0
    while number < len(lines):
        opening = FENCE.match(lines[number])
        if not opening:
            number += 1
            continue
        indent, language = opening.groups()
        end = number + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        body = "\n".join(
            line[len(indent) :] if line.startswith(indent) else line
            for line in lines[number + 1 : end]
        )
        blocks.append(
            Block(path.name, number + 1, language, body + "\n", _marker_before(lines, number))
        )
        number = end + 1
    return blocks


def _marker_before(lines: list[str], number: int) -> str | None:
    previous = number - 1
    while previous >= 0 and not lines[previous].strip():
        previous -= 1
    found = MARKER.fullmatch(lines[previous].strip()) if previous >= 0 else None
    return found.group(1) if found else None


def doc_blocks() -> list[Block]:
    return [block for path in sorted(DOCS.glob("*.md")) for block in fenced_blocks(path)]


def command_blocks() -> list[Block]:
    return [b for b in doc_blocks() if b.language in ("bash", "python")]


def statements(text: str) -> list[str]:
    """The shell statements of a bash block: continuation lines joined, heredocs kept whole,
    blank lines and comments dropped."""
    lines, found, number = text.splitlines(), [], 0
    while number < len(lines):
        line = lines[number].strip()
        number += 1
        if not line or line.startswith("#"):
            continue
        while line.endswith("\\") and number < len(lines):
            line = line[:-1].rstrip() + " " + lines[number].strip()
            number += 1
        heredoc = HEREDOC.search(line)
        if heredoc:
            body = []
            while number < len(lines) and lines[number].strip() != heredoc.group(1):
                body.append(lines[number])
                number += 1
            line = "\n".join([line, *body, heredoc.group(1)])
            number += 1
        found.append(line)
    return found


def run_marker(block: Block) -> tuple[str, list[tuple[str, str]]]:
    """The scenario and the (OLD, NEW) replacements of a ``run`` marker."""
    scenario, *pairs = [part.strip() for part in block.argument.split(";")]
    replacements = []
    for pair in pairs:
        old, arrow, new = pair.partition(" -> ")
        assert arrow and old and new, f"{block.where}: replacement '{pair}' is not 'OLD -> NEW'"
        replacements.append((old, new))
    return scenario, replacements


def substituted(block: Block, inputs: dict[str, str]) -> str:
    """The block's text with the marker's replacements made, placeholders filled from ``inputs``."""
    _, replacements = run_marker(block)
    text = block.text
    for old, new in replacements:
        text = text.replace(old, new.format(**inputs))
    return text


# --- parsing ------------------------------------------------------------------------------------


def makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    return {m.group(1) for m in re.finditer(r"^([A-Za-z0-9_.-]+)\s*:", text, re.MULTILINE)}


def torchrun_parts(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """torchrun's parsed options, and the medlandmark arguments of the module it runs."""
    from torch.distributed.run import get_args_parser

    options = get_args_parser().parse_args(argv[1:])
    assert options.module and options.training_script in ("medlandmark", "medlandmark.cli"), (
        f"torchrun must run '-m medlandmark': {shlex.join(argv)}"
    )
    return options, list(options.training_script_args)


def parse_check(statement: str, where: str) -> None:
    """Parse a command as the real command line would, without running it."""
    argv = shlex.split(statement, comments=True)
    try:
        if argv[0] == "medlandmark":
            build_parser().parse_args(argv[1:])
        elif argv[0] == "torchrun":
            build_parser().parse_args(torchrun_parts(argv)[1])
        elif argv[0] == "make":
            missing = set(argv[1:]) - makefile_targets()
            assert not missing, f"{where}: no Makefile target {sorted(missing)}"
        elif (
            Path(argv[0]).name.startswith("python")
            and len(argv) > 1
            and argv[1].startswith("benchmarks/")
        ):
            recipe_parser(argv[1], where).parse_args(argv[2:])
        else:
            pytest.fail(
                f"{where}: cannot parse-check '{statement}' (only medlandmark, torchrun, make, "
                "python benchmarks/RECIPE.py)"
            )
    except SystemExit as error:
        pytest.fail(f"{where}: '{statement}' does not parse (exit {error.code})")


def recipe_parser(script: str, where: str) -> argparse.ArgumentParser:
    """The command-line parser of a benchmark recipe (``benchmarks/NAME.py``)."""
    path = REPO / script
    assert path.is_file(), f"{where}: no {script}"
    sys.path.insert(0, str(path.parent))
    try:
        module = importlib.import_module(path.stem)
        recipes = importlib.import_module("recipes")
    finally:
        sys.path.remove(str(path.parent))
    benchmark = next((v for v in vars(module).values() if isinstance(v, recipes.Benchmark)), None)
    assert benchmark is not None, f"{where}: {script} is not a benchmark recipe"
    return recipes.argument_parser(benchmark, module.__doc__)


# --- running ------------------------------------------------------------------------------------


def shrunk(argv: list[str]) -> list[str]:
    return argv + SHRINK.get(argv[0], []) if argv else argv


def run_medlandmark(statement: str, cwd: Path, where: str) -> None:
    argv = []
    for arg in shlex.split(statement, comments=True)[1:]:
        matches = sorted(glob(arg, root_dir=cwd)) if any(c in arg for c in "*?[") else []
        argv += matches or [arg]
    code = main(shrunk(argv))
    assert code == 0, f"{where}: '{shlex.join(['medlandmark', *shrunk(argv)])}' exited with {code}"


def run_torchrun(statement: str, cwd: Path, where: str) -> None:
    argv = shlex.split(statement, comments=True)
    options, arguments = torchrun_parts(argv)
    launcher_options = argv[1 : len(argv) - len(arguments) - 2]  # those before "-m MODULE"
    module = ["-m", options.training_script]
    command = [sys.executable, "-m", "torch.distributed.run", *launcher_options, *module]
    command += shrunk(arguments)
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a process group of its own, so that a hang kills the workers too, not only the launcher
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output = process.communicate(timeout=TORCHRUN_TIMEOUT_S)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate()[0]
    assert process.returncode == 0, f"{where}: {shlex.join(command)} failed:\n{output[-4000:]}"


def run_bash(statement: str, cwd: Path, where: str) -> None:
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", statement],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{where}: '{statement}' failed:\n{result.stdout}{result.stderr}"


def run_statement(statement: str, cwd: Path, where: str) -> None:
    program = statement.split(maxsplit=1)[0]
    if program == "medlandmark":
        run_medlandmark(statement, cwd, where)
    elif program == "torchrun":
        run_torchrun(statement, cwd, where)
    else:
        run_bash(statement, cwd, where)


def assert_subset(expected: object, actual: object, where: str) -> None:
    """Every key of ``expected`` is in ``actual`` with an equal value (floats to 1e-9)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: expected an object, found {actual!r}"
        for key, value in expected.items():
            assert key in actual, f"{where}: no key '{key}'"
            assert_subset(value, actual[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), (
            f"{where}: {expected} != {actual}"
        )
        for index, (a, b) in enumerate(zip(expected, actual, strict=True)):
            assert_subset(a, b, f"{where}[{index}]")
    elif isinstance(expected, float) or (isinstance(expected, int) and isinstance(actual, float)):
        assert isinstance(actual, (int, float)) and math.isclose(expected, actual, rel_tol=1e-9), (
            f"{where}: {expected} != {actual}"
        )
    else:
        assert expected == actual, f"{where}: {expected!r} != {actual!r}"


@pytest.fixture
def one_thread():
    """One torch thread while the scenarios run: on a shared 2-core machine, torch's spinning
    worker threads make the small networks here several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_scenario(
    name: str, cwd: Path, inputs: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> int:
    """Run every ``run`` and ``expect`` block of a scenario in order; returns the commands run."""
    monkeypatch.chdir(cwd)
    blocks = [block for doc in SCENARIOS[name] for block in fenced_blocks(DOCS / doc)]
    count = 0
    for block in blocks:
        if block.mode == "run" and run_marker(block)[0] == name:
            text = substituted(block, inputs)
            if block.language == "python":
                exec(compile(text, block.where, "exec"), {"__name__": "docs_test"})
                count += 1
                continue
            for statement in statements(text):
                run_statement(statement, cwd, block.where)
                count += 1
        elif block.mode == "expect" and block.argument.split()[0] == name:
            path = cwd / block.argument.split()[1]
            assert_subset(
                json.loads(block.text),
                json.loads(path.read_text(encoding="utf-8")),
                f"{block.where}: {path.name}",
            )
    return count


# --- the inputs the scenarios start from ----------------------------------------------------------


def isbi_official_layout(source: Path, out: Path) -> Path:
    """A few ISBI 2015 images and both annotators' files, symlinked in the official layout."""
    for split, case_ids in ISBI_CASES.items():
        (out / "RawImage" / split).mkdir(parents=True)
        for case_id in case_ids:
            (out / "RawImage" / split / f"{case_id}.jpg").symlink_to(
                source / "RawImage" / split / f"{case_id}.jpg"
            )
    for annotator in ("400_senior", "400_junior"):
        (out / "AnnotationsByMD" / annotator).mkdir(parents=True)
        for case_id in (c for ids in ISBI_CASES.values() for c in ids):
            (out / "AnnotationsByMD" / annotator / f"{case_id}.txt").symlink_to(
                source / "AnnotationsByMD" / annotator / f"{case_id}.txt"
            )
    return out


BYOD_LANDMARKS = ["nasion", "left_porion", "right_porion", "menton"]
# LPS offsets from the head's centre: nasion in front, the porions left and right, menton below
BYOD_OFFSETS_MM = np.array([[0, -15, 4], [16, 0, 0], [-16, 0, 0], [0, -11, -17]], dtype=float)
BYOD_SHAPE, BYOD_SPACING_MM = (22, 26, 26), (2.0, 1.5, 1.5)
# direction[:, i] of array axes (z, y, x): superior, anterior, right (a RAS+ NIfTI)
RAS_PLUS_DIRECTION = ((0.0, 0.0, -1.0), (0.0, -1.0, 0.0), (1.0, 0.0, 0.0))


def write_byod_scans(folder: Path, count: int = 8) -> Path:
    """Small head-CT-like NIfTI scans in RAS+ orientation (as scanners write them) and their Slicer
    markups: case03's menton is unplaced (missing), case05 is saved in RAS, the others in LPS."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    start = Geometry(BYOD_SPACING_MM, (0.0, 0.0, 0.0), RAS_PLUS_DIRECTION, BYOD_SHAPE)
    grid = np.stack(
        np.meshgrid(*[np.arange(n) for n in BYOD_SHAPE], indexing="ij"), axis=-1
    ).reshape(-1, 3)
    for number in range(1, count + 1):
        centre_mm = np.array([0.0, 0.0, 100.0]) + rng.uniform(-3.0, 3.0, 3)
        origin = centre_mm - index_to_world((np.asarray(BYOD_SHAPE) - 1) / 2.0, start)
        geometry = Geometry(BYOD_SPACING_MM, tuple(origin), RAS_PLUS_DIRECTION, BYOD_SHAPE)
        world_mm = index_to_world(grid, geometry)
        radius = np.linalg.norm((world_mm - centre_mm) / [16.0, 17.0, 19.0], axis=1)
        hounsfield = np.where(radius < 1.0, 40.0, -1000.0)
        hounsfield[(radius > 0.85) & (radius < 1.0)] = 800.0
        points_mm = centre_mm + BYOD_OFFSETS_MM + rng.normal(0.0, 1.0, BYOD_OFFSETS_MM.shape)
        for point in points_mm:
            hounsfield[np.linalg.norm(world_mm - point, axis=1) < 2.5] = 1500.0
        hounsfield += rng.normal(0.0, 15.0, hounsfield.shape)
        write_image(
            folder / f"case{number:02d}.nii.gz",
            hounsfield.reshape(BYOD_SHAPE).astype(np.int16),
            geometry,
        )
        if number == 3:
            points_mm[3] = np.nan
        space = "RAS" if number == 5 else "LPS"
        write_landmarks(
            folder / f"case{number:02d}.mrk.json",
            LandmarkSet(BYOD_LANDMARKS, points_mm),
            space=space,
        )
    return folder


# --- the tests ----------------------------------------------------------------------------------


def test_every_command_block_is_marked_and_parses() -> None:
    """A block of commands is run or parse-only (with a reason); every marker is well formed, and
    every command parses as the real command line would parse it."""
    blocks = command_blocks()
    assert len(blocks) >= 20, "docs/ lost its commands"
    known_modes = {"run", "parse-only", "landmarks", "dataset-json", "expect"}
    for block in doc_blocks():
        assert block.marker is None or block.mode in known_modes, (
            f"{block.where}: unknown marker '{block.marker}'"
        )
    for block in blocks:
        assert block.mode in ("run", "parse-only"), (
            f"{block.where}: a {block.language} block needs a run or parse-only marker"
        )
        if block.mode == "parse-only":
            assert block.language == "bash" and block.argument, (
                f"{block.where}: parse-only needs a reason"
            )
            for statement in statements(block.text):
                parse_check(statement, block.where)
            continue
        scenario, replacements = run_marker(block)
        assert block.doc in SCENARIOS.get(scenario, ()), (
            f"{block.where}: scenario '{scenario}' does not run {block.doc}"
        )
        for old, _ in replacements:
            assert old in block.text, f"{block.where}: '{old}' is not in the block"
        if block.language == "bash":
            for statement in statements(substituted(block, {p: f"/tmp/{p}" for p in PLACEHOLDERS})):
                if statement.split(maxsplit=1)[0] in ("medlandmark", "torchrun"):
                    parse_check(statement, block.where)


def test_every_marker_sits_on_a_block_and_every_link_resolves() -> None:
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text(encoding="utf-8")
        marked = {b.line for b in fenced_blocks(path) if b.marker is not None}
        assert len(MARKER.findall(text)) == len(marked), (
            f"{path.name}: a docs-test marker is not followed by a block"
        )
        for target in re.findall(r"\]\(([\w-]+\.md)\)", text):
            assert (DOCS / target).is_file() or target in PENDING_PAGES, (
                f"{path.name}: broken link {target}"
            )


def test_readme_commands_parse() -> None:
    """The README's command table and its command blocks are valid commands too."""
    readme = REPO / "README.md"
    table = [
        m.group(1)
        for m in re.finditer(
            r"\|\s*`(medlandmark [^`]+)`\s*\|\s*$", readme.read_text(), re.MULTILINE
        )
    ]
    assert len(table) >= 10, "the README's command table has no examples"
    for command in table:
        parse_check(command, "README.md table")
    for block in fenced_blocks(readme):
        if block.language == "bash":
            for statement in statements(block.text):
                parse_check(statement, block.where.replace("docs/", ""))


def _verb_parsers() -> dict[str, argparse.ArgumentParser]:
    """'VERB' and 'convert KIND' -> its parser."""

    def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return dict(actions[0].choices) if actions else {}

    found = {}
    for verb, parser in subparsers(build_parser()).items():
        found[verb] = parser
        found.update({f"{verb} {kind}": sub for kind, sub in subparsers(parser).items()})
    return found


def test_every_verb_help_says_what_it_does_and_gives_a_working_example(capsys) -> None:
    parsers = _verb_parsers()
    assert {
        "convert isbi2015",
        "convert afids",
        "train",
        "predict",
        "export",
        "evaluate",
        "demo",
    } <= set(parsers)
    for verb, parser in parsers.items():
        with pytest.raises(SystemExit) as exit_info:
            main([*verb.split(), "--help"])
        assert exit_info.value.code == 0, verb
        text = capsys.readouterr().out
        assert text.startswith(f"usage: medlandmark {verb}") and parser.description, verb
        summary, _, example = parser.description.partition("\n\nexample:\n")
        assert summary.strip() and example.strip().startswith(f"medlandmark {verb}"), (
            f"{verb}: no example in --help"
        )
        assert "example:" in text and example.strip().splitlines()[0] in text
        build_parser().parse_args(shlex.split(example)[1:])
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    top = capsys.readouterr().out
    assert "VERB --help" in top and "example" in top and all(v.split()[0] in top for v in parsers)
    result = subprocess.run(
        [sys.executable, "-m", "medlandmark.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "usage: medlandmark" in result.stdout


def test_landmark_examples_give_the_same_points_in_every_format(tmp_path: Path) -> None:
    examples = [b for b in doc_blocks() if b.mode == "landmarks"]
    groups: dict[str, list[tuple[Block, LandmarkSet]]] = {}
    covered = set()
    for block in examples:
        group, file_name, *options = block.argument.split()
        names = options[0].removeprefix("names=").split(",") if options else None
        path = tmp_path / file_name
        path.write_text(block.text, encoding="utf-8")
        landmarks = read_landmarks(
            path, geometry=GROUP_GEOMETRY[group], names=names, ndim=GROUP_NDIM[group]
        )
        raw = PARSERS[landmark_format(path)](block.text, path)
        covered.add((landmark_format(path), raw.space))
        if landmark_format(path) != "isbi":  # the only format that cannot mark a landmark missing
            assert not landmarks.present.all(), (
                f"{block.where}: the example shows no missing landmark"
            )
        groups.setdefault(group, []).append((block, landmarks))
    for group, members in groups.items():
        assert len(members) >= 3, group
        reference = members[0][1]
        for block, landmarks in members[1:]:
            expected = reference.points_mm[[reference.names.index(n) for n in landmarks.names]]
            np.testing.assert_allclose(
                landmarks.points_mm, expected, atol=1e-9, err_msg=block.where
            )
    assert set(FORMAT_BY_SUFFIX.values()) == {f for f, _ in covered}, covered
    assert {
        ("csv", "LPS"),
        ("csv", "RAS"),
        ("csv", "index"),
        ("mrk.json", "LPS"),
        ("mrk.json", "RAS"),
    } <= covered


def test_dataset_json_examples_are_valid() -> None:
    examples = [b for b in doc_blocks() if b.mode == "dataset-json"]
    assert examples
    for block in examples:
        spec = DatasetSpec.model_validate(json.loads(block.text))
        assert spec.spacing_mm and spec.splits and spec.license, (
            f"{block.where}: not every field is shown"
        )


def test_torchrun_on_gpus_gives_each_process_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """What training.md says of several GPUs: the process of local rank r uses GPU r, and small
    CPU messages go through gloo beside NCCL (a NCCL-only group refuses CPU tensors)."""
    from medlandmark.training import distributed

    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.setdefault("device", index))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(
        distributed.dist, "init_process_group", lambda backend: calls.setdefault("backend", backend)
    )
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 7)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 8)
    context = distributed.start(torch.device("cuda"))
    assert calls == {"device": 3, "backend": "cpu:gloo,cuda:nccl"}
    assert (context.rank, context.world_size, context.local_rank) == (7, 8, 3)
    calls.clear()
    distributed.start(torch.device("cpu"))
    assert calls == {"backend": "gloo"}


@pytest.mark.usefixtures("one_thread")
def test_bring_your_own_data_walkthrough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_byod_scans(tmp_path / "scans")
    assert run_scenario("byod", tmp_path, {}, monkeypatch) >= 10
    metrics = json.loads((tmp_path / "evaluation" / "my_dataset" / "metrics.json").read_text())
    assert metrics["n_cases"] == 2 and metrics["ndim"] == 3
    assert (tmp_path / "predictions" / "my_dataset" / "case07.mrk.json").is_file()


@pytest.mark.usefixtures("one_thread")
def test_synthetic_pages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """self-configuration, training, prediction and evaluation, on the synthetic dataset."""
    assert run_scenario("synthetic", tmp_path, {}, monkeypatch) >= 15
    record = json.loads(
        (tmp_path / "runs" / "isbi_ddp" / "2d_coarse_fold0" / "run.json").read_text()
    )
    assert len(record["weight_checksum_per_rank"]) == 2 and record["status"] == "finished"
    assert (tmp_path / "runs" / "isbi" / "2d_coarse_fold0" / "model.onnx").is_file()
    assert (tmp_path / "predictions" / "151" / "overlays" / "case006.png").is_file()
    assert (
        json.loads((tmp_path / "evaluation" / "test1" / "metrics.json").read_text())["n_cases"] == 2
    )


@pytest.mark.usefixtures("one_thread")
def test_quickstart_on_isbi2015(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quick start and the evaluator's reference check on three real ISBI 2015 images."""
    source = isbi_official_layout(shared_path("isbi2015"), tmp_path / "isbi2015")
    work = tmp_path / "work"
    work.mkdir()
    assert run_scenario("isbi", work, {"isbi2015": str(source)}, monkeypatch) >= 10
    metrics = json.loads((work / "evaluation" / "test1" / "metrics.json").read_text())
    assert metrics["n_cases"] == 1 and metrics["n_landmarks"] == 19
    reference = json.loads((work / "evaluation" / "junior_vs_senior" / "metrics.json").read_text())
    assert reference["n_cases"] == 3 and 0.5 < reference["mre_mm"] < 5.0


@pytest.mark.usefixtures("one_thread")
def test_hand_xray_walkthrough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hand-xray.md on the nine real Digital Hand Atlas radiographs: a pixel table to mm."""
    source = shared_path("hand_xray")
    assert run_scenario("hand", tmp_path, {"hand_xray": str(source)}, monkeypatch) >= 7
    metrics = json.loads((tmp_path / "evaluation" / "hand" / "metrics.json").read_text())
    assert metrics["n_cases"] == 2 and metrics["n_landmarks"] == 37
    assert (tmp_path / "predictions" / "hand" / "overlays" / "3231.png").is_file()


def test_plan_measures_again_when_a_case_is_added(tmp_path: Path) -> None:
    """self-configuration.md: fingerprint.json is reused only while the case files stay the same."""
    from medlandmark.datasets.dataset import load_spec, write_spec
    from medlandmark.datasets.synthetic import make_synthetic_dataset
    from medlandmark.planning import plan_dataset

    root = make_synthetic_dataset(tmp_path / "ds", num_cases=4, size_px=48)
    spec = load_spec(root)
    spec.splits = None  # every case is measured
    write_spec(root, spec)
    fingerprint = root / "preprocessed" / "fingerprint.json"
    plan_dataset(root, workers=1)
    measured = fingerprint.stat().st_mtime_ns
    plan_dataset(root, workers=1)
    assert fingerprint.stat().st_mtime_ns == measured  # reused
    for folder, suffix in (("images", ".png"), ("landmarks", ".csv")):
        (root / folder / f"case009{suffix}").write_bytes(
            (root / folder / f"case000{suffix}").read_bytes()
        )
    plan_dataset(root, workers=1)
    assert json.loads(fingerprint.read_text())["num_cases"] == 5
