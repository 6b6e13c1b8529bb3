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
        assert f'ResultsRecorder("{nb.stem}")' in source, f"{nb.name}: record results under its own stem"
