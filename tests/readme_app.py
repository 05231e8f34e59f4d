"""The app `workbench serve --app readme_app:make` loads in the tests: a Workbench with the tools the README's
examples register, taken from the README itself (their functions run on the server, as written there), and a
tool of the tests' own."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from workbench import Workbench

README = Path(__file__).resolve().parent.parent / "README.md"


def _slug(node: ast.FunctionDef) -> str | None:
    for decorator in node.decorator_list:
        if isinstance(decorator, ast.Call) and ast.unparse(decorator.func) == "wb.tool":
            for keyword in decorator.keywords:
                if keyword.arg == "slug" and isinstance(keyword.value, ast.Constant):
                    return str(keyword.value.value)
    return None


def register_readme_tools(wb: Workbench) -> list[str]:
    """Run, with `wb`, the imports, module-level annotated state and `@wb.tool` functions of every README example
    that registers a tool (each slug once); the slugs registered."""
    registered = []
    for code in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S):
        if "@wb.tool" not in code:
            continue
        kept: list[ast.stmt] = []
        for node in ast.parse(code).body:
            if isinstance(node, ast.FunctionDef):
                slug = _slug(node)
                if slug is None or slug in wb.tools:
                    continue
                registered.append(slug)
            elif not isinstance(node, (ast.Import, ast.ImportFrom, ast.AnnAssign)):
                continue
            kept.append(node)
        exec(compile(ast.Module(kept, []), str(README), "exec"), {"wb": wb})  # the README's own code
    return registered


def make() -> Workbench:
    wb = Workbench(execute_timeout=120)
    register_readme_tools(wb)

    @wb.tool(slug="TEST_ECHO", toolkit="test")
    def echo(text: str, times: int = 1) -> dict:
        """Echo a text, `times` times."""
        return {"echo": text * times}

    return wb
