import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is in the test extra")
def test_ruff_is_clean():
    out = subprocess.run(["ruff", "check", str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_committed_notebooks_are_normalized():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "normalize_notebooks.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + " -> run `python tools/normalize_notebooks.py`"


def test_every_notebook_has_parameters_an_assert_and_records_results():
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        code = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
        assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in code), f"{nb.name}: no parameters cell"
        source = "".join("".join(c["source"]) for c in code)
        assert "assert" in source, f"{nb.name}: no assert on its result"
        assert f'ResultsRecorder("{nb.stem}"' in source, f"{nb.name}: record results under its own stem"


def test_every_check_floors_result_is_asserted():
    """check_floors returns its failures: a call whose result is dropped is a check that cannot fail."""
    import ast

    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(nb.read_text())["cells"]:
            source = "".join(cell["source"])
            if cell["cell_type"] != "code" or "check_floors(" not in source:
                continue
            dropped = [n.lineno for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Expr)
                       and isinstance(n.value, ast.Call) and getattr(n.value.func, "id", None) == "check_floors"]
            assert not dropped, f"{nb.name}: assert what check_floors returns (failed = check_floors(...); " \
                                f"assert not failed, failed)"


def _assignments(tree):
    """Assignments at notebook level (inside if/for/with blocks too), not inside functions or classes."""
    import ast

    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _targets(node) -> set[str]:
    import ast

    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def _reads(tree, name: str) -> bool:
    import ast

    return any(isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load) for n in ast.walk(tree))


def test_parameters_are_not_overwritten_after_the_parameters_cell():
    """An override (papermill, ``python -m apt_course run -p LR=...``) is injected right after the parameters
    cell; a later cell that re-assigns a parameter without reading it would silently undo the override.
    Profile-dependent budgets use ``X = X if X is not None else (tiny value if TINY else real value)``."""
    import ast

    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
        index = next(i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", []))
        params = {name for node in _assignments(ast.parse("".join(cells[index]["source"]))) for name in _targets(node)}
        for cell in cells[index + 1:]:
            source = "\n".join(line for line in "".join(cell["source"]).splitlines()
                               if not line.lstrip().startswith(("%", "!")))
            for node in _assignments(ast.parse(source)):
                for name in _targets(node) & params:
                    assert _reads(node.value, name), (
                        f"{nb.name}: a later cell re-assigns parameter {name} without reading it, so an override "
                        f"would be lost: `{ast.unparse(node)[:80]}`; give the profile default in the parameters "
                        f"cell as None and resolve it as `{name} = {name} if {name} is not None else ...`")
