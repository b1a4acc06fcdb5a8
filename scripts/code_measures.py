"""Issue 11's size measures for the package: long functions, long modules, outside citations.

    python scripts/code_measures.py [--max-function 100] [--max-module 450]

A function's size is its lines of code: the lines from ``def`` to its last statement, minus
blank lines, comment-only lines and its docstring (nested functions count towards their parent
too, as a reader has to read them). A module's size is its total number of lines. Citations are
mentions of the design documents that live outside the repository (``SPEC §``, ``STYLE §``,
``SPEC.md``, ``STYLE.md``). Exit status 1 when any measure is over its limit.
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cpsample_fast"
CITATION = re.compile(r"\b(SPEC|STYLE)(\s*§|\.md)")


def _code_lines(source: str) -> set[int]:
    """Line numbers that carry a token other than a comment / newline / indentation."""
    lines: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in skip or tok.type == tokenize.ENDMARKER:
            continue
        lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def long_functions(path: Path, limit: int) -> list[tuple[str, int]]:
    source = path.read_text()
    tree = ast.parse(source)
    code = _code_lines(source) - _docstring_lines(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = len([ln for ln in code if node.lineno <= ln <= node.end_lineno])
            if n > limit:
                out.append((f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", n))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-function", type=int, default=100)
    parser.add_argument("--max-module", type=int, default=450)
    args = parser.parse_args(argv)

    files = sorted(PACKAGE.rglob("*.py"))
    functions = [f for p in files for f in long_functions(p, args.max_function)]
    modules = [(str(p.relative_to(ROOT)), len(p.read_text().splitlines())) for p in files]
    modules = [m for m in modules if m[1] > args.max_module]
    cited = []
    for pattern in ("*.py", "*.h", "*.cpp", "*.cu", "*.md", "*.sh", "Makefile"):
        for p in ROOT.rglob(pattern):
            if any(part.startswith(".") for part in p.relative_to(ROOT).parts):
                continue
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
                if CITATION.search(line) and p.name != "code_measures.py":
                    cited.append(f"{p.relative_to(ROOT)}:{i}")

    print(f"functions over {args.max_function} lines of code: {len(functions)}")
    for name, n in sorted(functions, key=lambda f: -f[1]):
        print(f"  {n:4d}  {name}")
    print(f"package modules over {args.max_module} lines: {len(modules)}")
    for name, n in sorted(modules, key=lambda m: -m[1]):
        print(f"  {n:4d}  {name}")
    print(f"citations of documents outside the repo: {len(cited)}")
    for where in cited:
        print(f"  {where}")
    return 1 if functions or modules or cited else 0


if __name__ == "__main__":
    sys.exit(main())
