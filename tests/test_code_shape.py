"""House rules that a reviewer would otherwise count by hand: short functions, few parameters,
and imports that flow one way (the import-linter contract in pyproject.toml)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "medlandmark"
MAX_LINES = 60
MAX_PARAMETERS = 8


def _functions() -> list[tuple[str, ast.FunctionDef]]:
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                found.append((f"{path.relative_to(SOURCE)}:{node.lineno} {node.name}", node))
    return found


def _parameters(node: ast.FunctionDef) -> int:
    arguments = node.args
    names = [a.arg for a in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs)]
    names += [a.arg for a in (arguments.vararg, arguments.kwarg) if a is not None]
    return len([n for n in names if n not in ("self", "cls")])


def test_no_function_is_longer_than_60_lines_or_takes_more_than_8_parameters() -> None:
    functions = _functions()
    assert len(functions) > 300  # the walk found the package
    long = [
        f"{where} ({n.end_lineno - n.lineno + 1} lines)"
        for where, n in functions
        if n.end_lineno - n.lineno + 1 > MAX_LINES
    ]
    wide = [
        f"{where} ({_parameters(n)} parameters)"
        for where, n in functions
        if _parameters(n) > MAX_PARAMETERS
    ]
    assert not long and not wide, "\n".join(long + wide)


def test_imports_flow_one_way() -> None:
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports, "import-linter is part of the test extras: pip install -e '.[test]'"
    result = subprocess.run([lint_imports], capture_output=True, text=True, cwd=SOURCE.parents[1])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout
