"""Arrows run one way: the stages and their components never import the command line or the optional server."""

from __future__ import annotations

import ast

CLI_LAYER = {"finetune/cli.py", "finetune/commands.py", "finetune/__main__.py"}


def imported_modules(source: str) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_no_finetune_module_imports_the_cli_or_the_server(repo_root):
    wrong = {}
    for path in sorted((repo_root / "finetune").rglob("*.py")):
        rel = str(path.relative_to(repo_root))
        mods = imported_modules(path.read_text())
        bad = sorted(m for m in mods if m == "serve" or m.startswith("serve.")
                     or (rel not in CLI_LAYER and (m == "finetune.cli" or m.startswith("finetune.cli."))))
        if bad:
            wrong[rel] = bad
    assert wrong == {}


def test_the_check_sees_imports_inside_functions():
    assert "serve.server" in imported_modules("def f():\n    from serve.server import x\n")
    assert "finetune.cli" in imported_modules("from finetune import cli\n")
