"""The Colab path: one course address for every badge and install cell, and an install that keeps Colab's torch."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


normalize = load_tool("normalize_notebooks")
colab = load_tool("colab_install")


def test_every_badge_and_install_cell_uses_the_one_address():
    repo = normalize.course_address()
    owner_name = repo.removeprefix("https://github.com/")
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        text = "".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"])
        clones = re.findall(r'COURSE = "([^"]+)"', text)
        badges = re.findall(r"colab\.research\.google\.com/github/([^/]+/[^/]+)/blob/", text)
        assert clones == [repo], f"{path.name}: install cell clones {clones}, the course's address is {repo}"
        assert badges == [owner_name], f"{path.name}: badge opens {badges}, not {owner_name}"
        assert "colab_install.py" in text
    assert normalize.install_block(repo, "ch15_serving").count('"serve"') == 1
    assert '"serve"' not in normalize.install_block(repo, "ch04_sft")


def test_retargeting_rewrites_every_notebook(tmp_path):
    """`--repo URL` on a copy of the course: pyproject and every notebook point at the fork; a bad URL is refused."""
    copy = tmp_path / "course"
    (copy / "tools").mkdir(parents=True)
    shutil.copy(ROOT / "tools" / "normalize_notebooks.py", copy / "tools")
    shutil.copy(ROOT / "pyproject.toml", copy)
    (copy / "notebooks").mkdir()
    for name in ("ch00_tiny_world.ipynb", "ch15_serving.ipynb"):
        shutil.copy(ROOT / "notebooks" / name, copy / "notebooks")
    tool = [sys.executable, str(copy / "tools" / "normalize_notebooks.py")]
    fork = "https://github.com/my-school/apt-course-2027"
    subprocess.run(tool + ["--repo", fork], check=True, capture_output=True)
    assert f'Repository = "{fork}"' in (copy / "pyproject.toml").read_text()
    for name in ("ch00_tiny_world.ipynb", "ch15_serving.ipynb"):
        text = (copy / "notebooks" / name).read_text()
        assert f'COURSE = \\"{fork}\\"' in text and "github/my-school/apt-course-2027/blob/main" in text
        assert "apt-course/apt-course" not in text
    assert subprocess.run(tool + ["--check"], capture_output=True).returncode == 0
    bad = subprocess.run(tool + ["--repo", "my-school/apt-course"], capture_output=True, text=True)
    assert bad.returncode != 0 and "https://github.com/OWNER/NAME" in bad.stderr
    mirror = subprocess.run(tool + ["--repo", "https://gitlab.example.org/school/apt-course"], capture_output=True,
                            text=True, check=True)
    assert "Colab badges open GitHub repositories only" in mirror.stdout


def test_colab_install_keeps_a_new_torch_and_stops_on_an_old_one():
    assert colab.release("2.9.0+cu126") == (2, 9) and colab.release("2.13.0") == (2, 13)
    colab.check_torch("2.9.0+cu126")  # Colab's: kept
    with pytest.raises(SystemExit, match="older than the course needs"):
        colab.check_torch("2.1.2+cu121")
    with pytest.raises(SystemExit, match="torch is not installed"):
        colab.check_torch(None)
    before = {"torch": "2.9.0", "transformers": "4.57.1", "trl": None}
    after = {"torch": "2.9.0", "transformers": "5.23.0", "trl": "1.16.0"}
    assert colab.changes(before, after) == ["transformers 4.57.1 -> 5.23.0", "trl (new) -> 1.16.0"]


def test_serving_names_the_extra_when_it_is_missing():
    from apt_course.serving import require_serving

    require_serving(("openai", "prometheus_client"))  # installed here (the test extra)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[serve\]"'):
        require_serving(("openai", "a_module_that_is_not_there"))
