"""Executing notebooks from Python: ``python -m apt_course run ch00 ch04 --seed 1``.

Each notebook runs in a fresh kernel with its parameters cell followed by an injected cell that sets the
given parameters (papermill's convention), and the executed copy is written to ``runs/``.
"""

from __future__ import annotations

import time
from pathlib import Path

from .utils import repo_root


def notebooks_dir() -> Path:
    root = repo_root()
    if root is None:
        raise FileNotFoundError("the notebooks are not next to this package: clone the course repository and "
                                "`pip install -e .` inside it to run them")
    return root / "notebooks"


def find_notebooks(names: list[str] | None = None) -> list[Path]:
    """Notebooks matching each name prefix (``ch00``, ``ch04_sft``), or all of them."""
    all_nbs = sorted(notebooks_dir().glob("ch*.ipynb"))
    if not names:
        return all_nbs
    found = []
    for name in names:
        hits = [p for p in all_nbs if p.stem.startswith(name)]
        if not hits:
            raise ValueError(f"no notebook matches {name!r}; there are: {', '.join(p.stem for p in all_nbs)}")
        found += hits
    return found


def inject_parameters(nb, parameters: dict) -> None:
    """Insert a cell after the one tagged ``parameters`` that overrides them."""
    import nbformat

    if not parameters:
        return
    index = next((i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if index is None:
        raise ValueError("the notebook has no cell tagged 'parameters' to override")
    source = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)


def execute_notebook(path: Path, parameters: dict | None = None, out_dir: Path | None = None,
                     timeout: int = 1200) -> float:
    """Run one notebook; returns its wall time in seconds. Raises with the failing cell's error."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    inject_parameters(nb, parameters or {})
    start = time.perf_counter()
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, out_dir / path.name)
    return time.perf_counter() - start


def run(names: list[str] | None = None, parameters: dict | None = None, out_dir: str | Path | None = None) -> dict:
    """Execute notebooks one after another, printing each one's time; returns {stem: seconds}."""
    out = Path(out_dir) if out_dir else (repo_root() or Path(".")) / "runs"
    times = {}
    for path in find_notebooks(names):
        print(f"running {path.name} ...", flush=True)
        times[path.stem] = execute_notebook(path, parameters, out)
        print(f"  done in {times[path.stem]:.1f} s (executed copy: {out / path.name})", flush=True)
    return times
