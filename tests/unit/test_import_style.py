"""Imports sit at the top of a module; one inside a function states why, in a comment on its line or just above.

A function-level import is accepted when a comment is on one of its lines, on the line just above it, or on a line
of the run of function-level imports directly above it (so one comment can explain a block)."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_taskmoe"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def comment_lines(source: str) -> set[int]:
    """Line numbers (1-based) that hold a comment token."""
    return {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT}


def function_imports(tree: ast.AST) -> list[ast.stmt]:
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    found[id(inner)] = inner
    return sorted(found.values(), key=lambda n: n.lineno)


def unexplained_imports(source: str) -> list[int]:
    """Line numbers of the function-level imports of `source` that carry no comment."""
    imports = function_imports(ast.parse(source))
    comments = comment_lines(source)
    import_lines = {line for node in imports for line in range(node.lineno, node.end_lineno + 1)}
    missing = []
    for node in imports:
        if comments & set(range(node.lineno, node.end_lineno + 1)):
            continue
        line = node.lineno - 1
        while line in import_lines and line not in comments:  # a block of imports: the comment may head it
            line -= 1
        if line not in comments:
            missing.append(node.lineno)
    return missing


def test_the_rule_itself():
    source = (
        "def f():\n"
        "    import a  # optional dependency\n"
        "    # matplotlib only when plotting\n"
        "    import b\n"
        "    from c import d\n"
        "    x = 1\n"
        "    import e\n"
        "    '# not a comment'\n"
        "    import g\n"
        "import h\n"
    )
    assert unexplained_imports(source) == [7, 9]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_function_level_imports_state_their_reason(path):
    missing = unexplained_imports(path.read_text(encoding="utf-8"))
    assert not missing, (f"{path}: imports inside functions without a comment giving the reason, lines {missing} "
                         "(move them to the top of the module, or say why they stay local)")
