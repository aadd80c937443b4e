"""No function in sureid/ over 60 lines of code (docstring, blank and comment-only lines not
counted): a reader finds each step of the method in a function that fits on a screen."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "sureid"
MAX_LINES = 60


def code_lines(source_lines: list[str], node: ast.AST) -> int:
    """Lines of code of a function: its span without its docstring, blanks and comments."""
    doc = None
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        if isinstance(body[0].value.value, str):
            doc = (body[0].lineno, body[0].end_lineno)
    count = 0
    for number in range(node.lineno, node.end_lineno + 1):
        if doc and doc[0] <= number <= doc[1]:
            continue
        text = source_lines[number - 1].strip()
        if text and not text.startswith("#"):
            count += 1
    return count


def long_functions(source: str, max_lines: int = MAX_LINES) -> list[tuple[str, int]]:
    lines = source.splitlines()
    return [
        (node.name, code_lines(lines, node))
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and code_lines(lines, node) > max_lines
    ]


def test_the_counter_counts_code_only():
    body = "\n".join(f"    x{i} = {i}  # code" for i in range(3))
    source = f'def f():\n    """Doc.\n\n    More doc.\n    """\n    # a comment\n\n{body}\n'
    assert long_functions(source, max_lines=4) == []
    assert long_functions(source, max_lines=3) == [("f", 4)]  # the def line and three lines


def test_no_function_in_the_library_is_over_60_lines_of_code():
    found = [
        f"{path.relative_to(PACKAGE_DIR.parent)}: {name} ({n} lines)"
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
        for name, n in long_functions(path.read_text())
    ]
    assert not found, "split these into named helpers:\n  " + "\n  ".join(found)
