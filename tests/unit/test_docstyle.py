"""Every field of every dataclass in megatron_taskmoe/ has a docstring string literal directly under it."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_taskmoe"


def undocumented_fields(source: str) -> list[str]:
    """`Class.field (line N)` for each annotated dataclass field of `source` not followed by a string literal.

    ClassVar annotations are not fields and are skipped.
    """
    missing = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        if not any("dataclass" in ast.unparse(d) for d in node.decorator_list):
            continue
        for i, stmt in enumerate(node.body):
            if not isinstance(stmt, ast.AnnAssign) or "ClassVar" in ast.unparse(stmt.annotation):
                continue
            nxt = node.body[i + 1] if i + 1 < len(node.body) else None
            documented = (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                          and isinstance(nxt.value.value, str))
            if not documented:
                missing.append(f"{node.name}.{ast.unparse(stmt.target)} (line {stmt.lineno})")
    return missing


def test_checker_flags_a_field_without_docstring():
    source = (
        "from dataclasses import dataclass\n"
        "from typing import ClassVar\n"
        "@dataclass\n"
        "class C:\n"
        "    a: int = 1\n"
        '    """Documented."""\n'
        "    b: int = 2  # a comment is not a docstring\n"
        "    c: ClassVar[int] = 3\n"
    )
    assert undocumented_fields(source) == ["C.b (line 7)"]


def test_every_dataclass_field_has_a_docstring():
    files = sorted(PACKAGE.rglob("*.py"))
    assert files, f"no sources under {PACKAGE}"
    missing = [f"{path.relative_to(PACKAGE.parent)}: {item}"
               for path in files for item in undocumented_fields(path.read_text())]
    assert not missing, "dataclass fields without a docstring under them:\n" + "\n".join(missing)
